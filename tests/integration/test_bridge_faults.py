"""The stream intake under faults, with real processes: a bridge SIGKILLed between its create and its XACK,
a flaky API server, replicas sharing the stream, Redis killed mid-run (with AOF: nothing acknowledged is
lost), a hypothesis corpus of junk through a live bridge, and the `gpujob submit` CLI."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpujob.api.constants import GROUP, PLURAL, VERSION, Annotation
from gpujob.api.naming import job_name
from gpujob.api.request import Action, Entry
from gpujob.bridge import intake
from gpujob.bridge.intake import Bridge
from gpujob.sandbox import EmulatorThread
from gpujob.sandbox.faults import RequestKey
from gpujob.sandbox.procs import RedisServer, free_port
from tests.support.bridge import bridge_settings, eventually, pending, request, running_bridge
from tests.support.operator import Cluster

STREAM, CGROUP, DEAD = "gpujobs:requests", "gpujob-operator", "gpujobs:requests:dead"
CREATE_GPUJOB = RequestKey("create", GROUP, PLURAL, "", True)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CRD = Path(__file__).resolve().parents[2] / "crds" / "gpujob.yaml"


def job_names(cluster: Cluster) -> list[str]:
    items = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"]
    return sorted(item["metadata"]["name"] for item in items)


def creates(emulator: Any) -> int:
    return int(emulator.request_counts().get(CREATE_GPUJOB, 0))


# --- a crash between the create and the XACK, for real: SIGKILL of a `gpujob bridge` process
class AckSwallowingProxy:
    """A TCP proxy in front of Redis. Once Redis has sent a reply holding `marker` (the entry id, in the read's
    reply), the client's commands from the first one holding `needle` on (the script that records the jobId as
    seen and acknowledges the entry, right after the create) are swallowed: the process has created the GpuJob
    but what follows never reaches Redis, until the test SIGKILLs it."""

    def __init__(self, upstream_port: int, marker: str, needle: bytes) -> None:
        self.upstream_port, self.marker = upstream_port, marker.encode()
        self.command = needle
        self.port = free_port()
        self.marked = threading.Event()
        self.holding = threading.Event()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump_up, args=(downstream, upstream), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(upstream, downstream), daemon=True).start()

    def _pump_up(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self.marked.is_set() and self.command in data:
                    self.holding.set()
                if not self.holding.is_set():
                    dst.sendall(data)

    def _pump_down(self, src: socket.socket, dst: socket.socket) -> None:
        tail = b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if self.marker in tail + data:
                    self.marked.set()  # before the client can see the reply and answer it
                tail = data[-len(self.marker) :]
                dst.sendall(data)

    def close(self) -> None:
        self._closed = True
        self._server.close()


def bridge_process(emulator: Any, redis_url: str, consumer: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_") and k != "KUBERNETES_SERVICE_HOST"}
    env.update(
        KUBECONFIG=str(emulator.kubeconfig),
        GPUJOB_REDIS_URL=redis_url,
        GPUJOB_CONSUMER_NAME=consumer,
        GPUJOB_READ_BLOCK_MS="100",
        GPUJOB_LOG_FORMAT="json",
    )
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "gpujob.cli", "bridge"], env=env, stdout=out, stderr=out)


@pytest.mark.parametrize("successor", ["bridge-a", "bridge-b"], ids=["restarted", "claimed-by-a-replica"])
async def test_sigkill_between_create_and_ack_gives_exactly_one_gpujob(
    emulator: Any, redis_server: RedisServer, redis_url: str, redis_client: redis.Redis, cluster: Cluster,
    tmp_path: Path, successor: str,
) -> None:  # fmt: skip
    """Killed after the create, before the one script that records the jobId as seen and acknowledges the
    entry: the redo's create finds the GpuJob (409) and only acks (two creates, one GpuJob)."""
    entry_id = redis_client.xadd(STREAM, request("killed-mid-flight", params={"epochs": 1}))
    finish = hashlib.sha1(intake.FINISH_SCRIPT.encode()).hexdigest().encode()  # what EVALSHA sends
    proxy = AckSwallowingProxy(redis_server.port, entry_id, finish)
    proc = bridge_process(emulator, proxy.url, "bridge-a", tmp_path / "bridge.log")
    try:
        await eventually(lambda: cluster.job("killed-mid-flight"), what="the GpuJob from the doomed bridge")
        assert proxy.holding.is_set() and pending(redis_client) == 1, "created but not acked"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proxy.close()
    [row] = redis_client.xpending_range(STREAM, CGROUP, min="-", max="+", count=10)
    assert row["consumer"] == "bridge-a" and row["message_id"] == entry_id
    async with running_bridge(bridge_settings(redis_url, consumer=successor)) as bridge:
        await eventually(lambda: pending(redis_client) == 0, what="the orphaned entry acked")
    assert bridge.stats.requests_total == {"duplicate": 1}, "the redo found the GpuJob and only acked"
    assert creates(emulator) == 2 and job_names(cluster) == ["killed-mid-flight"]
    assert redis_client.xlen(DEAD) == 0


# --- the API server misbehaves
async def test_flaky_api_server_loses_nothing_and_dead_letters_nothing(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    # ~40% of the API calls fail: retried (in place, then on re-delivery) until they pass, never dead-lettered.
    emulator.set_faults(error_500_rate=0.3, error_429_rate=0.15, resources=[PLURAL], seed=11)
    wanted = [f"flaky-{i}" for i in range(40)]
    for job_id in wanted:
        redis_client.xadd(STREAM, request(job_id))
    async with running_bridge(bridge_settings(redis_url)) as bridge:
        done = bridge.stats.requests_total
        await eventually(lambda: done["created"] + done["duplicate"] == len(wanted), timeout=60, what="all done")
        await eventually(lambda: pending(redis_client) == 0, what="every entry acked")
    emulator.set_faults(error_500_rate=0.0, error_429_rate=0.0)  # reads below are not the bridge's
    assert job_names(cluster) == sorted(wanted)
    assert bridge.stats.transient_errors_total > 0, "faults were injected"
    assert redis_client.xlen(DEAD) == 0


async def test_403s_while_the_api_server_warms_up_are_waited_out_not_dead_lettered(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    """Regression (chaos on the real control plane): a kube-apiserver that has just restarted answers 503, then
    403 to everyone until its authorizer's caches fill. Eight valid requests were dead-lettered as forbidden after
    four quick retries. 403s are now waited out for FORBIDDEN_PATIENCE seconds: 8 s of them (5xx first) pass."""
    faults = emulator.thread.emulator.faults
    emulator.set_faults(error_500_rate=1.0, resources=[PLURAL], agents=["gpujob-operator"])
    redis_client.xadd(STREAM, request("warming-up"))
    async with running_bridge(bridge_settings(redis_url)) as bridge:
        await eventually(lambda: faults.injected["500"] >= 2, what="500s while the API server is down")
        emulator.set_faults(error_500_rate=0.0, error_403_rate=1.0)
        await eventually(lambda: faults.injected["403"] >= 1, what="403s while its authorizer warms up")
        await asyncio.sleep(8)
        assert redis_client.xlen(DEAD) == 0 and pending(redis_client) == 1, "still waiting, not rejected"
        emulator.set_faults(error_403_rate=0.0)
        await eventually(lambda: bridge.stats.requests_total["created"] == 1, timeout=60, what="the GpuJob made")
    assert job_names(cluster) == ["warming-up"] and redis_client.xlen(DEAD) == 0 and pending(redis_client) == 0


async def test_a_namespace_the_operator_may_not_write_rejects_the_request_after_the_patience(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 403 that lasts (RBAC the operator lacks) rejects the request with the API server's reason, once the
    patience is spent, and the intake goes on with the next request."""
    monkeypatch.setattr(intake, "FORBIDDEN_PATIENCE", 2.0)
    emulator.set_faults(error_403_rate=1.0, resources=[PLURAL], agents=["gpujob-operator"])
    redis_client.xadd(STREAM, request("refused"))
    async with running_bridge(bridge_settings(redis_url)):
        await eventually(lambda: redis_client.xlen(DEAD) == 1, timeout=30, what="the refused request dead-lettered")
        emulator.set_faults(error_403_rate=0.0)
        redis_client.xadd(STREAM, request("after"))
        await eventually(lambda: job_names(cluster) == ["after"], timeout=30, what="the next request's GpuJob")
    [(_, dead)] = redis_client.xrange(DEAD)
    assert "rejected by the API server (403)" in dead["reason"] and "refused" in dead["job"]


# --- replicas share the stream
async def test_two_replicas_share_the_stream_and_create_each_gpujob_once(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    wanted = [f"shared-{i}" for i in range(120)]
    async with (
        running_bridge(bridge_settings(redis_url, "replica-a", read_batch=8)) as a,
        running_bridge(bridge_settings(redis_url, "replica-b", read_batch=8)) as b,
    ):
        for job_id in wanted:
            redis_client.xadd(STREAM, request(job_id))
        await eventually(lambda: len(job_names(cluster)) == len(wanted), timeout=60, what="every GpuJob")
        await eventually(lambda: pending(redis_client) == 0, what="every entry acked")
    assert job_names(cluster) == sorted(wanted)
    assert a.stats.requests_total["created"] + b.stats.requests_total["created"] == len(wanted)
    assert a.stats.requests_total["created"] > 0 and b.stats.requests_total["created"] > 0, "both did work"
    assert creates(emulator) == len(wanted), "no entry was handled twice"


# --- Redis killed mid-run, with AOF (appendfsync always): every acknowledged XADD becomes one GpuJob
@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(workdir=tmp_path, appendonly=True) as server:
        yield server


async def test_redis_killed_mid_run_with_aof_loses_no_acknowledged_request(
    emulator: Any, durable_redis: RedisServer, cluster: Cluster
) -> None:
    producer = redis.Redis.from_url(durable_redis.url, decode_responses=True, socket_timeout=2)
    accepted: list[str] = []

    def submit(job_id: str) -> None:
        """As a backend does: retry the XADD until Redis says yes (a retry may add the request twice)."""
        while True:
            try:
                producer.xadd(STREAM, request(job_id))
                accepted.append(job_id)
                return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                time.sleep(0.05)

    emulator.set_faults(latency_seconds=0.03)  # one create at a time, slowly: the kill lands mid-stream
    async with running_bridge(bridge_settings(durable_redis.url, read_batch=1, concurrency=1)) as bridge:
        for i in range(20):
            await asyncio.to_thread(submit, f"aof-{i}")
        await eventually(lambda: bridge.stats.requests_total["created"] >= 5, what="some requests handled")
        assert bridge.stats.requests_total["created"] < 20, "the kill must land while requests are waiting"
        assert durable_redis.process.proc is not None
        os.kill(durable_redis.process.proc.pid, signal.SIGKILL)  # a crash, not a clean shutdown
        durable_redis.process.proc.wait(10)
        durable_redis.process.start()
        for i in range(20, 40):
            await asyncio.to_thread(submit, f"aof-{i}")
        await eventually(lambda: job_names(cluster) == sorted(accepted), timeout=60, what="every accepted request")
        await eventually(lambda: pending(producer) == 0, timeout=30, what="every entry acked")
    assert producer.xlen(DEAD) == 0
    producer.close()


# --- a hypothesis corpus of junk through a live bridge
printable = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | printable,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(printable, inner, max_size=3),
    max_leaves=8,
)
near_valid = st.fixed_dictionaries(
    {"jobId": st.sampled_from(["ok-1", "ok-2", "-bad", "x" * 200, 7]), "type": st.sampled_from(["custom", "nope"])},
    optional={
        "gpus": st.sampled_from([0, 1, -1, 65, "2"]),
        "params": json_values,
        "env": st.sampled_from([[], [{"name": "GPUJOB_TOKEN", "value": "x"}], [{"value": "x"}], "env"]),
        "retries": st.sampled_from([{"limit": 1}, {"limit": -1}, {"foo": 1}, None]),
        "namespace": st.sampled_from(["default", "Bad_NS", "missing-ns"]),
        "hostPID": st.booleans(),
    },
).map(json.dumps)
junk_job = st.one_of(printable, json_values.map(json.dumps), near_valid)
junk_entry = st.one_of(
    st.dictionaries(printable.filter(bool), printable, min_size=1, max_size=3),
    st.builds(lambda job: {"job": job}, junk_job),
    st.builds(lambda job, action: {"job": job, "action": action}, junk_job, st.sampled_from(["cancel", "", "x"])),
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(corpus=st.lists(junk_entry, min_size=1, max_size=30))
def test_any_corpus_is_created_or_dead_lettered_with_a_reason_and_the_bridge_goes_on(
    emulator: Any, redis_url: str, cluster: Cluster, corpus: list[dict[str, str]]
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.flushall()
    # Each example starts from no GpuJobs: an earlier example's job must not satisfy this one's checks.
    cluster.custom.delete_collection_namespaced_custom_object("gpujob.dev", "v1alpha1", "default", "gpujobs")
    assert cluster.custom.list_namespaced_custom_object("gpujob.dev", "v1alpha1", "default", "gpujobs")["items"] == []
    ids = [r.xadd(STREAM, fields) for fields in corpus]
    sentinel = f"sentinel-{uuid.uuid4().hex[:8]}"
    sentinel_id = r.xadd(STREAM, request(sentinel))

    async def run() -> None:
        async with running_bridge(bridge_settings(redis_url)):
            await eventually(lambda: cluster.job(sentinel), what="the valid request after the corpus")
            await eventually(lambda: pending(r) == 0, what="every entry acked")

    asyncio.run(run())
    dead = {fields["sourceId"]: fields for _, fields in r.xrange(DEAD)}
    assert sentinel_id not in dead
    for entry_id, fields in zip(ids, corpus, strict=True):
        if entry_id in dead:
            assert dead[entry_id]["reason"] and dead[entry_id]["consumer"] == "bridge-a"
            assert all(dead[entry_id][k] == v for k, v in fields.items() if k not in ("reason", "sourceId"))
        else:  # it was valid: its GpuJob exists (created by it, or by an earlier entry with the same jobId)
            job_id = json.loads(fields["job"])["jobId"]
            job = cluster.job(job_name(job_id))
            if fields.get("action", "").strip().lower() == "cancel":  # applied, or remembered for its submit
                cancelled = job is not None and job["spec"].get("cancel") is True
                assert cancelled or r.exists(f"{STREAM}:cancel:default/{job_id}"), fields
            else:
                assert job is not None and job["spec"]["jobId"] == job_id
    r.close()


# --- gpujob submit, for people
def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_")}
    env["GPUJOB_REDIS_URL"] = redis_url
    argv = [sys.executable, "-m", "gpujob.cli", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


async def test_submit_and_cancel_from_the_command_line(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    done = cli(redis_url, "submit", "-t", "train_lora", "--job-id", "cli-1", "-p", "epochs=3", "-p", "baseModel=m",
               "-p", 'dataset={"text": ["x"]}',
               "--gpus", "2", "--priority-class-name", "gpu-high", "--queue", "team-a", "--priority", "5")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cli-1"
    from_file = cli(redis_url, "submit", "--file", str(EXAMPLES / "render-video.yaml"))
    assert from_file.returncode == 0, from_file.stderr
    generated = from_file.stdout.strip()
    bad = cli(redis_url, "submit", "-t", "mine_bitcoin")
    assert bad.returncode == 2 and "type" in bad.stderr
    assert redis_client.xlen(STREAM) == 2, "an invalid request is refused before it is sent"
    async with running_bridge(bridge_settings(redis_url)):
        job = await eventually(lambda: cluster.job("cli-1"), what="the GpuJob from flags")
        await eventually(lambda: cluster.job(job_name(generated)), what="the GpuJob from the file")
        assert (
            job["spec"]["params"] == {"epochs": 3, "baseModel": "m", "dataset": {"text": ["x"]}}
            and job["spec"]["gpus"] == 2
        )
        assert (job["spec"]["priorityClassName"], job["spec"]["queue"], job["spec"]["priority"]) == (
            "gpu-high",
            "team-a",
            5,
        )
        assert job["spec"]["priorityClassName"] == "gpu-high"
        assert job["metadata"]["annotations"][Annotation.REQUEST_ID] == redis_client.xrange(STREAM)[0][0]
        cancelled = cli(redis_url, "submit", "--cancel", "cli-1")
        assert cancelled.returncode == 0 and cancelled.stdout.strip() == "cli-1"
        await eventually(lambda: (cluster.job("cli-1") or {})["spec"].get("cancel") is True, what="spec.cancel")
        await eventually(lambda: pending(redis_client) == 0, what="every entry acked")
    assert redis_client.xlen(DEAD) == 0


def test_watch_without_redis_settings_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_")}
    done = subprocess.run([sys.executable, "-m", "gpujob.cli", "watch", "x"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2 and "GPUJOB_REDIS_URL" in done.stderr


# --- the CRD is not installed yet (first install, or an upgrade): requests wait, nothing is dead-lettered
async def test_requests_wait_for_the_crd_instead_of_being_dead_lettered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_client: redis.Redis
) -> None:
    with EmulatorThread() as bare:  # an API server without the GpuJob CRD
        monkeypatch.setenv("KUBECONFIG", str(bare.write_kubeconfig(tmp_path / "kubeconfig")))
        redis_client.xadd(STREAM, request("before-the-crd"))
        async with running_bridge(bridge_settings(redis_url)) as bridge:
            await eventually(lambda: bridge.stats.transient_errors_total >= 2, what="the create to be retried")
            assert redis_client.xlen(DEAD) == 0 and pending(redis_client) == 1
            bare.create_object(yaml.safe_load(CRD.read_text()))
            await eventually(lambda: pending(redis_client) == 0, timeout=30, what="the entry acked")
        assert bridge.stats.requests_total == {"created": 1}
        assert redis_client.xlen(DEAD) == 0


# --- two batches in flight: a jobId's entries still run in stream order across them
class SlowSubmits(Bridge):
    """The real bridge and API server, with a submit that takes a while to reach the API server (a slow
    network, a big body): without ordering, the cancel read in the next batch would overtake it."""

    async def _apply(self, entry: Entry, entry_id: str) -> str:
        if entry.action is Action.SUBMIT:
            await asyncio.sleep(0.3)
        return await super()._apply(entry, entry_id)


async def test_cancel_in_the_next_batch_waits_for_the_submit_in_flight(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    redis_client.xadd(STREAM, request("slow-submit"))
    redis_client.xadd(STREAM, {"job": json.dumps({"jobId": "slow-submit"}), "action": "cancel"})
    async with running_bridge(bridge_settings(redis_url, read_batch=1), SlowSubmits) as bridge:
        await eventually(lambda: sum(bridge.stats.requests_total.values()) == 2, what="both handled")
        await eventually(lambda: pending(redis_client) == 0, what="both acked")
    assert bridge.stats.requests_total == {"created": 1, "cancelled": 1}
    assert redis_client.xlen(DEAD) == 0
    assert (cluster.job("slow-submit") or {})["spec"]["cancel"] is True
