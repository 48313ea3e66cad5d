"""Redis Stream intake: `gpujobs:requests` -> GpuJobs, exactly once.

- One consumer group (`gpujob-operator`); the consumer name is the pod/host name, so replicas share the work.
- A request is acknowledged only after its GpuJob exists (created now, or 409: created before). The GpuJob's
  name derives from the jobId, so a request handled twice (crash between create and ack, a claim from a dead
  consumer) still makes one GpuJob.
- On start the bridge first re-processes its own pending entries, and it periodically claims entries left idle
  by dead consumers (XAUTOCLAIM).
- Entries that can never work (malformed, invalid, rejected by the API server for good) go to
  `gpujobs:requests:dead` with the original fields and a readable reason, then are acked.
- A valid request is never dead-lettered for how often it was delivered: restarts, claims and transient API
  failures (5xx, 429, unreachable, CRD missing) are not its fault. Transient failures are retried in place with
  back-off, then the entry stays pending and the bridge backs off before reading it again, until its GpuJob
  exists or the API rejects it for good. Only an entry whose own handling raises (a bug it triggers) counts
  towards max_deliveries; those failures are counted in Redis (`<stream>:failures`), so restarts don't reset them.
- Entries of one jobId are handled in stream order (submit then cancel), also across the two batches that may be
  in flight at once; different jobIds concurrently (at most `concurrency` creates in flight).
- Redis going away is logged and retried with capped back-off; it never stops the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from redis.exceptions import RedisError, ResponseError

from gpujob import kube
from gpujob.api.constants import API_VERSION, KIND, Annotation, Label
from gpujob.api.naming import job_name, label_value
from gpujob.api.request import Action, Entry, InvalidEntry, JobRequest, parse_entry
from gpujob.events import async_client
from gpujob.kube import ApiException
from gpujob.settings import Settings

log = logging.getLogger("gpujob.bridge")

MAX_BACKOFF = 30.0
TRANSIENT_RETRIES = 4  # in place, with back-off from RETRY_DELAY: ~4 s before the entry is left pending
RETRY_DELAY = 0.25
HEALTHY_AFTER = 10.0  # seconds a serving period must last for the reconnect back-off to start over
# The API's answers that are the cluster's state, not the request's fault (404 only for the resource itself):
# retried for as long as they last. Any other 4xx rejects the request for good.
TRANSIENT_API_STATUSES = frozenset({401, 408, 409, 429})
FAILURES_TTL_SECONDS = 7 * 24 * 3600  # a failure count outlives no entry by long (entries deleted by hand)
Fields = dict[str, str]


class Outcome:
    CREATED = "created"
    DUPLICATE = "duplicate"
    DEAD_LETTERED = "dead_lettered"
    CANCELLED = "cancelled"


@dataclass
class BridgeStats:
    """Read by the metrics collector at scrape time (no I/O there); lag/pending are refreshed by the bridge."""

    lag: int | None = None
    pending: int = 0
    dead_lettered_total: Counter[str] = field(default_factory=Counter)  # by _reason_kind
    requests_total: Counter[str] = field(default_factory=Counter)  # by Outcome
    transient_errors_total: int = 0  # API calls that failed transiently (each retry counts)


class Transient(Exception):
    """Try again later (the entry stays pending)."""


def gpujob_body(request: JobRequest, entry_id: str) -> dict[str, Any]:
    """The GpuJob of a request (pure): name from the jobId, the jobId as label and in spec."""
    spec = request.to_spec()
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": job_name(request.job_id),
            "labels": {Label.JOB_ID: label_value(request.job_id), Label.TYPE: spec.type.value},
            "annotations": {Annotation.REQUEST_ID: entry_id},
        },
        "spec": spec.wire(),
    }


def _transient_api_error(exc: ApiException) -> bool:
    return exc.status >= 500 or exc.status in TRANSIENT_API_STATUSES or _resource_missing(exc)


def _resource_missing(exc: ApiException) -> bool:
    """A 404 for the GpuJob resource itself (CRD not installed yet, or being upgraded), not for the request's
    namespace: that is the cluster's state, not the request's fault, so it is retried, never dead-lettered."""
    if exc.status != 404:
        return False
    try:
        details = json.loads(exc.body or "{}").get("details") or {}
    except (ValueError, AttributeError):
        return False
    return details.get("kind") != "namespaces"


def _api_reason(exc: ApiException) -> str:
    try:
        message = json.loads(exc.body or "{}").get("message")
    except ValueError:
        message = None
    return f"rejected by the API server ({exc.status}): {message or exc.reason}"


@dataclass
class Bridge:
    settings: Settings
    client: Any  # a redis.asyncio.Redis (decode_responses=True); its stubs type replies as unnarrowable unions
    stats: BridgeStats = field(default_factory=BridgeStats)
    _sem: asyncio.Semaphore = field(init=False)
    _stop: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _tails: dict[str, asyncio.Task[None]] = field(init=False, default_factory=dict)  # jobId -> its latest work

    def __post_init__(self) -> None:
        self._sem = asyncio.Semaphore(self.settings.concurrency)

    @property
    def stream(self) -> str:
        return self.settings.request_stream

    @property
    def group(self) -> str:
        return self.settings.consumer_group

    @property
    def consumer(self) -> str:
        return self.settings.consumer_name

    @property
    def failures_key(self) -> str:
        """Hash: entry id -> failures of that entry's own handling (see `handle`)."""
        return f"{self.stream}:failures"

    # --- the loop
    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: never raises (input, Redis or API trouble, even a bug), only logs and backs off."""
        self._stop = stop
        loop = asyncio.get_running_loop()
        delay = 0.5
        while not stop.is_set():
            started = loop.time()
            try:
                await self._serve(stop)
                return
            except (RedisError, OSError) as exc:
                log.warning("bridge lost Redis (%s); reconnecting in %.1fs", exc, delay)
            except Transient as exc:
                log.warning("bridge paused: %s", exc)
                await self._wait_for_api(stop)
            except Exception:  # a bug must not end the intake for the operator's lifetime
                log.exception("bridge failed; restarting in %.1fs", delay)
            if loop.time() - started > HEALTHY_AFTER:
                delay = 0.5  # it served for a while: this is a new incident, not the same one going on
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(MAX_BACKOFF, delay * 2)

    async def _serve(self, stop: asyncio.Event) -> None:
        await self.ensure_group()
        await self.process_own_pending()
        loop = asyncio.get_running_loop()
        next_claim = next_stats = loop.time()
        # Up to two batches in flight: the next one is read and started while the last one's slowest creates
        # finish, so the creates in flight never drain to zero between batches. Its failure surfaces here.
        inflight: list[asyncio.Task[None]] = []
        try:
            while not stop.is_set():
                now = loop.time()
                if now >= next_claim:
                    while inflight:  # our own entries in flight are not abandoned: finish them first
                        await inflight.pop(0)
                    await self.claim_abandoned()
                    next_claim = now + max(1.0, self.settings.claim_idle_ms / 2000)
                if now >= next_stats:
                    await self.refresh_stats()
                    next_stats = now + 5.0
                batch = await self.client.xreadgroup(
                    self.group, self.consumer, {self.stream: ">"},
                    count=self.settings.read_batch, block=self.settings.read_block_ms,
                )  # fmt: skip
                for _, entries in batch or []:
                    inflight.append(asyncio.create_task(self.handle_batch(entries, redelivered=False)))
                while inflight and (len(inflight) > 1 or inflight[0].done()):
                    await inflight.pop(0)
        finally:
            await asyncio.gather(*inflight, return_exceptions=True)  # (cancelled with us, if we are)

    async def _wait_for_api(self, stop: asyncio.Event) -> None:
        """While the API server is unreachable, don't re-read pending entries (each read counts as a delivery)."""
        delay = 0.5
        while not stop.is_set():
            try:
                await kube.ping()
                return
            except Exception as exc:  # any failure means "not yet"
                log.info("API server not reachable (%r); checking again in %.1fs", exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(MAX_BACKOFF, delay * 2)

    async def ensure_group(self) -> None:
        try:
            # From the stream's beginning: requests XADDed before the first operator start are not lost.
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def process_own_pending(self) -> None:
        """Entries this consumer read but never acked (it crashed, or a transient failure)."""
        start = "0"
        while True:
            batch = await self.client.xreadgroup(
                self.group, self.consumer, {self.stream: start}, count=self.settings.read_batch
            )
            read = [e for _, es in batch or [] for e in es]
            if not read:
                return
            gone = [entry_id for entry_id, fields in read if not fields]  # trimmed/deleted while pending
            if gone:
                await self.client.xack(self.stream, self.group, *gone)
                await self.client.hdel(self.failures_key, *gone)
            await self.handle_batch([e for e in read if e[1]], redelivered=True)
            start = read[-1][0]

    async def claim_abandoned(self) -> None:
        """Take over entries idle longer than claim_idle_ms in dead consumers' pending lists."""
        cursor = "0-0"
        while True:
            result = await self.client.xautoclaim(
                self.stream, self.group, self.consumer, self.settings.claim_idle_ms, cursor, count=100
            )
            cursor, entries = result[0], [e for e in result[1] if e[1]]
            if entries:
                log.info("claimed %d abandoned request(s)", len(entries))
                await self.handle_batch(entries, redelivered=True)
            if cursor in ("0-0", b"0-0"):
                return

    async def refresh_stats(self) -> None:
        with contextlib.suppress(RedisError):
            for group in await self.client.xinfo_groups(self.stream):
                if group.get("name") == self.group:
                    self.stats.lag = group.get("lag")
                    self.stats.pending = int(group.get("pending") or 0)

    # --- entries
    async def handle_batch(self, entries: list[tuple[str, Fields]], *, redelivered: bool) -> None:
        """Entries of one jobId in stream order (also after that jobId's entries of a batch still in flight),
        different jobIds concurrently (at most `concurrency`). Raises the first failure, after all are done."""
        by_job: dict[str, list[tuple[str, Fields]]] = defaultdict(list)
        for entry_id, fields in entries:
            by_job[_job_id(fields) or entry_id].append((entry_id, fields))
        tasks = []
        for key, items in by_job.items():
            task = asyncio.create_task(self._in_order(items, self._tails.get(key), redelivered=redelivered))
            self._tails[key] = task
            task.add_done_callback(functools.partial(self._forget_tail, key))
            tasks.append(task)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _forget_tail(self, key: str, task: asyncio.Task[None]) -> None:
        if self._tails.get(key) is task:
            del self._tails[key]

    async def _in_order(
        self, items: list[tuple[str, Fields]], after: asyncio.Task[None] | None, *, redelivered: bool
    ) -> None:
        if after is not None:
            await asyncio.wait([after])  # outside the semaphore: waiting must not hold a slot; its failure is its own
        async with self._sem:
            for entry_id, fields in items:
                await self.handle(entry_id, fields, redelivered=redelivered)

    async def handle(self, entry_id: str, fields: Fields, *, redelivered: bool = False) -> str:
        """Process one entry; returns its outcome. Raises when it stays pending: Transient (API trouble, retried
        later, never counted against the entry), Redis errors, or the entry's own failure (counted)."""
        try:
            entry = parse_entry(fields)
            outcome = await self._apply_with_retries(entry, entry_id)
        except InvalidEntry as exc:
            return await self.dead_letter(entry_id, fields, exc.reason)
        except (Transient, RedisError, OSError):
            raise  # not this entry's fault: it stays pending, however often it is delivered
        except Exception as exc:  # raised by this entry's own handling (a bug it triggers): poison if it lasts
            if await self._count_failure(entry_id) >= self.settings.max_deliveries:
                why = f"handling failed {self.settings.max_deliveries} times (last error: {exc!r})"
                return await self.dead_letter(entry_id, fields, why)
            raise
        await self._ack(entry_id, redelivered=redelivered)
        self.stats.requests_total[outcome] += 1
        return outcome

    async def _ack(self, entry_id: str, *, redelivered: bool) -> None:
        if not redelivered:  # read for the first time: it has no failures on record
            await self.client.xack(self.stream, self.group, entry_id)
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.hdel(self.failures_key, entry_id)
        await pipe.execute()

    async def _count_failure(self, entry_id: str) -> int:
        """One more failure of the entry's own handling, kept in Redis: restarts and claims don't reset it."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(self.failures_key, entry_id, 1)
        pipe.expire(self.failures_key, FAILURES_TTL_SECONDS)
        count, _ = await pipe.execute()
        return int(count)

    async def _apply_with_retries(self, entry: Entry, entry_id: str) -> str:
        """Transient trouble is retried here first (cheaper than a re-read); after TRANSIENT_RETRIES the Transient
        goes up and the entry stays pending (the bridge pauses, backing off, then reads it again)."""
        delay = RETRY_DELAY
        for attempt in range(TRANSIENT_RETRIES + 1):
            try:
                return await self._apply(entry, entry_id)
            except Transient as exc:
                self.stats.transient_errors_total += 1
                if attempt == TRANSIENT_RETRIES or self._stop.is_set():
                    raise
                log.info("%s; retrying in %.2fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(MAX_BACKOFF, delay * 2)
        raise AssertionError("unreachable")

    def _namespace(self, entry: Entry) -> str:
        """Where the request's GpuJob lives: a stream writer may only name the namespaces it was allowed."""
        namespace = entry.request.namespace or self.settings.namespace
        allowed = self.settings.bridge_namespaces or [self.settings.namespace]
        if namespace not in allowed and "*" not in allowed:
            raise InvalidEntry(f"namespace {namespace!r} not allowed for stream requests (GPUJOB_BRIDGE_NAMESPACES)")
        return namespace

    async def _apply(self, entry: Entry, entry_id: str) -> str:
        namespace = self._namespace(entry)
        name = job_name(entry.job_id)
        try:
            if entry.action is Action.CANCEL:
                result = await kube.patch_gpujob(namespace, name, {"spec": {"cancel": True}})
                if result is kube.Outcome.ABSENT:
                    raise InvalidEntry(f"cancel: no GpuJob for jobId {entry.job_id!r} in namespace {namespace!r}")
                return Outcome.CANCELLED
            assert isinstance(entry.request, JobRequest)
            created = await kube.create_gpujob(namespace, gpujob_body(entry.request, entry_id))
        except ApiException as exc:
            if not _transient_api_error(exc):
                raise InvalidEntry(_api_reason(exc)) from None
            raise Transient(f"API server answered {exc.status} for {entry.job_id!r}") from None
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise Transient(f"API server unreachable: {exc!r}") from None
        return Outcome.CREATED if created is kube.Outcome.CREATED else Outcome.DUPLICATE

    async def dead_letter(self, entry_id: str, fields: Fields, reason: str) -> str:
        dead = {**{str(k): v for k, v in fields.items()}, "reason": reason, "sourceId": entry_id,
                "consumer": self.consumer}  # fmt: skip
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.settings.dead_letter_stream, dead, maxlen=self.settings.events_maxlen, approximate=True)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.hdel(self.failures_key, entry_id)
        await pipe.execute()
        log.warning("request %s dead-lettered: %s", entry_id, reason)
        self.stats.dead_lettered_total[_reason_kind(reason)] += 1
        self.stats.requests_total[Outcome.DEAD_LETTERED] += 1
        return Outcome.DEAD_LETTERED


def _job_id(fields: Fields) -> str | None:
    try:
        data = json.loads(fields.get("job") or "")
    except (ValueError, TypeError):
        return None
    job_id = data.get("jobId") if isinstance(data, dict) else None
    return job_id if isinstance(job_id, str) else None


def _reason_kind(reason: str) -> str:
    """A bounded label for metrics: the reason's first words, not its details."""
    for kind in ("handling failed", "invalid request", "rejected by the API server", "missing field", "not JSON",
                 "unknown action", "cancel", "must be a JSON object"):  # fmt: skip
        if kind in reason:
            return kind.replace(" ", "_")
    return "other"


async def run_bridge(settings: Settings, stop: asyncio.Event, stats: BridgeStats | None = None) -> None:
    """The intake with its own Redis client, until `stop` is set; never raises (failures are logged)."""
    client = async_client(settings)
    try:
        await Bridge(settings, client, stats=stats or BridgeStats()).run(stop)
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
