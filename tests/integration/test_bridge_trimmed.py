"""Stream entries trimmed (XTRIM/XDEL, or MAXLEN on XADD) while they were pending: nothing of them is left to
handle, so the bridge must clear them from the group's pending list, on its own restart and when it claims a
dead consumer's entries, and go on serving the entries that are still there. A pending entry left behind
would be read again on every start and keep the group's `pending` (and the backlog metric) above zero forever."""

from __future__ import annotations

from typing import Any

import redis

from gpujob import kube
from gpujob.bridge.intake import Bridge, intake_client
from tests.support.bridge import bridge_settings, eventually, request, running_bridge
from tests.support.operator import Cluster

STREAM, GROUP, DEAD = "gpujobs:requests", "gpujob-operator", "gpujobs:requests:dead"


def pending_ids(r: redis.Redis) -> list[str]:
    return [row["message_id"] for row in r.xpending_range(STREAM, GROUP, min="-", max="+", count=100)]


def read_then_trim(r: redis.Redis, consumer: str) -> None:
    """Three requests read by `consumer` and never acked; then the first two are trimmed off the stream."""
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = [r.xadd(STREAM, request(job_id)) for job_id in ("trimmed-1", "trimmed-2", "kept-1")]
    r.xreadgroup(GROUP, consumer, {STREAM: ">"})
    assert pending_ids(r) == ids
    assert r.xtrim(STREAM, minid=ids[2], approximate=False) == 2  # as a producer's MINID/MAXLEN trimming does
    assert [entry_id for entry_id, _ in r.xrange(STREAM)] == [ids[2]]
    assert pending_ids(r) == ids  # trimming leaves the pending list alone: that is the consumer's job


async def test_own_pending_entries_trimmed_while_down_are_acked_on_restart(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    read_then_trim(redis_client, "bridge-a")
    # The same consumer name comes back (a restarted Pod keeps its name) and first re-reads its own pending list:
    # that pass alone must clear the trimmed entries (a later XAUTOCLAIM would drop them too, on Redis 7, but
    # only after the claim period, and not on Redis 6.2 at all).
    settings = bridge_settings(redis_url, consumer="bridge-a")
    client = intake_client(settings)
    restarted = Bridge(settings, client)
    try:
        await restarted.process_own_pending()
    finally:
        await client.aclose()
        await kube.close()
    assert pending_ids(redis_client) == []
    assert cluster.job("kept-1") is not None
    assert cluster.job("trimmed-1") is None and cluster.job("trimmed-2") is None
    assert restarted.stats.requests_total["created"] == 1
    # Acked, not dead-lettered: nothing is left of them to dead-letter (a dead letter with empty fields and
    # "missing field 'job'" would blame a request that was well-formed).
    assert redis_client.xrange(DEAD) == [] and restarted.stats.requests_total["dead_lettered"] == 0
    # ... and the bridge goes on serving new requests.
    async with running_bridge(settings):
        redis_client.xadd(STREAM, request("after-1"))
        await eventually(lambda: cluster.job("after-1"), what="a new request's GpuJob")
        await eventually(lambda: pending_ids(redis_client) == [], what="the new request acked")
    assert [c["pending"] for c in redis_client.xinfo_consumers(STREAM, GROUP)] == [0]


async def test_dead_consumers_trimmed_entries_are_cleared_when_claimed(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    read_then_trim(redis_client, "dead-replica")
    async with running_bridge(bridge_settings(redis_url, consumer="bridge-b")) as bridge:
        await eventually(lambda: cluster.job("kept-1"), what="the claimed request's GpuJob")
        await eventually(lambda: pending_ids(redis_client) == [], what="nothing pending, trimmed entries included")
    assert cluster.job("trimmed-1") is None and cluster.job("trimmed-2") is None
    assert bridge.stats.requests_total["created"] == 1
    assert redis_client.xrange(DEAD) == [] and bridge.stats.requests_total["dead_lettered"] == 0
    consumers = {c["name"]: c["pending"] for c in redis_client.xinfo_consumers(STREAM, GROUP)}
    assert consumers.get("dead-replica", 0) == 0 and consumers.get("bridge-b", 0) == 0
