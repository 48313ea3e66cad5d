"""Chaos: N jobs flow from the stream to completion while the operator is SIGKILLed at random moments and
restarted, Redis is restarted (AOF on), and the API server injects 500s, 429s, status-write conflicts, cut
watch streams and 410s on resume. The invariants are checked at the end. Small in `make test`; `make chaos`
runs the full size (`--chaos-size=full`)."""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from kubernetes import client, config, watch

from gpujob.api.constants import GROUP, MANAGER, PLURAL, VERSION, Label
from gpujob.operator.reconciler import MAX_ERROR_RETRIES
from gpujob.sandbox.procs import ManagedProcess, RedisServer

pytestmark = pytest.mark.chaos

SIZES = {
    "small": {"jobs": 40, "kills": 3, "redis_restarts": 1, "malformed": 10, "timeout": 240},
    "full": {"jobs": 2000, "kills": 20, "redis_restarts": 2, "malformed": 100, "timeout": 1800},
}
FAULTS = {
    "error_500_rate": 0.03,
    "error_429_rate": 0.03,
    "retry_after_seconds": 1,
    "status_conflict_rate": 0.05,
    "watch_cut_rate": 0.002,
    "watch_gone_rate": 0.2,
    "agents": ["kopf", MANAGER],  # the operator's clients; the kubelet and this test's monitor are spared
    "seed": 7,
}
TERMINAL = {"Succeeded", "Failed", "Cancelled"}
RUNNING_PODS = {"Running"}


@dataclass
class Chaos:
    kills: int = 0
    redis_restarts: int = 0
    max_running_per_job: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


def start_sandbox(tmp: Path) -> tuple[ManagedProcess, Path]:
    kubeconfig = tmp / "kubeconfig"
    argv = [sys.executable, "-m", "gpujob.cli", "sandbox", "--kubeconfig", str(kubeconfig), "--no-redis", "--no-s3",
            "--gpus", "0", "--state-dir", str(tmp / "state")]  # fmt: skip
    log = tmp / "sandbox.log"
    proc = ManagedProcess("sandbox", argv, lambda: "ready" in log.read_text(errors="replace"), log)
    proc.start(timeout=60)
    return proc, kubeconfig


class Operator:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log, self.proc = env, log, None  # type: subprocess.Popen[bytes] | None
        self.starts = 0

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gpujob.cli", "operator"], env=self.env,
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
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
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
                timeout_seconds=5,
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
        except Exception:  # a cut stream: resume (from scratch if the version is gone)
            resource_version = ""


def submit(r: redis.Redis, fields: dict[str, str]) -> None:
    """XADD as a backend would, retrying while Redis restarts (a retried XADD may duplicate: the bridge dedupes)."""
    for _ in range(600):
        try:
            r.xadd("gpujobs:requests", fields)
            return
        except redis.ConnectionError:
            time.sleep(0.1)
    raise AssertionError("Redis never came back")


def test_chaos_nothing_lost_nothing_doubled(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    size = SIZES[request.config.getoption("--chaos-size")]
    rng = random.Random(42)
    redis_server = RedisServer(appendonly=True, workdir=tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis_server.start()
    sandbox, kubeconfig = start_sandbox(tmp_path)
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    post = urllib.request.Request(f"{server}/_sandbox/faults", data=json.dumps(FAULTS).encode(), method="POST")
    urllib.request.urlopen(post, timeout=10).read()

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_")}
    env.update(KUBECONFIG=str(kubeconfig), GPUJOB_REDIS_URL=redis_server.url, GPUJOB_LOG_FORMAT="json",
               GPUJOB_METRICS_PORT="0", GPUJOB_CLAIM_IDLE_MS="2000", GPUJOB_READ_BLOCK_MS="200")  # fmt: skip
    operator = Operator(env, tmp_path / "operator.log")
    operator.start()
    api = config.new_client_from_config(str(kubeconfig))
    api.user_agent = "gpujob-chaos-monitor/1"
    custom = client.CustomObjectsApi(api)
    chaos = Chaos()
    stop = threading.Event()
    monitor = threading.Thread(target=monitor_pods, args=(api, chaos, stop), daemon=True)
    monitor.start()
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)

    expected: dict[str, str] = {}
    malformed = 0
    try:
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

        def phases() -> dict[str, str]:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"]
            return {
                j["spec"].get("jobId", j["metadata"]["name"]): (j.get("status") or {}).get("phase", "") for j in items
            }

        deadline = time.monotonic() + size["timeout"]
        while True:
            seen = phases()
            done = [j for j in expected if seen.get(j) in TERMINAL]
            if len(done) == len(expected):
                break
            assert time.monotonic() < deadline, (
                f"{len(expected) - len(done)} jobs not finished: "
                f"{Counter(seen.get(j, 'missing') for j in expected if seen.get(j) not in TERMINAL)}"
            )
            time.sleep(0.5)
        time.sleep(2)  # let trailing events land before the checks
        uids = {
            j["metadata"]["uid"]
            for j in custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"]
        }
        pods = client.CoreV1Api(api).list_pod_for_all_namespaces(label_selector=f"{Label.MANAGED_BY}={MANAGER}").items
        orphans = [p.metadata.name for p in pods if not {o.uid for o in p.metadata.owner_references or []} & uids]
        with urllib.request.urlopen(f"{server}/_sandbox/faults", timeout=10) as resp:
            injected = json.loads(resp.read())["injected"]
    finally:
        stop.set()
        operator.stop()
        sandbox_log = (tmp_path / "sandbox.log").read_text(errors="replace")
        sandbox.stop()
        redis_server.stop()

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
    print(f"\nchaos: {len(expected)} jobs, {malformed} malformed, {chaos.kills} operator kills, "
          f"{chaos.redis_restarts} Redis restarts, faults injected {injected}; invariant violations: 0")  # fmt: skip


def r_after(server: RedisServer) -> redis.Redis:
    """Read the streams back after the run (Redis stopped: start it again on its AOF)."""
    server.process.start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    for _ in range(300):  # the AOF is replayed before Redis answers
        try:
            client.ping()
            return client
        except redis.BusyLoadingError:
            time.sleep(0.1)
    raise AssertionError("Redis did not load its AOF")
