"""The real operator (`gpujob operator`) as a subprocess against the `api` backend (the emulator or the real
control plane, see tests/support/kubernetes.py), and a kubelet's pen.

Tests drive Pods through their phases the way a kubelet would: by writing the Pod's status subresource. On the
real control plane the jobs carry a nodeSelector no Node has, so kube-scheduler leaves their Pods unbound
(PodScheduled=False, Unschedulable) and no node agent runs them: the test is their only kubelet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from gpujob.api.constants import GROUP, PLURAL, VERSION, Label, Phase
from gpujob.api.naming import label_value
from gpujob.sandbox.procs import free_port, wait_for
from tests.support.bridge import with_valid_params
from tests.support.kubernetes import ApiTarget
from tests.support.logs import records

READY_EVENT = "operator started"  # logged by the runtime once it serves
PEN = {"gpujob.dev/test-pen": "no-node-has-this"}


@dataclass
class OperatorProcess:
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = field(default=0)
    _offset: int = field(default=0)  # where the log of the latest start begins

    def start(self, timeout: float = 30.0, wait: bool = True) -> OperatorProcess:
        """Start the process; with `wait`, until it logs that it started (else see `wait_started`)."""
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        if wait:
            self.wait_started(timeout)
        return self

    def wait_started(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            return bool(records(self.log_path.read_text(errors="replace")[self._offset :], READY_EVENT))

        wait_for(ready, timeout, what="the operator to start")

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['GPUJOB_METRICS_PORT']}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def operator_factory(api: ApiTarget, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(extra_env: dict[str, str] | None = None, args: tuple[str, ...] = (), run: bool = True) -> OperatorProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_")}
        env.update(
            KUBECONFIG=str(api.operator_kubeconfig),
            GPUJOB_NAMESPACE=api.namespace,
            GPUJOB_WORKER_IMAGE="registry.test/gpujob-worker:test",
            GPUJOB_LOG_FORMAT="json",
            GPUJOB_METRICS_PORT=str(free_port()),
            GPUJOB_STATUS_PROGRESS_INTERVAL="0.2",
        )
        env.update(extra_env or {})
        argv = [sys.executable, "-m", "gpujob.cli", "operator", *api.operator_args, *args]
        op = OperatorProcess(argv, env, tmp_path / f"operator-{len(started)}.log")
        started.append(op)
        return op.start() if run else op

    yield start
    for op in started:
        op.stop()


@pytest.fixture
def operator(operator_factory: Callable[..., OperatorProcess]) -> OperatorProcess:
    return operator_factory()


class Cluster:
    """Sync helpers over the real HTTP API of the backend: GpuJobs in, Pods driven like a kubelet."""

    def __init__(
        self, api: client.ApiClient, namespace: str = "default", *, pen: bool = False, slowdown: float = 1.0
    ) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.pen = pen  # keep the jobs' Pods off every Node (the real control plane's scheduler)
        self.slowdown = slowdown

    def create_job(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        spec = with_valid_params(spec)  # a train_lora's baseModel/dataset, when the test does not care
        if self.pen:
            spec = {**spec, "nodeSelector": {**(spec.get("nodeSelector") or {}), **PEN}}
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GpuJob", "metadata": {"name": name}, "spec": spec}
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )
        return created

    @property
    def resting_phase(self) -> Phase:
        """Where a job whose Pod nobody runs rests: Scheduled on the emulator; Pending (Unschedulable) on the real
        control plane, whose scheduler finds no Node in the pen."""
        return Phase.PENDING if self.pen else Phase.SCHEDULED

    @staticmethod
    def without_pen(node_selector: dict[str, str] | None) -> dict[str, str]:
        """A Pod's nodeSelector less the pen's key that `create_job` added."""
        return {k: v for k, v in (node_selector or {}).items() if k not in PEN}

    def job(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def status(self, name: str) -> dict[str, Any]:
        return (self.job(name) or {}).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec})

    def delete_job(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def pods(self, job_name: str) -> list[Any]:
        selector = f"{Label.JOB_NAME}={label_value(job_name)}"
        items = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return sorted(items, key=lambda p: int(p.metadata.labels[Label.ATTEMPT]))

    def wait_pod(self, job_name: str, attempt: int, timeout: float = 15.0) -> Any:
        def found() -> Any:
            return next((p for p in self.pods(job_name) if p.metadata.labels[Label.ATTEMPT] == str(attempt)), None)

        return wait_for(found, timeout * self.slowdown, what=f"pod of {job_name} attempt {attempt}")

    def wait_phase(self, name: str, phase: str, timeout: float = 15.0) -> dict[str, Any]:
        status: dict[str, Any] = wait_for(
            lambda: (s := self.status(name)).get("phase") == phase and s,
            timeout * self.slowdown,
            what=f"{name} phase {phase}",
        )
        return status

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
        """`wait_for` with the backend's slowdown (GC and controllers are asynchronous on a real cluster)."""
        return wait_for(predicate, timeout * self.slowdown, what=what)

    # --- the kubelet's side
    def set_pod(
        self,
        pod_name: str,
        phase: str,
        *,
        exit_code: int | None = None,
        reason: str | None = None,
        message: str | None = None,
        pod_reason: str | None = None,
    ) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        state: dict[str, Any]
        if phase == "Running":
            state = {"running": {"startedAt": now}}
        elif phase in ("Succeeded", "Failed") and exit_code is not None:
            term: dict[str, Any] = {
                "exitCode": exit_code,
                "startedAt": now,
                "finishedAt": now,
                "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            }
            if message:
                term["message"] = message
            state = {"terminated": term}
        else:
            state = {"waiting": {"reason": reason or "ContainerCreating"}}
        status: dict[str, Any] = {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": "worker",
                    "ready": phase == "Running",
                    "restartCount": 0,
                    "image": "x",
                    "imageID": "",
                    "state": state,
                }
            ],
        }
        if pod_reason:
            status["reason"] = pod_reason
            status["message"] = message or pod_reason
        self.core.patch_namespaced_pod_status(pod_name, self.namespace, {"status": status})

    def run_pod(self, job_name: str, attempt: int, exit_code: int = 0, **kw: Any) -> str:
        """The attempt's Pod runs, the operator sees it Running, then it ends. (The operator reports the phases it
        sees: Running and Succeeded within one of its batching windows would rightly skip Running.)"""
        pod = self.wait_pod(job_name, attempt)
        name: str = pod.metadata.name
        self.set_pod(name, "Running")
        self.wait_phase(job_name, Phase.RUNNING)
        self.set_pod(name, "Succeeded" if exit_code == 0 else "Failed", exit_code=exit_code, **kw)
        return name


@pytest.fixture
def cluster(api: ApiTarget) -> Iterator[Cluster]:
    import kubernetes

    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(api.kubeconfig), client_configuration=configuration)
    with kubernetes.client.ApiClient(configuration) as api_client:
        yield Cluster(api_client, api.namespace, pen=api.backend == "kubernetes", slowdown=api.slowdown)
