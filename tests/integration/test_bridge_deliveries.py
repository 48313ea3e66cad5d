"""What counts towards GPUJOB_MAX_DELIVERIES (issue 16): never how often a valid request was delivered (restarts,
claims, an API outage), only failures of the entry's own handling. Real Redis, the API emulator over HTTP, and
a real 503 from a proxy in front of it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from gpujob import kube
from gpujob.api.constants import GROUP, PLURAL, VERSION
from gpujob.api.request import Entry
from gpujob.bridge import intake
from gpujob.bridge.intake import Bridge
from gpujob.sandbox.kubeconfig import write_kubeconfig
from tests.support.bridge import bridge_settings, eventually, pending, request, running_bridge
from tests.support.operator import Cluster

STREAM, CGROUP, DEAD = "gpujobs:requests", "gpujob-operator", "gpujobs:requests:dead"
FAILURES = f"{STREAM}:failures"


def deliveries(r: redis.Redis, entry_id: str) -> int:
    try:
        rows = r.xpending_range(STREAM, CGROUP, min=entry_id, max=entry_id, count=1)
    except redis.ResponseError:  # no group yet
        return 0
    return int(rows[0]["times_delivered"]) if rows else 0


def gpujobs(cluster: Cluster) -> list[str]:
    items = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"]
    return sorted(item["metadata"]["name"] for item in items)


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bridge's real retry logic, with its pauses shortened so rounds of re-delivery take ~0.3 s, not 30 s."""
    monkeypatch.setattr(intake, "RETRY_DELAY", 0.01)
    monkeypatch.setattr(intake, "MAX_BACKOFF", 0.2)


# --- an entry delivered many times by restarts and claims is still a request like any other
@pytest.mark.parametrize("consumer", ["bridge-a", "bridge-b"], ids=["own-pending-after-restarts", "claimed"])
async def test_a_valid_entry_delivered_past_the_limit_by_restarts_or_claims_is_created(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster, consumer: str
) -> None:
    entry_id = redis_client.xadd(STREAM, request("restarted-often"))
    redis_client.xgroup_create(STREAM, CGROUP, id="0")
    redis_client.xreadgroup(CGROUP, "bridge-a", {STREAM: ">"})
    for _ in range(9):  # bridge-a died and came back nine times, each re-reading its pending entry
        redis_client.xreadgroup(CGROUP, "bridge-a", {STREAM: "0"})
    assert deliveries(redis_client, entry_id) == 10
    async with running_bridge(bridge_settings(redis_url, consumer=consumer, max_deliveries=2)) as bridge:
        await eventually(lambda: pending(redis_client) == 0, what="the entry acked")
    assert bridge.stats.requests_total == {"created": 1}
    assert gpujobs(cluster) == ["restarted-often"] and redis_client.xlen(DEAD) == 0


# --- the API answers 503 for a long while, then recovers
class Outage:
    """A reverse proxy in front of the API server that answers 503 to every GpuJob request while `down`; the
    rest (discovery, /version: the bridge's liveness ping) passes, as with an overloaded aggregated API."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.down = True
        self.refused = 0
        self.url = ""
        self._session: aiohttp.ClientSession | None = None

    async def handle(self, req: web.BaseRequest) -> web.StreamResponse:
        if self.down and f"/{PLURAL}" in req.path:
            self.refused += 1
            message = "the server is currently unable to handle the request"
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
                      "reason": "ServiceUnavailable", "message": message}  # fmt: skip
            return web.json_response(status, status=503)
        assert self._session is not None
        headers = {k: v for k, v in req.headers.items() if k.lower() in ("content-type", "accept", "user-agent")}
        async with self._session.request(
            req.method, self.upstream + req.path_qs, data=await req.read(), headers=headers
        ) as resp:
            body = await resp.read()
            return web.Response(body=body, status=resp.status, content_type=resp.content_type)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Outage]:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        runner = web.ServerRunner(web.Server(self.handle))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            await runner.cleanup()
            await self._session.close()


async def test_a_valid_entry_redelivered_past_the_limit_during_a_503_outage_is_created_once_it_ends(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, quick_backoff: None,
) -> None:  # fmt: skip
    max_deliveries = 2
    async with Outage(emulator.url).serving() as outage:
        await kube.close()  # the bridge's API client is made afresh, from this kubeconfig
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "through-proxy", outage.url)))
        entry_id = redis_client.xadd(STREAM, request("through-the-outage"))
        settings = bridge_settings(redis_url, max_deliveries=max_deliveries)
        async with running_bridge(settings) as bridge:
            await eventually(
                lambda: deliveries(redis_client, entry_id) > 2 * max_deliveries + 1,
                timeout=60,
                what="the entry re-delivered well past the limit",
            )
            assert redis_client.xlen(DEAD) == 0, "dead-lettered during the outage"
            assert gpujobs(cluster) == [] and pending(redis_client) == 1
            outage.down = False
            await eventually(lambda: pending(redis_client) == 0, timeout=30, what="the entry acked after the outage")
    assert outage.refused > max_deliveries and bridge.stats.transient_errors_total == outage.refused
    assert gpujobs(cluster) == ["through-the-outage"], "exactly one GpuJob"
    assert redis_client.xlen(DEAD) == 0, "no dead letter"
    assert bridge.stats.requests_total == {"created": 1}
    assert not redis_client.exists(FAILURES), "an outage is not the entry's failure"


# --- an entry whose own handling keeps raising is poison: dead-lettered after max_deliveries, across restarts
class Poisoned(Bridge):
    """The real bridge with a bug that one input triggers (in building or sending its GpuJob)."""

    async def _apply(self, entry: Entry, entry_id: str) -> str:
        if entry.job_id == "poison":
            raise KeyError("spec.somethingNew")
        return await super()._apply(entry, entry_id)


async def test_an_entry_whose_handling_keeps_raising_is_dead_lettered_and_the_count_survives_restarts(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster, quick_backoff: None
) -> None:
    poison_id = redis_client.xadd(STREAM, request("poison"))
    settings = bridge_settings(redis_url, max_deliveries=3)
    async with running_bridge(settings, Poisoned):
        await eventually(lambda: redis_client.hget(FAILURES, poison_id) == "1", what="the first failure counted")
    assert redis_client.xlen(DEAD) == 0 and pending(redis_client) == 1
    async with running_bridge(settings, Poisoned) as bridge:  # a restart keeps the count
        await eventually(lambda: redis_client.xlen(DEAD) == 1, timeout=30, what="the dead letter")
        redis_client.xadd(STREAM, request("after-the-poison"))
        await eventually(lambda: cluster.job("after-the-poison"), what="the bridge to go on")
        await eventually(lambda: pending(redis_client) == 0, what="every entry acked")
    [(_, letter)] = redis_client.xrange(DEAD)
    assert letter["sourceId"] == poison_id and letter["job"] == request("poison")["job"]
    assert letter["reason"] == "handling failed 3 times (last error: KeyError('spec.somethingNew'))"
    assert bridge.stats.dead_lettered_total == {"handling_failed": 1}, "two failures before, the third here"
    assert gpujobs(cluster) == ["after-the-poison"]
    assert not redis_client.exists(FAILURES), "the count goes with the entry"


async def test_an_api_rejection_for_good_is_dead_lettered_at_once(
    emulator: Any, redis_url: str, redis_client: redis.Redis, cluster: Cluster
) -> None:
    """Any 4xx that is not the cluster's passing state (here 413) rejects the request: no endless retries."""
    emulator_create = emulator.emulator.api.create

    def too_large(res: Any, namespace: str, body: Any, **options: Any) -> Any:
        if res.plural == PLURAL and body["spec"].get("jobId") == "too-large":
            from gpujob.sandbox.errors import ApiError

            raise ApiError(413, "RequestEntityTooLarge", "request is too large", {})
        return emulator_create(res, namespace, body, **options)

    emulator.emulator.api.create = too_large
    entry_id = redis_client.xadd(STREAM, request("too-large"))
    async with running_bridge(bridge_settings(redis_url)) as bridge:
        await eventually(lambda: redis_client.xlen(DEAD) == 1, what="the dead letter")
    [(_, letter)] = redis_client.xrange(DEAD)
    assert letter["sourceId"] == entry_id
    assert letter["reason"] == "rejected by the API server (413): request is too large"
    assert bridge.stats.transient_errors_total == 0 and json.loads(letter["job"])["jobId"] == "too-large"
