"""`kubectl logs [-f]` (the real kubectl binary) on the API emulator, of Pods the sandbox kubelet really runs: the
emulator serves the file the kubelet writes, and answers as kube-apiserver and a kubelet do when there is none.
The real control plane's side (kube-apiserver -> the node agent's LogServer) is in test_kubernetes.py, and the
whole `gpujob sandbox` on both backends in tests/e2e/test_e2e.py."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

from kubernetes import client

from gpujob.sandbox.procs import wait_for
from gpujob.sandbox.realcluster import run_kubectl
from tests.support.emulator import RunningEmulator
from tests.support.kubernetes import KubeSession, restricted_container
from tests.support.sandbox import KubeletThread

NS = "default"


def pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "busybox", "command": ["sh", "-c", script]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def phase(core: client.CoreV1Api, name: str) -> str:
    return str(core.read_namespaced_pod(name, NS).status.phase)


def kubectl(emulator: RunningEmulator, *args: str) -> subprocess.CompletedProcess[str]:
    return run_kubectl(emulator.kubeconfig, *args, timeout=60)


def test_kubectl_logs_of_a_pod_that_ran(
    emulator: RunningEmulator, kubelet_factory: Callable[..., KubeletThread], k8s_api: client.ApiClient
) -> None:
    kubelet_factory()
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(NS, pod("lines", "echo one; echo two >&2; echo three"))
    wait_for(lambda: phase(core, "lines") == "Succeeded", 20, what="the pod to succeed")
    assert kubectl(emulator, "logs", "lines").stdout == "one\ntwo\nthree\n"
    assert kubectl(emulator, "logs", "lines", "-c", "main", "--tail=2").stdout == "two\nthree\n"
    assert kubectl(emulator, "logs", "pod/lines", "--limit-bytes=6").stdout == "one\ntw"
    assert kubectl(emulator, "logs", "-f", "lines").stdout == "one\ntwo\nthree\n"  # ended: -f returns at once
    previous = kubectl(emulator, "logs", "lines", "--previous")
    assert previous.returncode == 1
    assert 'previous terminated container "main" in pod "lines" not found' in previous.stderr
    missing = kubectl(emulator, "logs", "nope")
    assert missing.returncode == 1 and 'pods "nope" not found' in missing.stderr


def test_kubectl_logs_follow_streams_until_the_container_ends(
    emulator: RunningEmulator, kubelet_factory: Callable[..., KubeletThread], k8s_api: client.ApiClient
) -> None:
    kubelet_factory()
    core = client.CoreV1Api(k8s_api)
    script = "for i in 1 2 3 4 5; do echo tick-$i; sleep 0.4; done; printf no-newline"
    core.create_namespaced_pod(NS, pod("ticker", script))
    wait_for(lambda: phase(core, "ticker") == "Running", 20, what="the pod to run")
    follow = kubectl(emulator, "logs", "-f", "ticker")
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout == "".join(f"tick-{i}\n" for i in range(1, 6)) + "no-newline"
    assert phase(core, "ticker") == "Succeeded"


def test_kubectl_logs_of_a_container_that_has_not_started(
    emulator: RunningEmulator, kubelet_factory: Callable[..., KubeletThread], k8s_api: client.ApiClient
) -> None:
    kubelet_factory(gpus=1)
    core = client.CoreV1Api(k8s_api)
    secret_env = {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "x"}}}]}
    core.create_namespaced_pod(NS, pod("unconfigured", "echo never", container=secret_env))

    def waiting() -> bool:
        statuses = core.read_namespaced_pod("unconfigured", NS).status.container_statuses or []
        return any(s.state.waiting is not None for s in statuses)

    wait_for(waiting, 20, what="the container to wait on its Secret")
    result = kubectl(emulator, "logs", "unconfigured")
    assert result.returncode == 1
    expected = 'container "main" in pod "unconfigured" is waiting to start: CreateContainerConfigError'
    assert expected in result.stderr
    unscheduled = pod("too-big", "echo never", container={"resources": {"limits": {"nvidia.com/gpu": "4"}}})
    core.create_namespaced_pod(NS, unscheduled)
    empty = kubectl(emulator, "logs", "too-big")  # no node yet: kube-apiserver answers an empty log
    assert empty.returncode == 0 and empty.stdout == ""
    other = kubectl(emulator, "logs", "unconfigured", "-c", "sidecar")
    assert other.returncode == 1 and "container sidecar is not valid for pod unconfigured" in other.stderr


def test_the_node_agent_answers_the_same_through_kube_apiserver(kube_session: KubeSession, kube_namespace: str) -> None:
    """The same options and refusals on the real control plane (kube-apiserver proxies to the agent's LogServer)."""
    ns, rest = kube_namespace, kube_session.sandbox.rest()
    body = pod("lines", "")
    body["spec"]["containers"] = [restricted_container(["sh", "-c", "echo one; echo two >&2; echo three"])]
    body["spec"]["automountServiceAccountToken"] = False
    rest.request("POST", f"/api/v1/namespaces/{ns}/pods", body)
    path = f"/api/v1/namespaces/{ns}/pods/lines"
    wait_for(lambda: (rest.get(path) or {}).get("status", {}).get("phase") == "Succeeded", 60, what="the pod to end")

    def logs(*args: str) -> subprocess.CompletedProcess[str]:
        return run_kubectl(kube_session.sandbox.kubeconfig, "-n", ns, "logs", *args, timeout=60)

    assert logs("lines").stdout == "one\ntwo\nthree\n"
    assert logs("lines", "-c", "main", "--tail=2").stdout == "two\nthree\n"
    assert logs("pod/lines", "--limit-bytes=6").stdout == "one\ntw"
    assert logs("-f", "lines").stdout == "one\ntwo\nthree\n"
    previous = logs("lines", "--previous")
    assert previous.returncode == 1
    assert 'previous terminated container "main" in pod "lines" not found' in previous.stderr
    missing = logs("nope")
    assert missing.returncode == 1 and 'pods "nope" not found' in missing.stderr
