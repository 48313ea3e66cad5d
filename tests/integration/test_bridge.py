"""The stream intake against a real redis-server and each API backend (the emulator, a real control plane)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpujob.api.constants import Annotation, Label
from gpujob.api.naming import job_name
from gpujob.api.request import InvalidEntry, parse_entry
from gpujob.bridge.intake import gpujob_body
from gpujob.sandbox.procs import RedisServer
from tests.support.bridge import bridge_settings, eventually, pending, request, running_bridge
from tests.support.kubernetes import ApiTarget
from tests.support.operator import Cluster

STREAM, GROUP, DEAD = "gpujobs:requests", "gpujob-operator", "gpujobs:requests:dead"


def jobs(cluster: Cluster) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.custom.list_namespaced_custom_object(
        "gpujob.dev", "v1alpha1", cluster.namespace, "gpujobs"
    )["items"]
    return items


async def test_valid_request_becomes_a_gpujob_then_is_acked(
    api: ApiTarget, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    entry_id = redis_client.xadd(STREAM, request("Order:42_lora", gpus=2, params={"epochs": 3}, priority="gpu-high"))
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace)) as bridge:
        job = await eventually(lambda: cluster.job(job_name("Order:42_lora")), what="the GpuJob")
        await eventually(lambda: pending(redis_client) == 0, what="the ack")
    assert job["spec"]["jobId"] == "Order:42_lora" and job["spec"]["gpus"] == 2
    assert job["spec"]["params"]["epochs"] == 3 and job["spec"]["priorityClassName"] == "gpu-high"
    assert job["metadata"]["labels"][Label.JOB_ID].startswith("Order-42_lora")
    assert job["metadata"]["annotations"][Annotation.REQUEST_ID] == entry_id
    assert bridge.stats.requests_total["created"] == 1


async def test_duplicate_job_ids_make_one_gpujob(
    api: ApiTarget, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    for epochs in (1, 2, 3):
        redis_client.xadd(STREAM, request("dup-1", params={"epochs": epochs}))
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace)) as bridge:
        await eventually(lambda: bridge.stats.requests_total["duplicate"] == 2, what="two duplicates")
    assert [j["metadata"]["name"] for j in jobs(cluster)] == ["dup-1"]
    assert jobs(cluster)[0]["spec"]["params"]["epochs"] == 1  # the first request wins
    assert pending(redis_client) == 0


async def test_crash_between_create_and_ack_gives_exactly_one_gpujob(
    api: ApiTarget, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    entry_id = redis_client.xadd(STREAM, request("crashy"))
    redis_client.xgroup_create(STREAM, GROUP, id="0")
    # What a bridge that died after its create and before its XACK leaves behind: the entry in its pending
    # list, and the GpuJob.
    redis_client.xreadgroup(GROUP, "bridge-a", {STREAM: ">"})
    body = gpujob_body(parse_entry(request("crashy")).request, entry_id)  # type: ignore[arg-type]
    cluster.custom.create_namespaced_custom_object("gpujob.dev", "v1alpha1", cluster.namespace, "gpujobs", body)
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace, consumer="bridge-a")) as bridge:
        await eventually(lambda: pending(redis_client) == 0, what="the pending entry to be acked")
    assert bridge.stats.requests_total["duplicate"] == 1
    assert [j["metadata"]["name"] for j in jobs(cluster)] == ["crashy"]


async def test_entries_of_a_dead_consumer_are_claimed(
    api: ApiTarget, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    redis_client.xadd(STREAM, request("orphan"))
    redis_client.xreadgroup(GROUP, "dead-replica", {STREAM: ">"})  # read, then the replica died
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace, consumer="bridge-b")):
        await eventually(lambda: cluster.job("orphan"), what="the claimed request's GpuJob")
        await eventually(lambda: pending(redis_client) == 0, what="the ack")


async def test_cancel_after_submit_in_one_batch_keeps_their_order(
    api: ApiTarget, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    redis_client.xadd(STREAM, request("c-1"))
    redis_client.xadd(STREAM, {"job": json.dumps({"jobId": "c-1"}), "action": "cancel"})
    redis_client.xadd(STREAM, {"job": json.dumps({"jobId": "never-submitted"}), "action": "cancel"})
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace)) as bridge:
        await eventually(lambda: (cluster.job("c-1") or {}).get("spec", {}).get("cancel"), what="spec.cancel")
        await eventually(lambda: bridge.stats.requests_total["cancel_remembered"] == 1, what="the unknown cancel")
    # A cancel before any submit is remembered, not dead-lettered (tests/test_bridge_order.py: its submit then
    # makes the GpuJob cancelled)
    assert redis_client.xlen(DEAD) == 0 and cluster.job("never-submitted") is None
    assert bridge.stats.requests_total["cancelled"] == 1


MALFORMED: list[tuple[dict[str, str], str]] = [
    ({"payload": "{}"}, "missing field 'job'"),
    ({"job": "{not json"}, "not JSON"),
    ({"job": "[1, 2]"}, "must be a JSON object"),
    ({"job": json.dumps({"type": "train_lora"})}, "jobId"),
    ({"job": json.dumps({"jobId": "x", "type": "mine_bitcoin"})}, "type"),
    ({"job": json.dumps({"jobId": "x", "type": "custom", "gpus": -1})}, "gpus"),
    ({"job": json.dumps({"jobId": "x", "type": "custom", "hostNetwork": True})}, "hostNetwork"),
    (
        {"job": json.dumps({"jobId": "x", "type": "custom", "env": [{"name": "GPUJOB_S3_SECRET_KEY", "value": "x"}]})},
        "reserved",
    ),
    ({"job": json.dumps({"jobId": "x", "type": "custom", "models": {"subPath": "../etc"}})}, "subPath"),
    ({"job": json.dumps({"jobId": "x", "type": "custom"}), "action": "explode"}, "unknown action"),
    ({"job": json.dumps({"jobId": "-bad-", "type": "custom"})}, "jobId"),
]


async def test_malformed_entries_are_dead_lettered_with_reasons_and_the_bridge_goes_on(
    api: ApiTarget, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    ids = [redis_client.xadd(STREAM, fields) for fields, _ in MALFORMED]
    redis_client.xadd(STREAM, request("after-the-garbage"))
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace)):
        await eventually(lambda: cluster.job("after-the-garbage"), what="the valid request after the garbage")
        await eventually(lambda: redis_client.xlen(DEAD) == len(MALFORMED), what="every malformed entry dead-lettered")
        await eventually(lambda: pending(redis_client) == 0, what="everything acked")
    by_source = {fields["sourceId"]: fields for _, fields in redis_client.xrange(DEAD)}
    for entry_id, (original, expected) in zip(ids, MALFORMED, strict=True):
        letter = by_source[entry_id]
        assert expected in letter["reason"], (expected, letter["reason"])
        assert all(letter[k] == v for k, v in original.items()), "the original fields are kept"
        assert letter["consumer"] == "bridge-a"
    assert [j["metadata"]["name"] for j in jobs(cluster)] == ["after-the-garbage"]


async def test_request_the_api_server_rejects_is_dead_lettered(
    api: ApiTarget, redis_url: str, redis_client: redis.Redis
) -> None:
    redis_client.xadd(STREAM, request("elsewhere", namespace="no-such-namespace"))
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace, bridge_namespaces=["*"])):
        await eventually(lambda: redis_client.xlen(DEAD) == 1, what="the dead letter")
    [(_, dead)] = redis_client.xrange(DEAD)
    assert "rejected by the API server (404)" in dead["reason"]


async def test_redis_restart_mid_run_the_bridge_recovers(
    api: ApiTarget, redis_server: RedisServer, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    redis_client.xadd(STREAM, request("before-restart"))
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace)):
        await eventually(lambda: cluster.job("before-restart"), what="the first job")
        redis_server.restart()  # no persistence: the stream and the group are gone, as after a crash without AOF
        fresh = redis.Redis.from_url(redis_url, decode_responses=True)
        await eventually(lambda: _xadd_ok(fresh, request("after-restart")), what="Redis back")
        await eventually(lambda: cluster.job("after-restart"), timeout=20, what="the request sent after the restart")
        fresh.close()


def _xadd_ok(client: redis.Redis, fields: dict[str, str]) -> bool:
    try:
        client.xadd(STREAM, fields)
    except redis.ConnectionError:
        return False
    return True


# --- the request parser, fuzzed (pure: no servers)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)
junk_jobs = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    json_values.map(json.dumps),
    st.dictionaries(
        st.sampled_from(["jobId", "type", "gpus", "params", "env", "retries", "image", "namespace"]),
        json_values,
        max_size=6,
    ).map(json.dumps),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job=junk_jobs, action=st.one_of(st.none(), st.text(max_size=10), st.sampled_from(["submit", "cancel"])))
def test_any_entry_parses_or_gives_a_readable_reason(job: str, action: str | None) -> None:
    fields = {"job": job} if action is None else {"job": job, "action": action}
    try:
        entry = parse_entry(fields)
    except InvalidEntry as exc:
        assert exc.reason and len(exc.reason) < 2000
        return
    assert entry.job_id  # a parsed entry always names its job


@pytest.mark.parametrize("fields", [f for f, _ in MALFORMED])
def test_each_malformed_entry_is_invalid(fields: dict[str, str]) -> None:
    with pytest.raises(InvalidEntry):
        parse_entry(fields)


async def test_stream_requests_stay_in_the_allowed_namespaces(
    api: ApiTarget, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    redis_client.xadd(STREAM, request("sneaky", namespace="kube-system"))
    redis_client.xadd(STREAM, request("fine"))
    async with running_bridge(bridge_settings(redis_url, namespace=api.namespace)):
        await eventually(lambda: cluster.job("fine"), what="the request in the default namespace")
        await eventually(lambda: redis_client.xlen(DEAD) == 1, what="the other namespace refused")
    [(_, dead)] = redis_client.xrange(DEAD)
    assert "namespace 'kube-system' not allowed" in dead["reason"]
