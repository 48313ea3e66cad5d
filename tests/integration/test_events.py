"""Progress events from a real operator run: order, schema, late catch-up (`gpujob watch`), and the Node
backend's view of them (node-redis)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

from gpujob.api.constants import Phase
from gpujob.api.events import ProgressEvent
from gpujob.events import SyncEventPublisher, make_event
from gpujob.settings import Settings
from tests.support.bridge import request
from tests.support.logs import records
from tests.support.node import node_backend
from tests.support.operator import Cluster, wait_for


def subscriber(redis_url: str, job_id: str) -> tuple[list[ProgressEvent], threading.Event]:
    events: list[ProgressEvent] = []
    ready = threading.Event()

    def listen() -> None:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(f"gpujobs:progress:{job_id}")
        ready.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.2)
            if message:
                events.append(ProgressEvent.model_validate_json(message["data"]))
                if events[-1].status in {"succeeded", "failed", "cancelled"}:
                    break
        pubsub.close()
        client.close()

    threading.Thread(target=listen, daemon=True).start()
    assert ready.wait(5)
    return events, ready


def test_phase_events_are_ordered_and_follow_the_contract(
    operator_factory: Any, cluster: Cluster, redis_url: str, redis_client: redis.Redis
) -> None:
    operator_factory({"GPUJOB_REDIS_URL": redis_url})
    events, _ = subscriber(redis_url, "ev-1")
    cluster.create_job("ev-1", {"type": "train_lora", "retries": {"limit": 1, "backoffSeconds": 0}})
    first = cluster.wait_pod("ev-1", 1).metadata.name
    # Each attempt rests until the test runs its Pod: Scheduled here, Pending (Unschedulable) on the real
    # control plane, whose scheduler finds no Node in the pen; the test waits for that so the order is fixed.
    cluster.wait_phase("ev-1", cluster.resting_phase)
    cluster.set_pod(first, "Running")
    # The operator publishes the phases it sees: a Pod that is Running and Failed within one of its batching
    # windows would (rightly) go from scheduled to retrying, so the test lets it see Running first.
    cluster.wait_phase("ev-1", Phase.RUNNING)
    cluster.set_pod(first, "Failed", exit_code=1)
    name = cluster.wait_pod("ev-1", 2).metadata.name
    cluster.wait_phase("ev-1", cluster.resting_phase)
    cluster.set_pod(name, "Running")
    # The worker's own progress, published the way gpujob.worker does, lands between the operator's events.
    settings = Settings(redis_url=redis_url)
    SyncEventPublisher(redis.Redis.from_url(redis_url, decode_responses=True), settings).publish(
        make_event("ev-1", "running", 40.0, "Epoch 2/5 — loss=0.34", phase="Running", attempt=2)
    )
    wait_for(lambda: cluster.status("ev-1").get("progress", {}).get("percent") == 40.0, what="progress mirrored")
    result = {"artifacts": [{"key": "loras/ev-1/adapter_model.safetensors", "size": 12, "sha256": "e" * 64}]}
    cluster.set_pod(name, "Succeeded", exit_code=0, message=json.dumps(result))
    wait_for(lambda: events and events[-1].status == "succeeded", what="the succeeded event")
    statuses = [e.status for e in events]
    resting = ["scheduled", "pending"] if cluster.pen else ["scheduled"]
    assert statuses == ["queued", *resting, "running", "retrying", *resting, "running", "running", "succeeded"]
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "seq strictly increasing"
    assert events[-1].progress == 100 and events[-1].artifacts == result["artifacts"]
    retrying = statuses.index("retrying")
    assert events[retrying].reason == "Error" and events[retrying + 1].attempt == 2
    assert all(e.jobId == "ev-1" and e.timestamp for e in events)
    # Every event is also in the durable stream, and the latest state is kept for late subscribers.
    durable = [json.loads(f["event"]) for _, f in redis_client.xrange("gpujobs:events") if f["jobId"] == "ev-1"]
    assert [d["seq"] for d in durable] == seqs
    assert json.loads(redis_client.get("gpujobs:state:ev-1"))["status"] == "succeeded"


def test_the_progress_mirror_survives_whatever_is_published(
    operator_factory: Any, cluster: Cluster, redis_url: str
) -> None:
    """Anyone who can PUBLISH can put any bytes on a progress channel: the mirror drops what is not a progress
    event (not UTF-8, not JSON, nested too deep, a megabyte, a partial event) and goes on mirroring."""
    operator_factory({"GPUJOB_REDIS_URL": redis_url})
    cluster.create_job("mirror-1", {"type": "train_lora"})
    name = cluster.wait_pod("mirror-1", 1).metadata.name
    cluster.set_pod(name, "Running")
    cluster.wait_phase("mirror-1", Phase.RUNNING)
    settings = Settings(redis_url=redis_url)
    raw = redis.Redis.from_url(redis_url)
    channel = f"{settings.progress_channel_prefix}mirror-1"
    for junk in (b"\xff\xfe", b"{", b"[" * 5000, b"x" * 1_000_000, json.dumps({"jobId": "mirror-1"}).encode()):
        assert raw.publish(channel, junk) == 1, "the operator's mirror is subscribed"
    SyncEventPublisher(redis.Redis.from_url(redis_url, decode_responses=True), settings).publish(
        make_event("mirror-1", "running", 55.0, "after the junk", phase="Running", attempt=1)
    )
    wait_for(lambda: cluster.status("mirror-1").get("progress", {}).get("percent") == 55.0, what="progress mirrored")
    assert cluster.status("mirror-1")["progress"]["message"] == "after the junk"
    raw.close()


def test_late_subscriber_catches_up_with_gpujob_watch(operator_factory: Any, cluster: Cluster, redis_url: str) -> None:
    operator_factory({"GPUJOB_REDIS_URL": redis_url})
    cluster.create_job("late-1", {"type": "render_video"})
    name = cluster.wait_pod("late-1", 1).metadata.name
    cluster.set_pod(name, "Running")
    cluster.wait_phase("late-1", Phase.RUNNING)
    env = {**os.environ, "GPUJOB_REDIS_URL": redis_url}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "gpujob.cli", "watch", "late-1", "--json", "--timeout", "60"],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert watcher.stdout is not None
    first = json.loads(watcher.stdout.readline())  # the catch-up: the latest state, before any new event
    assert first["status"] == "running" and first["jobId"] == "late-1"
    cluster.set_pod(name, "Succeeded", exit_code=0)
    rest = [json.loads(line) for line in watcher.stdout]
    assert watcher.wait(10) == 0
    assert rest[-1]["status"] == "succeeded" and all(e["seq"] > first["seq"] for e in rest)


def test_node_backend_submits_and_receives_running_and_succeeded_or_rejected(
    operator_factory: Any, cluster: Cluster, redis_url: str, redis_client: redis.Redis
) -> None:
    """The README's Node client (tests/node/client.mjs) against the real operator and bridge: a valid request is
    followed to `succeeded`; an invalid one ends with one `rejected` event carrying the dead letter's reason
    (issue 13 item 4: before, a backend that subscribed waited for ever)."""
    operator_factory({"GPUJOB_REDIS_URL": redis_url})
    backend = node_backend("backend.test.mjs", REDIS_URL=redis_url, JOB_ID="node-42", BAD_JOB_ID="node-bad",
                           TIMEOUT_MS="60000")  # fmt: skip
    try:
        # The kubelet's part: the bridge turns the request into a GpuJob, the operator into a Pod.
        name = cluster.wait_pod("node-42", 1, timeout=30).metadata.name
        cluster.set_pod(name, "Running")
        cluster.wait_phase("node-42", Phase.RUNNING)
        cluster.set_pod(name, "Succeeded", exit_code=0)
        output, _ = backend.communicate(timeout=60)
    finally:
        backend.kill()
    assert backend.returncode == 0, output
    assert "OK queued,scheduled,running,succeeded" in output
    [dead] = [fields for _, fields in redis_client.xrange("gpujobs:requests:dead")]
    assert json.loads(dead["job"])["jobId"] == "node-bad"
    assert f"REJECTED {dead['reason']}" in output and "gpus" in dead["reason"]


def test_no_secret_ever_reaches_the_operator_log(operator_factory: Any, cluster: Cluster, tmp_path: Path) -> None:
    from gpujob.sandbox.procs import RedisServer

    password, s3_key, s3_secret = "r3dis-Pa55word-xyz", "AKIA-SANDBOX-KEY-123", "s3-Secret-Key-Value-456"
    with RedisServer(password=password) as server:
        op = operator_factory(
            {
                "GPUJOB_REDIS_URL": server.url,
                "GPUJOB_S3_ACCESS_KEY": s3_key,
                "GPUJOB_S3_SECRET_KEY": s3_secret,
                "GPUJOB_LOG_LEVEL": "DEBUG",
            }
        )
        r = redis.Redis.from_url(server.url, decode_responses=True)
        r.xadd("gpujobs:requests", request("secretive"))
        r.xadd("gpujobs:requests", {"job": "{broken"})
        cluster.wait_pod("secretive", 1)
        r.close()
        server.stop()  # Redis goes away: the operator logs connection errors, which must not carry the URL's password

        def redis_error_logged() -> bool:  # by the bridge, the progress mirror or the event forwarder
            errors = [str(r.get("error", "")) for r in records(op.logs()) if r.get("level") == "warning"]
            return any("Connection refused" in e or "Error " in e for e in errors)

        wait_for(redis_error_logged, timeout=30, what="a Redis error logged")
        server.process.start()
        op.stop()
    logs = op.logs()
    assert "secretive" in logs or "dead-lettered" in logs  # the log did record the run
    for secret in (password, s3_key, s3_secret):
        assert secret not in logs, f"a secret leaked into the log: {secret[:4]}…"
