"""A cancel is never lost and a jobId runs once (issue 12 items 2 and 3): whatever order a jobId's submit and
cancel reach the intake in (two replicas, a submit retried or slow), its GpuJob ends cancelled; a request
redelivered or re-sent after its GpuJob is gone (ttlSecondsAfterFinished, a delete) does not run again.
Real Redis, each API backend."""

from __future__ import annotations

import asyncio
import json
import random

import redis

from gpujob.api.constants import GROUP as API_GROUP
from gpujob.api.constants import PLURAL, VERSION
from gpujob.api.request import Action, Entry, RequestOutcome
from gpujob.bridge.intake import REMEMBER_SECONDS, Bridge
from tests.support.bridge import bridge_settings, eventually, pending, request, running_bridge
from tests.support.kubernetes import ApiTarget
from tests.support.operator import Cluster

STREAM, GROUP, DEAD = "gpujobs:requests", "gpujob-operator", "gpujobs:requests:dead"


def cancel(job_id: str) -> dict[str, str]:
    return {"job": json.dumps({"jobId": job_id}), "action": "cancel"}


async def test_a_cancel_before_its_submit_makes_the_gpujob_cancelled(
    api: ApiTarget, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    settings = bridge_settings(redis_url, namespace=api.namespace)
    redis_client.xadd(STREAM, cancel("early"))
    async with running_bridge(settings) as bridge:
        await eventually(lambda: bridge.stats.requests_total["cancel_remembered"] == 1, what="the cancel remembered")
        assert cluster.job("early") is None
        redis_client.xadd(STREAM, request("early"))
        job = await eventually(lambda: cluster.job("early"), what="the GpuJob")
        await eventually(lambda: pending(redis_client) == 0, what="both acked")
    assert job["spec"]["cancel"] is True, "created cancelled: it never runs"
    assert redis_client.xlen(DEAD) == 0
    assert bridge.stats.requests_total == {"cancel_remembered": 1, "created": 1}
    assert 0 < redis_client.ttl(f"{STREAM}:cancel:{api.namespace}/early") <= REMEMBER_SECONDS


class RacingSubmits(Bridge):
    """The real bridge, whose submits reach the API server late now and then (a slow network, a retried call):
    the other replica's cancel of the same jobId overtakes them."""

    async def _apply(self, entry: Entry, entry_id: str) -> RequestOutcome:
        if entry.action is Action.SUBMIT:
            await asyncio.sleep(random.Random(entry.job_id).choice([0.0, 0.05, 0.3]))
        return await super()._apply(entry, entry_id)


async def test_submits_and_cancels_across_two_replicas_lose_no_cancel(
    api: ApiTarget, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    job_ids = [f"race-{i}" for i in range(24)]
    redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for i, job_id in enumerate(job_ids):  # most submit-then-cancel, some cancel-then-submit: both orders happen
        first, second = (request(job_id), cancel(job_id)) if i % 3 else (cancel(job_id), request(job_id))
        redis_client.xadd(STREAM, first)
        redis_client.xadd(STREAM, second)
    a = bridge_settings(redis_url, consumer="replica-a", namespace=api.namespace, read_batch=1)
    b = bridge_settings(redis_url, consumer="replica-b", namespace=api.namespace, read_batch=1)
    async with running_bridge(a, RacingSubmits) as bridge_a, running_bridge(b, RacingSubmits) as bridge_b:
        await eventually(lambda: pending(redis_client) == 0 and redis_client.xinfo_groups(STREAM)[0]["lag"] == 0,
                         timeout=60, what="every entry acked")  # fmt: skip
    jobs = {j["metadata"]["name"]: j for j in cluster.custom.list_namespaced_custom_object(
        API_GROUP, VERSION, api.namespace, PLURAL)["items"]}  # fmt: skip
    assert sorted(jobs) == sorted(job_ids)
    assert [n for n, j in jobs.items() if j["spec"].get("cancel") is not True] == [], "a cancel was lost"
    assert redis_client.xlen(DEAD) == 0
    totals = bridge_a.stats.requests_total + bridge_b.stats.requests_total
    assert totals["created"] == len(job_ids) and totals["cancelled"] + totals["cancel_remembered"] == len(job_ids)
    assert bridge_a.stats.requests_total and bridge_b.stats.requests_total, "both replicas did work"


async def test_a_request_redelivered_or_resent_after_its_gpujob_is_gone_does_not_run_again(
    api: ApiTarget, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    settings = bridge_settings(redis_url, namespace=api.namespace)
    first = redis_client.xadd(STREAM, request("once"))
    async with running_bridge(settings):
        job = await eventually(lambda: cluster.job("once"), what="the GpuJob")
        await eventually(lambda: pending(redis_client) == 0, what="the ack")
    # The job finished and ttlSecondsAfterFinished deleted it (here: deleted by hand, the same for the intake).
    cluster.custom.delete_namespaced_custom_object(API_GROUP, VERSION, api.namespace, PLURAL, "once")
    await eventually(lambda: cluster.job("once") is None, what="the GpuJob gone")
    # The backend sends it again, and the group is rewound so the first entry is delivered again too.
    redis_client.xadd(STREAM, request("once"))
    redis_client.xgroup_setid(STREAM, GROUP, id="0")
    async with running_bridge(settings) as bridge:
        await eventually(lambda: bridge.stats.requests_total["duplicate"] == 2, what="both seen as duplicates")
        await eventually(lambda: pending(redis_client) == 0, what="both acked")
    assert cluster.job("once") is None, "the job ran again"
    assert redis_client.xlen(DEAD) == 0
    seen = f"{STREAM}:seen:{api.namespace}/once"
    assert redis_client.get(seen) == first and 0 < redis_client.ttl(seen) <= REMEMBER_SECONDS
    assert job["metadata"]["annotations"]["gpujob.dev/request-id"] == first
