"""Chaos: N jobs flow from the stream to completion while the operator is SIGKILLed at random moments and
restarted, Redis is restarted (AOF on), and the API server injects 500s, 429s, status-write conflicts, cut
watch streams and 410s on resume. The invariants are checked at the end. Small in `make test`; `make chaos`
runs the full size (`--chaos-size=full`).

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
import re
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
from gpujob.operator.reconciler import MAX_ERROR_RETRIES
from gpujob.sandbox.procs import ManagedProcess, RedisServer

SIZES = {
    "small": {"jobs": 40, "kills": 3, "redis_restarts": 1, "malformed": 10, "timeout": 240},
    "full": {"jobs": 2000, "kills": 20, "redis_restarts": 2, "malformed": 100, "timeout": 1800},
}
SEED_ENV = "CHAOS_SEED"
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
    max_running_per_job: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
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
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log, self.proc = env, log, None  # type: subprocess.Popen[bytes] | None
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
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", OPERATOR_BOOT, "operator"], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + 60
        while "operator started" not in self.log.read_text(errors="replace")[offset:]:
            assert self.proc.poll() is None, f"operator exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "operator did not start"
            time.sleep(0.05)

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


def monitor_pods(api: client.ApiClient, chaos: Chaos, stop: threading.Event) -> None:
    """At most one running Pod per GpuJob at any time, as seen on the watch stream."""
    core = client.CoreV1Api(api)
    phases: dict[str, tuple[str, str]] = {}  # pod -> (job, phase)
    resource_version = ""
    while not stop.is_set():
        try:
            stream = watch.Watch().stream(
                core.list_pod_for_all_namespaces,
                label_selector=f"{Label.MANAGED_BY}={MANAGER}",
                resource_version=resource_version,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(CALL_TIMEOUT, CALL_TIMEOUT),  # a read silent this long: a hung server
            )
            for event in stream:
                pod = event["object"]
                resource_version = pod.metadata.resource_version
                job = pod.metadata.labels.get(Label.JOB_NAME, "")
                if event["type"] == "DELETED":
                    phases.pop(pod.metadata.name, None)
                else:
                    phases[pod.metadata.name] = (job, pod.status.phase or "Pending")
                running = Counter(j for j, phase in phases.values() if phase in RUNNING_PODS)
                for j, count in running.items():
                    chaos.max_running_per_job[j] = max(chaos.max_running_per_job[j], count)
                if stop.is_set():
                    return
        except Exception as exc:  # a cut stream: resume (from scratch if the version is gone)
            chaos.monitor_errors[type(exc).__name__] += 1
            resource_version = ""


def submit(r: redis.Redis, fields: dict[str, str]) -> None:
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


def test_chaos_nothing_lost_nothing_doubled(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    size = SIZES[request.config.getoption("--chaos-size")]
    seed = chaos_seed()
    print(f"\nchaos: seed {seed} (replay: {SEED_ENV}={seed}, or make chaos SEED={seed})", flush=True)
    faulthandler.dump_traceback_later(BACKSTOP - 60, exit=False)  # this process's threads, before the backstop
    try:
        run_chaos(tmp_path, size, seed)
    except BaseException as exc:
        exc.add_note(f"chaos seed {seed}: replay with {SEED_ENV}={seed} (make chaos SEED={seed})")
        print(f"\nchaos: FAILED with seed {seed}", flush=True)
        raise
    finally:
        faulthandler.cancel_dump_traceback_later()


def run_chaos(tmp_path: Path, size: dict[str, int], seed: int) -> None:
    started = time.monotonic()
    rng = random.Random(seed)
    redis_server = RedisServer(appendonly=True, workdir=tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis_server.start()
    sandbox = Sandbox(tmp_path)
    try:
        sandbox.start()
    except BaseException:
        redis_server.stop()
        raise

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_")}
    env.update(KUBECONFIG=str(sandbox.kubeconfig), GPUJOB_REDIS_URL=redis_server.url, GPUJOB_LOG_FORMAT="json",
               GPUJOB_METRICS_PORT="0", GPUJOB_CLAIM_IDLE_MS="2000", GPUJOB_READ_BLOCK_MS="200")  # fmt: skip
    operator = Operator(env, tmp_path / "operator.log")
    api = config.new_client_from_config(str(sandbox.kubeconfig))
    api.user_agent = "gpujob-chaos-monitor/1"
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    chaos = Chaos()
    stop = threading.Event()
    monitor = threading.Thread(target=monitor_pods, args=(api, chaos, stop), daemon=True)
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
    try:
        sandbox.debug("faults", {**FAULTS, "seed": seed})
        operator.start()
        monitor.start()
        plan = ["job"] * size["jobs"] + ["junk"] * size["malformed"]
        rng.shuffle(plan)
        kill_at = set(rng.sample(range(len(plan)), size["kills"]))
        restart_at = set(rng.sample(range(len(plan)), size["redis_restarts"]))
        for i, kind in enumerate(plan):
            if kind == "junk":
                junk = [{"job": "{oops"}, {"nojob": "1"}, {"job": '{"jobId": "x"}'},
                        {"job": json.dumps({"jobId": f"bad-{i}", "type": "custom", "gpus": -3})}]  # fmt: skip
                submit(r, rng.choice(junk))
                malformed += 1
            else:
                job_id = f"chaos-{i:05d}"
                fails = rng.random() < 0.2
                command = ["sh", "-c", f"sleep 0.{rng.randint(0, 3)}; exit {3 if fails else 0}"]
                spec = {"jobId": job_id, "type": "custom", "gpus": 0, "command": command,
                        "retries": {"limit": 1, "backoffSeconds": 0}}  # fmt: skip
                submit(r, {"job": json.dumps(spec)})
                if rng.random() < 0.05:
                    submit(r, {"job": json.dumps(spec)})  # the backend retried its XADD
                expected[job_id] = "Failed" if fails else "Succeeded"
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
            listing = bounded("list GpuJobs", custom.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL)
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
                        pod_phase = bounded("read Pod", core.read_namespaced_pod, pod, "default").status.phase
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
        uids = {j["metadata"]["uid"] for j in gpujobs()}
        pods = bounded("list Pods", core.list_pod_for_all_namespaces,
                       label_selector=f"{Label.MANAGED_BY}={MANAGER}").items  # fmt: skip
        orphans = [p.metadata.name for p in pods if not {o.uid for o in p.metadata.owner_references or []} & uids]
        injected = sandbox.debug("faults")["injected"]
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
        # 2. every GpuJob reached the right terminal phase
        wrong = {j: (seen[j], want) for j, want in expected.items() if seen[j] != want}
        assert not wrong, f"wrong outcomes: {wrong}"
        # 3. no Pod without its GpuJob, and at most one running Pod per GpuJob at any time
        assert not orphans, f"orphan pods: {orphans[:5]}"
        assert max(chaos.max_running_per_job.values(), default=0) <= 1, chaos.max_running_per_job.most_common(3)
        # 4. every malformed entry was dead-lettered once, and nothing else (counted from the stream itself:
        #    a backend's retried XADD of a junk entry is a second entry, and deserves a second dead letter)
        entries = after.xrange("gpujobs:requests")
        junk_ids = {i for i, f in entries if not f.get("job", "").startswith('{"jobId": "chaos-')}
        dead = after.xrange("gpujobs:requests:dead")
        sources = [f["sourceId"] for _, f in dead]
        assert len(sources) == len(set(sources)), "an entry was dead-lettered twice"
        assert set(sources) == junk_ids, [f["reason"] for _, f in dead if f["sourceId"] not in junk_ids][:5]
        assert len(junk_ids) >= malformed and all(f.get("reason") for _, f in dead)
        # 5. no reconcile retried beyond its cap
        retries = [int(n) for n in re.findall(r"; retry (\d+) in", operator.log.read_text(errors="replace"))]
        assert max(retries, default=0) <= MAX_ERROR_RETRIES
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
    assert "Traceback" not in sandbox_log or "sandbox: injected" in sandbox_log
    assert sum(injected.values()) > 0, "no fault was injected: the run proved nothing"
    print(f"\nchaos: seed {seed}, {len(expected)} jobs, {malformed} malformed, {chaos.kills} operator kills, "
          f"{chaos.redis_restarts} Redis restarts, faults injected {injected}; monitor watch errors "
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
