"""Chaos: N jobs flow from the stream to completion while the operator is SIGKILLed at random moments and
restarted, Redis is restarted (AOF on), and the API injects 500s, 429s, status-write conflicts, cut watch
streams and 410s on resume. The invariants are checked at the end. Small in `make test`; `make chaos` runs the
full size (`--chaos-size=full`). Both backends:

- `emulator`: the API emulator injects the faults itself, aimed at the operator's clients by User-Agent;
- `kubernetes`: the real control plane (the session's, a fresh namespace). The operator runs as the chart's
  ServiceAccount through `gpujob.sandbox.faultproxy`, which injects the same faults; the test's own clients talk
  to kube-apiserver directly. Real faults on top: kube-apiserver and etcd restarts, a node agent SIGKILLed (a lost
  node: NotReady, taint-based eviction, new attempts that are not failures; the agent comes back later) and a
  `kubectl drain` of a node with running jobs (the Eviction API: Pods end Failed with DisruptionTarget).

A run is drawn from a seed (the order of jobs and junk, which jobs fail, when the operator is killed and Redis
restarted, the faults' random stream): `CHAOS_SEED=N` (`make chaos SEED=N`) replays a run's plan; unset, a fresh
seed is drawn. The seed is printed at the start and attached to any failure. Timing still varies between runs.

Every call of the harness is bounded: an API call unanswered after CALL_TIMEOUT means the API server hangs, and
the failure carries the sandbox's thread stacks (it prints them on SIGUSR1) and its process tree."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import urllib3
import yaml
from kubernetes import client, config, watch

from gpujob.api.constants import GROUP, MANAGER, PLURAL, VERSION, Label
from gpujob.api.naming import job_name, label_value
from gpujob.sandbox.kubeconfig import write_kubeconfig
from gpujob.sandbox.procs import ManagedProcess, RedisServer, free_port, port_open, wait_for
from gpujob.sandbox.realcluster import run_kubectl
from tests.support.kubernetes import KubeSession
from tests.support.logs import records

SIZES = {
    "small": {"jobs": 40, "kills": 3, "redis_restarts": 1, "malformed": 10, "timeout": 240, "real_faults": 1},
    "full": {"jobs": 2000, "kills": 20, "redis_restarts": 2, "malformed": 100, "timeout": 1800, "real_faults": 2},
}
# On the real control plane, each of these `real_faults` times (at random points of the plan).
REAL_FAULTS = ("kube-apiserver", "etcd", "node-kill", "drain")
LONG_JOBS = 4  # submitted before a node kill or drain, so that the node has running jobs to lose
# Seconds a long job runs (each attempt): long enough that a drain's eviction (seconds after the Pods were seen
# running) mostly finds them still running. Not always: a drain that began late (25 s, while the API server
# restarted) found one finished; the checks judge each drained Pod by how it ended, not by this margin.
LONG_SLEEP = 30
NODE_TIMEOUT = 150.0  # a lost node: NotReady after 15 s, eviction 10 s later, then new attempts elsewhere
SEED_ENV = "CHAOS_SEED"
RETRIES_IN_A_ROW = 8  # see invariant 5
CALL_TIMEOUT = 60.0  # seconds an API call may take (a list of 2,000 GpuJobs takes ~1 s) before it counts as hung
WATCH_SECONDS = 5  # the monitor's watches end after this, server side
REDIS_TIMEOUT = 10.0
STALL_SECONDS = 240.0  # no job finished for this long (while some remain): stuck, fail now with the diagnosis
# pyproject's 300 s pytest-timeout would cut a full run short: the run's own deadlines are its limits, this is
# only a backstop (and the test process's thread stacks are printed a little before it).
BACKSTOP = SIZES["full"]["timeout"] + 900
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(BACKSTOP)]

FAULTS = {
    "error_500_rate": 0.03,
    "error_429_rate": 0.03,
    "retry_after_seconds": 1,
    "status_conflict_rate": 0.05,
    "watch_cut_rate": 0.002,
    "watch_gone_rate": 0.2,
    "agents": ["kopf", MANAGER],  # the operator's clients; the kubelet and this test's monitor are spared
}
TERMINAL = {"Succeeded", "Failed", "Cancelled"}
RUNNING_PODS = {"Running"}
T = TypeVar("T")


@dataclass
class Chaos:
    kills: int = 0
    redis_restarts: int = 0
    real_faults: Counter[str] = field(default_factory=Counter)  # kind -> times done (kubernetes)
    victims: dict[str, str] = field(default_factory=dict)  # GpuJob name -> the real fault that took its Pod
    drained_pods: dict[str, str] = field(default_factory=dict)  # Pod running on a drained node -> its GpuJob
    dead_pods: set[str] = field(default_factory=set)  # Running on a SIGKILLed node: their processes died with it
    last_seen: dict[str, tuple[str, bool]] = field(default_factory=dict)  # pod -> (phase, DisruptionTarget)
    max_running_per_job: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    took: Counter[str] = field(default_factory=Counter)  # running job Pods each kind of real fault took
    monitor_errors: Counter[str] = field(default_factory=Counter)  # the pod monitor's watch failures, by type
    slowest: dict[str, float] = field(default_factory=dict)  # the harness's API calls: the longest answer, by call


def chaos_seed() -> int:
    value = os.environ.get(SEED_ENV, "").strip()
    return int(value) if value else random.SystemRandom().randrange(1, 2**31)


class Hung(AssertionError):
    """A call of the harness got no answer in time."""


# The sandbox with a hook for diagnosis: SIGUSR1 prints every thread's stack to its log (faulthandler, from C,
# so it works while the event loop is blocked) and the sandbox goes on.
SANDBOX_BOOT = (
    "import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
    "from gpujob.cli import main; sys.exit(main(sys.argv[1:]))"
)


class Sandbox:
    """`gpujob sandbox` (the API emulator and the kubelet) as a child process, and what a hang needs explained."""

    def __init__(self, tmp: Path) -> None:
        self.kubeconfig = tmp / "kubeconfig"
        self.log = tmp / "sandbox.log"
        argv = [sys.executable, "-c", SANDBOX_BOOT, "sandbox", "--kubeconfig", str(self.kubeconfig), "--no-redis",
                "--no-s3", "--gpus", "0", "--state-dir", str(tmp / "state")]  # fmt: skip
        self.process = ManagedProcess("sandbox", argv, lambda: "sandbox ready" in self.logs(), self.log)
        self.server = ""

    def start(self) -> None:
        self.process.start(timeout=60)
        self.server = yaml.safe_load(self.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def debug(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The emulator's `/_sandbox/<path>` (GET, or POST with a body)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.server}/_sandbox/{path}", data=data, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=CALL_TIMEOUT) as resp:
                result: dict[str, Any] = json.loads(resp.read())
                return result
        except TimeoutError as exc:
            raise Hung(f"/_sandbox/{path} unanswered after {CALL_TIMEOUT:g}s\n{self.diagnose()}") from exc

    def diagnose(self) -> str:
        """The sandbox's thread stacks and process tree (a child stuck between fork and exec still shows the
        sandbox's command line), then its log's tail."""
        proc = self.process.proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            return f"the sandbox is not running (exit {code}):\n{self.process.tail(40)}"
        offset = len(self.logs())
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "File " not in self.logs()[offset:] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the rest of the dump
        stacks = self.logs()[offset:] or "(no stacks printed within 10 s)\n"
        return f"sandbox (pid {proc.pid}) threads:\n{stacks}its processes:\n{process_tree(proc.pid)}"

    def stop(self) -> None:
        self.process.stop(grace=30)


class EmulatorBackend:
    """The API emulator (`gpujob sandbox` as a child process) injects the faults itself."""

    name = "emulator"
    namespace = "default"
    operator_args: tuple[str, ...] = ()

    def __init__(self, tmp: Path) -> None:
        self.sandbox = Sandbox(tmp)

    def start(self) -> None:
        self.sandbox.start()
        self.kubeconfig = self.operator_kubeconfig = self.sandbox.kubeconfig

    def set_faults(self, faults: dict[str, Any]) -> None:
        self.sandbox.debug("faults", faults)

    def injected(self) -> dict[str, int]:
        injected: dict[str, int] = self.sandbox.debug("faults")["injected"]
        return injected

    def diagnose(self) -> str:
        return self.sandbox.diagnose()

    def logs(self) -> str:
        return self.sandbox.logs()

    operator_serving = None

    def stop(self) -> None:
        self.sandbox.stop()


class KubernetesBackend:
    """The session's real control plane, a fresh namespace, and the fault proxy in front of kube-apiserver for
    the operator (with the chart's ServiceAccount token); the test's clients go to kube-apiserver directly."""

    name = "kubernetes"

    def __init__(self, tmp: Path, session: KubeSession, namespace: str) -> None:
        self.session, self.namespace = session, namespace
        self.operator_args = ("--namespace", namespace)
        cp = session.sandbox.cp
        assert cp is not None
        self.cp = cp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "gpujob.sandbox.faultproxy", "--upstream", cp.url, "--ca", str(cp.serving_ca),
                "--port", str(self.port)]  # fmt: skip
        self.proxy = ManagedProcess("fault proxy", argv, lambda: port_open(self.port), tmp / "faultproxy.log")
        self.kubeconfig = session.sandbox.write_kubeconfig(tmp / "admin.kubeconfig", namespace)
        self.operator_kubeconfig = write_kubeconfig(
            tmp / "operator.kubeconfig", self.url, namespace, token=session.operator_token
        )

    def start(self) -> None:
        self.proxy.start(timeout=30)

    def _faults(self, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/_sandbox/faults", data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as resp:
            result: dict[str, Any] = json.loads(resp.read())
            return result

    def set_faults(self, faults: dict[str, Any]) -> None:
        self._faults(faults)

    def injected(self) -> dict[str, int]:
        injected: dict[str, int] = self._faults()["injected"]
        return injected

    def diagnose(self) -> str:
        parts = [f"--- {name}:\n{self.cp.logs(name, 15)}" for name in ("kube-apiserver", "etcd")]
        parts += [f"--- kubelet {a.name}:\n{a.process.tail(15)}" for a in self.session.sandbox.agents]
        return "\n".join([*parts, f"--- fault proxy:\n{self.proxy.tail(15)}"])

    def logs(self) -> str:
        return self.proxy.log_path.read_text(errors="replace") if self.proxy.log_path.exists() else ""

    def operator_serving(self) -> Callable[[], bool]:
        """A check, from now on: kopf has listed GpuJobs through the proxy (200), so its discovery found them.
        An operator (re)started while kube-apiserver is coming back can get an incomplete /apis (the CRD's group
        not yet in discovery) and 403s (RBAC caches not yet synced); kopf then logs "Unresolved resources cannot
        be served" and never serves GpuJobs until it is restarted (found by this suite, left to the operator to
        fix). The run therefore lets a restarted operator finish its discovery before a real fault."""
        offset = self.proxy.log_path.stat().st_size if self.proxy.log_path.exists() else 0
        needle = f'"GET /apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}?'

        def listed() -> bool:
            with self.proxy.log_path.open(errors="replace") as log:
                log.seek(offset)
                return any(needle in line and '" 200 ' in line and "kopf/" in line for line in log)

        return listed

    def stop(self) -> None:
        self.proxy.stop()


def process_tree(root: int) -> str:
    """pid, state, kernel wait channel and command line of `root` and of its descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    lines, queue = [], [root]
    while queue:
        pid = queue.pop()
        queue += [child for child, parent in parents.items() if parent == pid]
        base = Path("/proc", str(pid))
        try:
            state = (base / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (base / "wchan").read_text() or "-"
            cmd = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
        except (OSError, IndexError):
            continue
        lines.append(f"  {pid} {state} {wchan} {cmd}")
    return "\n".join(lines) + "\n"


# The operator with the same hook, plus SIGUSR2: every asyncio task's stack, appended to the file named in
# CHAOS_TASKS_FILE (where a reconcile waits when a job never finishes).
OPERATOR_BOOT = """
import asyncio, faulthandler, os, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)
def dump_tasks(signum, frame):
    with open(os.environ["CHAOS_TASKS_FILE"], "a") as out:
        for task in asyncio.all_tasks():
            print(f"--- {task.get_name()}", file=out)
            task.print_stack(limit=12, file=out)
signal.signal(signal.SIGUSR2, dump_tasks)
from gpujob.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Operator:
    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        args: tuple[str, ...] = (),
        serving: Callable[[], Callable[[], bool]] | None = None,
    ) -> None:
        self.env, self.log, self.proc = env, log, None  # type: subprocess.Popen[bytes] | None
        self.args, self.serving = args, serving  # `serving()`: a check that the started operator serves GpuJobs
        self.tasks_file = log.with_name("operator-tasks.txt")
        self.env["CHAOS_TASKS_FILE"] = str(self.tasks_file)
        self.starts = 0

    def tasks(self) -> str:
        """Where the operator's coroutines wait now: a summary (frames shared by most tasks first)."""
        if self.proc is None or self.proc.poll() is not None:
            return "the operator is not running"
        size = self.tasks_file.stat().st_size if self.tasks_file.exists() else 0
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while (self.tasks_file.stat().st_size if self.tasks_file.exists() else 0) == size:
            if time.monotonic() > deadline:
                return "the operator printed no tasks within 10 s (its event loop is blocked?)"
            time.sleep(0.1)
        time.sleep(1)
        dump = self.tasks_file.read_text(errors="replace")[size:]
        lines = Counter(line.strip() for line in dump.splitlines() if line.strip().startswith("File "))
        top = "\n".join(f"  {n:5d} {line[:200]}" for line, n in lines.most_common(25))
        return f"operator tasks ({dump.count('--- ')}, full dump in {self.tasks_file}), commonest frames:\n{top}"

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        serving = self.serving() if self.serving is not None else None
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", OPERATOR_BOOT, "operator", *self.args],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + 60
        while not records(self.log.read_text(errors="replace")[offset:], "operator started"):
            assert self.proc.poll() is None, f"operator exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "operator did not start"
            time.sleep(0.05)
        if serving is not None:
            wait_for(serving, 60, 0.1, what="the restarted operator to list GpuJobs")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def monitor_pods(api: client.ApiClient, namespace: str, chaos: Chaos, stop: threading.Event) -> None:
    """At most one running Pod per GpuJob at any time, as seen on the watch stream. A Pod of a SIGKILLed node
    agent stays Running in the API until the agent is back, but its process died with the agent: not counted."""
    core = client.CoreV1Api(api)
    phases: dict[str, tuple[str, str]] = {}  # pod -> (job, phase)
    resource_version = ""
    while not stop.is_set():
        try:
            stream = watch.Watch().stream(
                core.list_namespaced_pod,
                namespace,
                label_selector=f"{Label.MANAGED_BY}={MANAGER}",
                resource_version=resource_version,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(CALL_TIMEOUT, CALL_TIMEOUT),  # a read silent this long: a hung server
            )
            for event in stream:
                pod = event["object"]
                resource_version = pod.metadata.resource_version
                job = pod.metadata.labels.get(Label.JOB_NAME, "")
                disrupted = any(c.type == "DisruptionTarget" and c.status == "True"
                                for c in pod.status.conditions or [])  # fmt: skip
                chaos.last_seen[pod.metadata.name] = (pod.status.phase or "Pending", disrupted)
                if event["type"] == "DELETED":
                    phases.pop(pod.metadata.name, None)
                else:
                    phases[pod.metadata.name] = (job, pod.status.phase or "Pending")
                running = Counter(
                    j for name, (j, phase) in phases.items() if phase in RUNNING_PODS and name not in chaos.dead_pods
                )
                for j, count in running.items():
                    chaos.max_running_per_job[j] = max(chaos.max_running_per_job[j], count)
                if stop.is_set():
                    return
        except Exception as exc:  # a cut stream: resume (from scratch if the version is gone)
            chaos.monitor_errors[type(exc).__name__] += 1
            resource_version = ""
            stop.wait(0.2)  # the apiserver may be restarting: don't spin


class RealFaults:
    """The real control plane's own faults, done at points of the plan (kubernetes backend)."""

    def __init__(
        self,
        backend: KubernetesBackend,
        core: client.CoreV1Api,
        custom: client.CustomObjectsApi,
        chaos: Chaos,
        bounded: Callable[..., Any],
        submit_job: Callable[[str, bool, str], None],
    ) -> None:
        self.backend, self.core, self.custom, self.chaos = backend, core, custom, chaos
        self.bounded, self.submit_job = bounded, submit_job
        self.sandbox = backend.session.sandbox

    def inflict(self, kind: str, i: int) -> None:
        t0 = time.monotonic()
        if kind in {"kube-apiserver", "etcd"}:
            self.backend.cp.restart(kind)
        elif kind == "node-kill":
            self.node_kill(i)
        else:
            self.drain(i)
        self.chaos.real_faults[kind] += 1
        print(f"chaos: {kind} at plan step {i} took {time.monotonic() - t0:.0f}s", flush=True)

    def _jobs(self) -> dict[str, dict[str, Any]]:
        """GpuJob name -> the GpuJob."""
        listing = self.bounded("list GpuJobs", self.custom.list_namespaced_custom_object, GROUP, VERSION,
                               self.backend.namespace, PLURAL)  # fmt: skip
        return {j["metadata"]["name"]: j for j in listing["items"]}

    def _running(self, node: str | None = None) -> list[client.V1Pod]:
        """The job Pods running (not being deleted) on `node` (any node)."""
        pods = self.bounded("list Pods", self.core.list_namespaced_pod, self.backend.namespace,
                            label_selector=f"{Label.MANAGED_BY}={MANAGER}").items  # fmt: skip
        return [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp
                and p.spec.node_name and node in {None, p.spec.node_name}]  # fmt: skip

    def _busy_node(self, i: int) -> tuple[str, list[client.V1Pod]]:
        """Submit a few long jobs and wait until one runs: its node, and that node's long-job Pods."""
        for k in range(LONG_JOBS):
            self.submit_job(f"chaos-{i:05d}-long-{k}", False, str(LONG_SLEEP))

        def busy() -> tuple[str, list[client.V1Pod]] | None:
            jobs = self._jobs()
            by_node: dict[str, list[client.V1Pod]] = defaultdict(list)
            for pod in self._running():
                job = jobs.get(pod.metadata.labels.get(Label.JOB_NAME, "")) or {}
                if "-long-" in job.get("spec", {}).get("jobId", ""):
                    by_node[pod.spec.node_name].append(pod)
            return max(by_node.items(), key=lambda item: len(item[1]), default=None)

        found: tuple[str, list[client.V1Pod]] = wait_for(busy, NODE_TIMEOUT, 0.2, what="a node running long jobs")
        return found

    def node_kill(self, i: int) -> None:
        """SIGKILL a node agent with running jobs: each loses its Pod, and must get a new attempt elsewhere while
        the node is still gone (NotReady after 15 s, taint-based eviction 10 s later). Then the agent comes back."""
        node, _ = self._busy_node(i)
        agent = next(a for a in self.sandbox.agents if a.name == node)
        agent.kill()
        try:
            lost = {p.metadata.name: p.metadata.labels for p in self._running(node)}
            self.chaos.dead_pods |= set(lost)  # their processes died with the agent (parent-death signal)
            held = {pod: (labels[Label.JOB_NAME], int(labels[Label.ATTEMPT])) for pod, labels in lost.items()}

            def ended_first(pod: str) -> bool:
                """The agent's last status write (the Pod ended by itself) was in flight when it was killed: listed
                Running, then Succeeded/Failed without DisruptionTarget. Its job rightly ends with that attempt."""
                phase, disrupted = self.chaos.last_seen.get(pod, ("", False))
                return phase in {"Succeeded", "Failed"} and not disrupted

            def replaced() -> bool:
                jobs = self._jobs()
                return all((jobs[name].get("status") or {}).get("attempts", 0) > n or ended_first(pod)
                           for pod, (name, n) in held.items())  # fmt: skip

            wait_for(replaced, NODE_TIMEOUT, 0.5, what=f"new attempts for the jobs of lost node {node}: {held}")
            victims = {name for pod, (name, _) in held.items() if not ended_first(pod)}
            for name in victims:
                self.chaos.victims[name] = "node-kill"
            self.chaos.took["node-kill"] += len(victims)
        finally:
            agent.start()  # the node comes back and finishes the deletions it missed
            self.sandbox.wait_nodes_ready(NODE_TIMEOUT)

    def drain(self, i: int) -> None:
        """`kubectl drain` a node with running long jobs (the Eviction API), then uncordon it."""
        node, pods = self._busy_node(i)
        kubeconfig = self.backend.kubeconfig
        try:
            result = run_kubectl(kubeconfig, "drain", node, "--ignore-daemonsets", "--delete-emptydir-data",
                                 "--timeout=120s", timeout=150)  # fmt: skip
            assert result.returncode == 0, f"kubectl drain {node} failed:\n{result.stderr}"
        finally:
            uncordon = run_kubectl(kubeconfig, "uncordon", node)
            assert uncordon.returncode == 0, uncordon.stderr
        for pod in pods:  # victims once their fate is known (see the checks): killed, or finished first
            self.chaos.drained_pods[pod.metadata.name] = pod.metadata.labels[Label.JOB_NAME]


def poison(i: int) -> list[dict[Any, Any]]:
    """Malformed requests a backend (or anyone who can XADD) may send; each must be dead-lettered once, with a
    reason, while the intake goes on (issue 12 item 1): bad JSON, missing fields, invalid specs, bytes that are
    not UTF-8 (in a value and in a field name), JSON nested beyond the parser's recursion limit, params nested
    past the depth limit or past 64 KiB, and an entry over the intake's 512 KiB read limit."""
    deep: Any = "leaf"
    for _ in range(300):
        deep = {"d": deep}
    return [
        {"job": "{oops"},
        {"nojob": "1"},
        {"job": '{"jobId": "x"}'},
        {"job": json.dumps({"jobId": f"bad-{i}", "type": "custom", "gpus": -3})},
        {"job": b"\xff\xfe{not utf-8"},
        {b"\xff\xfe": b"\xc3\x28"},
        {"job": "[" * 5000},
        {"job": json.dumps({"jobId": f"deep-{i}", "type": "custom", "command": ["true"], "params": deep})},
        {
            "job": json.dumps(
                {"jobId": f"fat-{i}", "type": "custom", "command": ["true"], "params": {"x": "y" * 70_000}}
            )
        },
        {"job": "z" * (600 * 1024)},
    ]


def submit(r: redis.Redis, fields: dict[Any, Any]) -> None:
    """XADD as a backend would, retrying while Redis restarts (a retried XADD may duplicate: the bridge dedupes)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            r.xadd("gpujobs:requests", fields)
            return
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() > deadline:
                raise AssertionError("Redis never came back") from None
            time.sleep(0.1)


@pytest.mark.parametrize("backend", ["emulator", "kubernetes"])
def test_chaos_nothing_lost_nothing_doubled(tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> None:
    size = SIZES[request.config.getoption("--chaos-size")]
    seed = chaos_seed()
    print(f"\nchaos ({backend}): seed {seed} (replay: {SEED_ENV}={seed}, or make chaos SEED={seed})", flush=True)
    faulthandler.dump_traceback_later(BACKSTOP - 60, exit=False)  # this process's threads, before the backstop
    target: EmulatorBackend | KubernetesBackend
    if backend == "kubernetes":
        session: KubeSession = request.getfixturevalue("kube_session")
        target = KubernetesBackend(tmp_path, session, request.getfixturevalue("kube_namespace"))
    else:
        target = EmulatorBackend(tmp_path)
    try:
        run_chaos(tmp_path, size, seed, target)
    except BaseException as exc:
        exc.add_note(f"chaos seed {seed}: replay with {SEED_ENV}={seed} (make chaos SEED={seed})")
        print(f"\nchaos: FAILED with seed {seed}", flush=True)
        raise
    finally:
        faulthandler.cancel_dump_traceback_later()


def run_chaos(tmp_path: Path, size: dict[str, int], seed: int, sandbox: EmulatorBackend | KubernetesBackend) -> None:
    started = time.monotonic()
    rng = random.Random(seed)
    namespace = sandbox.namespace
    redis_server = RedisServer(appendonly=True, workdir=tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis_server.start()
    try:
        sandbox.start()
    except BaseException:
        redis_server.stop()
        raise

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_")}
    env.update(KUBECONFIG=str(sandbox.operator_kubeconfig), GPUJOB_REDIS_URL=redis_server.url,
               GPUJOB_NAMESPACE=namespace, GPUJOB_LOG_FORMAT="json", GPUJOB_METRICS_PORT="0",
               GPUJOB_CLAIM_IDLE_MS="2000", GPUJOB_READ_BLOCK_MS="200")  # fmt: skip
    # Per-job credentials (issue 15): each job asks for a Redis user of its own; none may be left at the end.
    env.update(GPUJOB_CREDENTIALS_MODE="on", GPUJOB_CREDENTIALS_SWEEP_INTERVAL="2")
    operator = Operator(env, tmp_path / "operator.log", sandbox.operator_args, sandbox.operator_serving)
    api = config.new_client_from_config(str(sandbox.kubeconfig))
    api.user_agent = "gpujob-chaos-monitor/1"
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    chaos = Chaos()
    stop = threading.Event()
    monitor = threading.Thread(target=monitor_pods, args=(api, namespace, chaos, stop), daemon=True)
    r = redis.Redis.from_url(
        redis_server.url, decode_responses=True, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
    )

    def bounded(what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One API call, answered within CALL_TIMEOUT or the run fails as hung, with the sandbox's stacks."""
        t0 = time.monotonic()
        try:
            result = call(*args, _request_timeout=(CALL_TIMEOUT, CALL_TIMEOUT), **kwargs)
        except (urllib3.exceptions.TimeoutError, urllib3.exceptions.MaxRetryError, TimeoutError) as exc:
            waited = time.monotonic() - t0
            raise Hung(f"{what}: no answer from the API after {waited:.0f}s ({exc!r})\n{sandbox.diagnose()}") from exc
        chaos.slowest[what] = max(chaos.slowest.get(what, 0.0), time.monotonic() - t0)
        return result

    expected: dict[str, str] = {}
    malformed = 0

    def submit_job(job_id: str, fails: bool, sleep: str) -> None:
        command = ["sh", "-c", f"sleep {sleep}; exit {3 if fails else 0}"]
        spec = {"jobId": job_id, "type": "custom", "gpus": 0, "command": command,
                "retries": {"limit": 1, "backoffSeconds": 0}, "credentials": {"redis": True}}  # fmt: skip
        submit(r, {"job": json.dumps(spec)})
        if rng.random() < 0.05:
            submit(r, {"job": json.dumps(spec)})  # the backend retried its XADD
        expected[job_id] = "Failed" if fails else "Succeeded"

    real: RealFaults | None = None
    if isinstance(sandbox, KubernetesBackend):
        real = RealFaults(sandbox, core, custom, chaos, bounded, submit_job)
    real_at: dict[int, str] = {}
    try:
        sandbox.set_faults({**FAULTS, "seed": seed})
        operator.start()
        monitor.start()
        plan = ["job"] * size["jobs"] + ["junk"] * size["malformed"]
        rng.shuffle(plan)
        kill_at = set(rng.sample(range(len(plan)), size["kills"]))
        restart_at = set(rng.sample(range(len(plan)), size["redis_restarts"]))
        if real is not None:  # distinct points, drawn after the emulator's plan (its seeds replay as before)
            kinds = [kind for kind in REAL_FAULTS for _ in range(size["real_faults"])]
            real_at = dict(zip(rng.sample(range(len(plan)), len(kinds)), kinds, strict=True))
        for i, kind in enumerate(plan):
            if kind == "junk":
                submit(r, rng.choice(poison(i)))
                malformed += 1
            else:
                fails = rng.random() < 0.2
                submit_job(f"chaos-{i:05d}", fails, f"0.{rng.randint(0, 3)}")
            if real is not None and i in real_at:
                real.inflict(real_at[i], i)
            if i in kill_at:
                operator.kill()
                chaos.kills += 1
                time.sleep(rng.random())
                operator.start()
            if i in restart_at:
                redis_server.restart()
                chaos.redis_restarts += 1
            time.sleep(0.002)
        submitted = time.monotonic()

        def gpujobs() -> list[dict[str, Any]]:
            listing = bounded("list GpuJobs", custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)
            items: list[dict[str, Any]] = listing["items"]
            return items

        def stuck(job_ids: list[str]) -> str:
            """What a few unfinished jobs look like, and what the operator logged that it should not have."""
            by_id = {j["spec"].get("jobId"): j for j in gpujobs()}
            lines = []
            for job_id in job_ids:
                status = (by_id.get(job_id) or {}).get("status") or {}
                pod = status.get("podName")
                pod_phase = "-"
                if pod:
                    with contextlib.suppress(client.ApiException):
                        pod_phase = bounded("read Pod", core.read_namespaced_pod, pod, namespace).status.phase
                lines.append(f"  {job_id}: {status.get('phase')} ({status.get('reason')}), pod {pod}: {pod_phase}")
            errors = [line for line in operator.log.read_text(errors="replace").splitlines() if "Traceback" in line]
            if errors:
                lines.append(f"the operator logged {len(errors)} exception(s), the first: {errors[0][:3000]}")
            lines.append(operator.tasks())
            return "\n".join(lines)

        def phases() -> dict[str, str]:
            return {j["spec"].get("jobId", j["metadata"]["name"]): (j.get("status") or {}).get("phase", "")
                    for j in gpujobs()}  # fmt: skip

        deadline = time.monotonic() + size["timeout"]
        progress, progressed = -1, time.monotonic()
        while True:
            t0 = time.monotonic()
            seen = phases()
            listed = time.monotonic() - t0
            done = [j for j in expected if seen.get(j) in TERMINAL]
            if len(done) == len(expected):
                break
            if len(done) != progress:
                progress, progressed = len(done), time.monotonic()
            stalled = time.monotonic() - progressed > STALL_SECONDS
            if stalled or time.monotonic() > deadline:
                unfinished = [j for j in expected if seen.get(j) not in TERMINAL]
                why = f"no job finished for {STALL_SECONDS:g}s" if stalled else f"not done after {size['timeout']}s"
                raise AssertionError(
                    f"{len(unfinished)} jobs not finished ({why}): "
                    f"{Counter(seen.get(j, 'missing') for j in unfinished)}\n{stuck(unfinished[:5])}"
                )
            # A list of 2,000 GpuJobs holds the API emulator's one event loop (the kubelet's too) for about a
            # second on a busy machine: polling back to back would starve what is being tested.
            time.sleep(max(0.5, 4 * listed))
        finished = time.monotonic()
        time.sleep(2)  # let trailing events land before the checks
        final = gpujobs()
        uids = {j["metadata"]["uid"] for j in final}
        statuses = {j["spec"].get("jobId"): j.get("status") or {} for j in final}
        names = {j["metadata"]["name"]: j["spec"].get("jobId") for j in final}
        pods = bounded("list Pods", core.list_namespaced_pod, namespace,
                       label_selector=f"{Label.MANAGED_BY}={MANAGER}").items  # fmt: skip
        orphans = [p.metadata.name for p in pods if not {o.uid for o in p.metadata.owner_references or []} & uids]

        def job_users() -> list[str]:
            return [u for u in r.execute_command("ACL", "USERS") if u.startswith("gpujob-job:")]

        with contextlib.suppress(TimeoutError):  # revoked when each job ended, or swept (every 2 s here)
            wait_for(lambda: not job_users(), 30, what="every job's Redis user deleted")
        leaked = job_users()
        injected = sandbox.injected()
    finally:
        stop.set()
        operator.stop()
        sandbox_log = sandbox.logs()
        sandbox.stop()
        redis_server.stop()
        r.close()
        if monitor.is_alive():
            monitor.join(CALL_TIMEOUT + WATCH_SECONDS)

    after = r_after(redis_server)
    try:
        # 1. every valid request has exactly one GpuJob (and no GpuJob came from nowhere)
        jobs = list(seen)
        assert sorted(j for j in jobs if j.startswith("chaos-")) == sorted(expected)
        assert all(j in expected for j in jobs), f"unexpected GpuJobs: {set(jobs) - set(expected)}"
        # 2. every GpuJob reached the right terminal phase, with its own failures counted once each and nothing
        #    taken from outside (an evicted, drained or lost Pod) counted as a failure
        wrong = {j: (seen[j], want) for j, want in expected.items() if seen[j] != want}
        assert not wrong, f"wrong outcomes: {wrong}"
        counted = {j: statuses[j].get("failures", 0) for j in expected}
        miscounted = {j: n for j, n in counted.items() if n != (2 if expected[j] == "Failed" else 0)}
        assert not miscounted, f"failures miscounted (job: failures): {miscounted}"
        # 2b. a Pod seen running on a node before its drain either was killed by the eviction (Failed with
        #     DisruptionTarget before it was removed, as a 1.27+ kubelet reports it: its job is a victim) or
        #     finished before the eviction reached it (Succeeded: its job rightly ends with that attempt; seen
        #     when the drain began late, 25 s after the Pods started, while the API server was restarting)
        killed = {p: j for p, j in chaos.drained_pods.items() if chaos.last_seen.get(p) == ("Failed", True)}
        finished_first = {p for p in chaos.drained_pods if chaos.last_seen.get(p, ("",))[0] == "Succeeded"}
        unmarked = {p: chaos.last_seen.get(p) for p in set(chaos.drained_pods) - set(killed) - finished_first}
        assert not unmarked, f"drained Pods last seen as (phase, DisruptionTarget): {unmarked}"
        for name in killed.values():
            chaos.victims.setdefault(name, "drain")
        chaos.took["drain"] += len(killed)
        for name, fault in chaos.victims.items():
            attempts = statuses[names[name]].get("attempts", 0)
            assert attempts >= 2, f"{name} lost its Pod to {fault} but has {attempts} attempt(s)"
        # 3. no Pod without its GpuJob, and at most one running Pod per GpuJob at any time
        assert not orphans, f"orphan pods: {orphans[:5]}"
        # 3b. every job has ended: none of the per-job Redis users the operator made is left
        assert not leaked, f"per-job Redis users left after every job ended: {leaked[:5]}"
        assert max(chaos.max_running_per_job.values(), default=0) <= 1, chaos.max_running_per_job.most_common(3)
        # ... and that check saw the Pods: a monitor that saw nothing would pass it (watch resumptions may miss a
        #     short Running phase now and then, hence 90 %)
        succeeded = [j for j, want in expected.items() if want == "Succeeded"]
        seen_running = [j for j in succeeded if label_value(job_name(j)) in chaos.max_running_per_job]
        assert len(seen_running) >= 0.9 * len(succeeded), f"the monitor saw {len(seen_running)}/{len(succeeded)}"
        # 4. every malformed entry was dead-lettered once, and nothing else (counted from the stream itself:
        #    a backend's retried XADD of a junk entry is a second entry, and deserves a second dead letter)
        raw = redis.Redis.from_url(redis_server.url, socket_timeout=REDIS_TIMEOUT)
        entries = raw.xrange("gpujobs:requests")  # bytes: the poison is not all UTF-8
        junk_ids = {i.decode() for i, f in entries if not f.get(b"job", b"").startswith(b'{"jobId": "chaos-')}
        dead = [(i, {k.decode(errors="replace"): v.decode(errors="replace") for k, v in f.items()})
                for i, f in raw.xrange("gpujobs:requests:dead")]  # fmt: skip
        raw.close()
        sources = [f["sourceId"] for _, f in dead]
        assert len(sources) == len(set(sources)), "an entry was dead-lettered twice"
        assert set(sources) == junk_ids, [f["reason"] for _, f in dead if f["sourceId"] not in junk_ids][:5]
        assert len(junk_ids) >= malformed and all(f.get("reason") for _, f in dead)
        # 5. the operator recovers: it never gives up on a job, and under these faults no reconcile needed more
        # than a few retries in a row (more would mean a job stuck behind an error, not a fault riding out)
        retried = records(operator.log.read_text(errors="replace"), "reconcile failed, retrying")
        retries = [r["retry"] for r in retried]
        assert max(retries, default=0) <= RETRIES_IN_A_ROW
        # 6. every job's events are in order, queued first and one terminal event last
        events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for _, f in after.xrange("gpujobs:events"):
            events[f["jobId"]].append(json.loads(f["event"]))
        for job_id, evs in events.items():
            seqs = [e["seq"] for e in evs]
            assert seqs == sorted(set(seqs)), f"{job_id}: events out of order {seqs}"
    finally:
        after.close()
        redis_server.stop()
    # Every traceback in the sandbox's log is an injected fault's (one injected fault must not excuse others).
    uninjected = [t for t in map(traceback_of, sandbox_log.split("Traceback (most recent call last):")[1:])
                  if "injected" not in t]  # fmt: skip
    assert not uninjected, f"tracebacks in the sandbox log that no injected fault explains: {uninjected[:3]}"

    assert sum(injected.values()) > 0, "no fault was injected: the run proved nothing"
    if real is not None:
        assert sorted(chaos.real_faults.elements()) == sorted(real_at.values())
        # (counted per fault: a job drained and later lost with its node is the victim of both)
        assert chaos.took["node-kill"] > 0, "the lost node took no running job"
        assert chaos.took["drain"] > 0, "the drain took no running job"
    print(f"\nchaos ({sandbox.name}): seed {seed}, {len(expected)} jobs, {malformed} malformed, {chaos.kills} "
          f"operator kills, {chaos.redis_restarts} Redis restarts, real faults {dict(chaos.real_faults)} "
          f"({len(chaos.victims)} jobs lost a Pod to them), faults injected {injected}; monitor watch errors "
          f"{dict(chaos.monitor_errors)}; slowest API answers {({k: round(v, 1) for k, v in chaos.slowest.items()})}"
          f"; submitted in {submitted - started:.0f}s, all finished {finished - submitted:.0f}s later; "
          "invariant violations: 0")  # fmt: skip


def r_after(server: RedisServer) -> redis.Redis:
    """Read the streams back after the run (Redis stopped: start it again on its AOF)."""
    server.process.start()
    client = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=REDIS_TIMEOUT)
    deadline = time.monotonic() + 30
    while True:  # the AOF is replayed before Redis answers
        try:
            client.ping()
            return client
        except redis.BusyLoadingError:
            assert time.monotonic() < deadline, "Redis did not load its AOF within 30 s"
            time.sleep(0.1)


def traceback_of(block: str) -> str:
    """One logged traceback: its frames up to and including the exception line (the first unindented line;
    anything after it is other log lines, interleaved)."""
    lines = block.splitlines()[1:]
    end = next((i for i, line in enumerate(lines) if line and not line[0].isspace()), len(lines) - 1)
    return "\n".join(lines[: end + 1])
