"""The backend hears about every request (issue 13 item 4): a dead-lettered request whose jobId can be read
publishes a `rejected` event (Pub/Sub, the events stream, the job's state) with the dead letter's reason; one whose
jobId cannot be read publishes nothing, and reading a jobId never raises, whatever the bytes. A bad resend of a
jobId that already has events or a GpuJob does not end that job for its subscribers. Real Redis, each API backend."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from gpujob.api.naming import job_name
from gpujob.bridge.reading import MAX_READ_BYTES, readable_job_id
from tests.support.bridge import bridge_settings, eventually, request, running_bridge
from tests.support.kubernetes import ApiTarget
from tests.support.operator import Cluster

STREAM, DEAD, EVENTS = "gpujobs:requests", "gpujobs:requests:dead", "gpujobs:events"


def listen(redis_url: str, job_ids: list[str]) -> tuple[dict[str, list[dict[str, Any]]], threading.Event]:
    """Subscribe to the jobs' channels (before anything is sent); returns what arrives, and a stop switch."""
    got: dict[str, list[dict[str, Any]]] = {job_id: [] for job_id in job_ids}
    ready, stop = threading.Event(), threading.Event()

    def run() -> None:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(*(f"gpujobs:progress:{job_id}" for job_id in job_ids))
        ready.set()
        while not stop.is_set():
            if message := pubsub.get_message(timeout=0.1):
                event = json.loads(message["data"])
                got[event["jobId"]].append(event)
        pubsub.close()
        client.close()

    threading.Thread(target=run, daemon=True).start()
    assert ready.wait(5)
    return got, stop


async def test_a_rejected_request_with_a_readable_job_id_publishes_a_rejected_event(
    api: ApiTarget, redis_url: str, cluster: Cluster
) -> None:
    r = redis.Redis.from_url(redis_url)
    readable = {
        "bad-gpus": request("bad-gpus", gpus=-1),
        "bad-type": {b"job": json.dumps({"jobId": "bad-type", "type": "mine_bitcoin"}).encode()},
        "bad-action": {b"action": b"explode", b"job": json.dumps({"jobId": "bad-action"}).encode()},
        # a byte that is not UTF-8 elsewhere in the JSON does not hide the jobId
        "bad-bytes": {b"job": b'{"jobId": "bad-bytes", "type": "train_lora", "params": {"x": "\xff"}}'},
        "bad-name": {b"\xc3\x28": b"1", **request("bad-name")},
        "bad-ns": request("bad-ns", namespace="elsewhere"),
    }
    got, stop = listen(redis_url, list(readable))
    ids = {job_id: r.xadd(STREAM, fields).decode() for job_id, fields in readable.items()}
    r.xadd(STREAM, request("fine-1"))
    try:
        async with running_bridge(bridge_settings(redis_url, namespace=api.namespace)):
            await eventually(lambda: r.xlen(DEAD) == len(ids), what="the bad requests dead-lettered")
            await eventually(lambda: cluster.job(job_name("fine-1")), what="fine-1's GpuJob")
            await eventually(lambda: all(got.values()), what="a rejected event for each")
    finally:
        stop.set()
    reasons = {f[b"sourceId"].decode(): f[b"reason"].decode() for _, f in r.xrange(DEAD)}
    durable = {f[b"jobId"].decode(): json.loads(f[b"event"]) for _, f in r.xrange(EVENTS)}
    assert set(durable) == set(ids), "one event each in gpujobs:events, none for the valid request"
    for job_id, entry_id in ids.items():
        [event] = got[job_id]
        assert event["status"] == "rejected" and event["jobId"] == job_id and event["progress"] == 0
        assert event["reason"] == reasons[entry_id] and event["message"] == f"request rejected: {reasons[entry_id]}"
        assert event["sourceId"] == entry_id and event["source"] == "operator" and event["seq"] == 1
        assert event["timestamp"].endswith("Z")
        assert json.loads(r.get(f"gpujobs:state:{job_id}")) == event == durable[job_id]
    assert "gpus" in got["bad-gpus"][0]["reason"] and "not allowed" in got["bad-ns"][0]["reason"]
    r.close()


async def test_a_dead_letter_without_a_readable_job_id_publishes_nothing(
    api: ApiTarget, redis_url: str, cluster: Cluster
) -> None:
    r = redis.Redis.from_url(redis_url)
    unreadable = [
        {b"job": b"{broken"},
        {b"nojob": b"1"},
        {b"job": b"[" * 5000},
        {b"job": json.dumps({"type": "train_lora"}).encode()},  # no jobId
        {b"job": json.dumps({"jobId": 42, "type": "train_lora"}).encode()},
        {b"job": json.dumps({"jobId": "has space", "type": "train_lora"}).encode()},
        {b"job": json.dumps({"jobId": "x" * 129, "type": "train_lora"}).encode()},
        {b"job": json.dumps({"jobId": "ok\n", "type": "train_lora"}).encode()},
        {b"job": b'{"jobId": "bad\xff", "type": "train_lora"}'},  # the jobId itself is not UTF-8
        {b"job": b'{"jobId": "\\ud800", "type": "train_lora"}'},  # a lone surrogate
        {b"job": json.dumps({"jobId": "huge-1", "type": "train_lora"}).encode() + b" " * MAX_READ_BYTES},
        {b"job": json.dumps([{"jobId": "in-a-list"}]).encode()},
    ]
    for fields in unreadable:
        r.xadd(STREAM, fields)
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace)):
        await eventually(lambda: r.xlen(DEAD) == len(unreadable), what="every entry dead-lettered")
    assert r.xlen(EVENTS) == 0 and not r.keys("gpujobs:state:*") and not r.keys("gpujobs:seq:*")
    r.close()


async def test_a_bad_resend_of_a_live_job_does_not_end_it_for_its_subscribers(
    api: ApiTarget, redis_url: str, cluster: Cluster
) -> None:
    """The first submit of a jobId wins: a later invalid request with that jobId is dead-lettered, but the job it
    names has a GpuJob (and maybe events), so no `rejected` event tells its subscribers it ended."""
    r = redis.Redis.from_url(redis_url)
    r.xadd(STREAM, request("live-1"))
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace)):
        await eventually(lambda: cluster.job(job_name("live-1")), what="live-1's GpuJob")
        r.xadd(STREAM, request("live-1", gpus=-1))  # no events yet: the GpuJob made from the stream guards it
        r.set("gpujobs:state:live-2", json.dumps({"jobId": "live-2", "status": "running"}))  # has events
        r.xadd(STREAM, {b"action": b"cancel", b"job": b'{"jobId": "live-2", "namespace": "Not_A_Label"}'})
        await eventually(lambda: r.xlen(DEAD) == 2, what="both bad requests dead-lettered")
    assert r.xlen(EVENTS) == 0 and not r.exists("gpujobs:state:live-1")
    assert json.loads(r.get("gpujobs:state:live-2"))["status"] == "running"
    r.close()


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.binary(max_size=8) | st.just(b"job"), st.binary(max_size=200), max_size=4))
def test_reading_a_job_id_never_raises_on_any_bytes(fields: dict[bytes, bytes]) -> None:
    found = readable_job_id(fields)
    assert found is None or isinstance(found[0], str)


def test_reading_a_job_id_never_raises_on_json_like_bytes() -> None:
    rng = random.Random(13)
    pieces = [b'{"jobId": "a1"', b'"namespace": ', b'"ns"', b"[", b"{", b"}", b",", b"\\u", b"\\ud800", b"\xff",
              b'"', b"1e999", b"NaN", b"null", b" ", b":", b'"jobId"', b"\x00"]  # fmt: skip
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        found = readable_job_id({b"job": raw})
        assert found is None or found[0] == "a1"
    assert readable_job_id({b"job": b'{"jobId": "a1", "namespace": "ns"}'}) == ("a1", "ns")
    assert readable_job_id({b"job": b'{"jobId": "a1", "namespace": "Bad NS"}'}) == ("a1", None)
    assert readable_job_id({b"job": b"[" * 100_000}) is None
