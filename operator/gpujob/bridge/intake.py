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
- Binary-safe and total: entries are read as bytes and decoded per field; whatever an entry holds (bytes that
  are not UTF-8, JSON nested thousands deep, megabytes) it ends as a GpuJob or as a dead letter with the reason.
  Entries are read through a Lua script that measures each entry inside Redis first: one over MAX_READ_BYTES
  never reaches the operator whole (its fields come cut to PREVIEW_BYTES, and are dead-lettered so), so the
  operator's memory stays bounded whatever is XADDed. The script cannot block, so an idle intake polls
  (every IDLE_POLL seconds; back to back while entries keep coming).
- Redis going away is logged and retried with capped back-off; it never stops the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from gpujob import kube
from gpujob.api.constants import API_VERSION, KIND, Annotation, Label
from gpujob.api.events import REJECTED
from gpujob.api.naming import job_name, label_value
from gpujob.api.request import (
    Action,
    Entry,
    InvalidEntry,
    JobRequest,
    RequestOutcome,
)
from gpujob.bridge.failures import Forbidden, Transient, api_failure, reason_kind
from gpujob.bridge.reading import (
    MAX_READ_BYTES,
    PREVIEW_BYTES,
    PREVIEW_FIELDS,
    READ_SCRIPT,
    Read,
    readable_job_id,
    reads_of,
)
from gpujob.events import EventPublisher, async_client, make_event
from gpujob.logging import bind_job, get_logger
from gpujob.settings import Settings

log = get_logger("gpujob.bridge")

MAX_BACKOFF = 30.0
TRANSIENT_RETRIES = 4  # in place, with back-off from RETRY_DELAY: ~4 s before the entry is left pending
# Seconds of 403s on a request's GpuJob (in a row, in place) before the request is rejected. A kube-apiserver that
# has just restarted answers 403 to everyone until its authorizer's caches fill: seen on the real control plane,
# right after its 503s, for 2-5 s; four quick retries (shared with the 503s) dead-lettered 8 valid requests.
FORBIDDEN_PATIENCE = 30.0
RETRY_DELAY = 0.25
HEALTHY_AFTER = 10.0  # seconds a serving period must last for the reconnect back-off to start over
FAILURES_TTL_SECONDS = 7 * 24 * 3600  # a failure count outlives no entry by long (entries deleted by hand)
IDLE_POLL = 0.05  # seconds between reads while the stream has nothing new
# How long the intake remembers a jobId it created a GpuJob for (a redelivery or re-send of its request after
# the GpuJob is gone is not run again) and a cancel that came before its submit: longer than any entry stays
# pending or a backend retries a send.
REMEMBER_SECONDS = 7 * 24 * 3600

# After a create: record the jobId as seen and, unless a cancel for it is waiting (the submit must apply it
# first), acknowledge the entry, in one round trip. KEYS: seen, cancel, stream, failures; ARGV: entry id,
# seconds to remember, group. Replies 1 when a cancel is waiting (the entry is not acknowledged yet), else 0.
FINISH_SCRIPT = """
redis.call("SET", KEYS[1], ARGV[1], "EX", ARGV[2], "NX")
if redis.call("EXISTS", KEYS[2]) == 1 then return 1 end
redis.call("XACK", KEYS[3], ARGV[3], ARGV[1])
redis.call("HDEL", KEYS[4], ARGV[1])
return 0
"""


@dataclass
class BridgeStats:
    """Read by the metrics collector at scrape time (no I/O there); lag/pending are refreshed by the bridge."""

    lag: int | None = None
    pending: int = 0
    dead_lettered_total: Counter[str] = field(default_factory=Counter)  # by _reason_kind
    requests_total: Counter[str] = field(default_factory=Counter)  # by RequestOutcome
    transient_errors_total: int = 0  # API calls that failed transiently (each retry counts)
    redis_up: bool | None = None  # the last Redis call worked (gpujob_bridge_redis_up); None before the first


def gpujob_body(request: JobRequest, entry_id: str, *, cancelled: bool = False) -> dict[str, Any]:
    """The GpuJob of a request (pure): name from the jobId, the jobId as label and in spec; created cancelled
    when its cancel came first."""
    spec = request.to_spec()
    if cancelled:
        spec = spec.model_copy(update={"cancel": True})
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


@dataclass
class Bridge:
    settings: Settings
    client: Any  # a redis.asyncio.Redis replying bytes (intake_client); its stubs type replies as unions
    stats: BridgeStats = field(default_factory=BridgeStats)
    _sem: asyncio.Semaphore = field(init=False)
    _stop: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _tails: dict[str, asyncio.Task[None]] = field(init=False, default_factory=dict)  # jobId -> its latest work
    _script: Any = field(init=False)
    _finish: Any = field(init=False)
    # (namespace, jobId) -> (seen, cancel) as read for a whole batch at once (one MGET, not one per entry)
    _recalled: dict[tuple[str, str], tuple[Any, Any]] = field(init=False, default_factory=dict)
    _acked: set[str] = field(init=False, default_factory=set)  # entries the finish script acknowledged
    _events: EventPublisher = field(init=False)

    def __post_init__(self) -> None:
        if self.client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the intake reads bytes: give it intake_client(settings), not a decoding client")
        self._sem = asyncio.Semaphore(self.settings.concurrency)
        self._script = self.client.register_script(READ_SCRIPT)
        self._finish = self.client.register_script(FINISH_SCRIPT)
        self._events = EventPublisher(self.client, self.settings)

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
                self.stats.redis_up = False
                log.warning("bridge lost Redis, reconnecting", error=str(exc), retry_in=delay)
            except Transient as exc:
                log.warning("bridge paused until the API server answers", error=str(exc))
                await self._wait_for_api(stop)
            except Exception:  # a bug must not end the intake for the operator's lifetime
                log.exception("bridge failed, restarting", retry_in=delay)
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
                reads = await self._read("new", ">")
                if reads:
                    inflight.append(asyncio.create_task(self.handle_batch(reads, redelivered=False)))
                while inflight and (len(inflight) > 1 or inflight[0].done()):
                    await inflight.pop(0)
                if not reads:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), IDLE_POLL)
        finally:
            await asyncio.gather(*inflight, return_exceptions=True)  # (cancelled with us, if we are)

    async def _read(self, mode: str, start: str, min_idle_ms: int = 0) -> list[Read]:
        rows = await self._script(keys=[self.stream], args=self._script_args(mode, start, min_idle_ms))
        self.stats.redis_up = True
        return reads_of(rows)

    def _script_args(self, mode: str, start: str, min_idle_ms: int) -> list[Any]:
        return [mode, self.group, self.consumer, self.settings.read_batch, start, MAX_READ_BYTES, PREVIEW_BYTES,
                PREVIEW_FIELDS, min_idle_ms]  # fmt: skip

    async def _wait_for_api(self, stop: asyncio.Event) -> None:
        """While the API server is unreachable, don't re-read pending entries (each read counts as a delivery)."""
        delay = 0.5
        while not stop.is_set():
            try:
                await kube.ping()
                return
            except Exception as exc:  # any failure means "not yet"
                log.info("API server not reachable, checking again", error=repr(exc), retry_in=delay)
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
        while reads := await self._read("own", start):
            await self._drop_gone([r.entry_id for r in reads if r.gone])
            await self.handle_batch([r for r in reads if not r.gone], redelivered=True)
            start = reads[-1].entry_id

    async def claim_abandoned(self) -> None:
        """Take over entries idle longer than claim_idle_ms in dead consumers' pending lists."""
        cursor = "0-0"
        while True:
            args = self._script_args("claim", cursor, self.settings.claim_idle_ms)
            raw_cursor, rows, _deleted = await self._script(keys=[self.stream], args=args)  # (Redis 7 drops those)
            cursor = raw_cursor.decode() if isinstance(raw_cursor, bytes) else str(raw_cursor)
            reads = reads_of(rows)
            await self._drop_gone([r.entry_id for r in reads if r.gone])
            if entries := [r for r in reads if not r.gone]:
                log.info("abandoned requests claimed", count=len(entries))
                await self.handle_batch(entries, redelivered=True)
            if cursor == "0-0":
                return

    async def _drop_gone(self, entry_ids: list[str]) -> None:
        """Entries trimmed or deleted while pending: nothing is left to handle (or to blame), only to ack."""
        if entry_ids:
            await self.client.xack(self.stream, self.group, *entry_ids)
            await self.client.hdel(self.failures_key, *entry_ids)

    async def refresh_stats(self) -> None:
        with contextlib.suppress(RedisError):
            for group in await self.client.xinfo_groups(self.stream):
                if _text(group.get("name")) == self.group:
                    self.stats.lag = group.get("lag")
                    self.stats.pending = int(group.get("pending") or 0)

    # --- entries
    async def handle_batch(self, reads: list[Read], *, redelivered: bool) -> None:
        """Entries of one jobId in stream order (also after that jobId's entries of a batch still in flight),
        different jobIds concurrently (at most `concurrency`). Raises the first failure, after all are done."""
        by_job: dict[str, list[tuple[Read, Entry | InvalidEntry]]] = defaultdict(list)
        for read in reads:
            parsed = read.parsed()
            by_job[read.entry_id if isinstance(parsed, InvalidEntry) else parsed.job_id].append((read, parsed))
        # The tails are registered before anything here awaits: a later batch's entries of a jobId must find them.
        entries = [p for items in by_job.values() for _, p in items if isinstance(p, Entry)]
        recalling = asyncio.ensure_future(self._recall(entries))
        tasks = []
        for key, items in by_job.items():
            work = self._in_order(items, self._tails.get(key), recalling, redelivered=redelivered)
            task = asyncio.create_task(work)
            self._tails[key] = task
            task.add_done_callback(functools.partial(self._forget_tail, key))
            tasks.append(task)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        [recalled] = await asyncio.gather(recalling, return_exceptions=True)
        for job in recalled if isinstance(recalled, list) else []:  # those no submit took: read afresh later
            self._recalled.pop(job, None)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _recall(self, entries: list[Entry]) -> list[tuple[str, str]]:
        """What the intake remembers of the batch's submitted jobIds, in one MGET (a stale answer is safe: the
        create's 409 and the finish script's cancel check catch what changed since)."""
        wanted = [
            (e.request.namespace or self.settings.namespace, e.job_id) for e in entries if e.action is Action.SUBMIT
        ]
        if wanted:
            keys = [self._memo(what, ns, job_id) for ns, job_id in wanted for what in ("seen", "cancel")]
            values = await self.client.mget(keys)
            for i, key in enumerate(wanted):
                self._recalled[key] = (values[2 * i], values[2 * i + 1])
        return wanted

    def _forget_tail(self, key: str, task: asyncio.Task[None]) -> None:
        if self._tails.get(key) is task:
            del self._tails[key]

    async def _in_order(
        self,
        items: list[tuple[Read, Entry | InvalidEntry]],
        after: asyncio.Task[None] | None,
        recalling: asyncio.Future[list[tuple[str, str]]],
        *,
        redelivered: bool,
    ) -> None:
        if after is not None:
            await asyncio.wait([after])  # outside the semaphore: waiting must not hold a slot; its failure is its own
        await recalling  # (its failure is a Redis error: the entries stay pending)
        async with self._sem:
            for read, parsed in items:
                await self.handle(read, parsed, redelivered=redelivered)

    async def handle(self, read: Read, parsed: Entry | InvalidEntry, *, redelivered: bool = False) -> RequestOutcome:
        """Process one entry; returns its outcome. Raises when it stays pending: Transient (API trouble, retried
        later, never counted against the entry), Redis errors, or the entry's own failure (counted)."""
        try:
            if isinstance(parsed, InvalidEntry):
                raise parsed
            outcome = await self._apply_with_retries(parsed, read.entry_id)
        except InvalidEntry as exc:
            return await self.dead_letter(read, exc.reason)
        except (Transient, RedisError, OSError):
            raise  # not this entry's fault: it stays pending, however often it is delivered
        except Exception as exc:  # raised by this entry's own handling (a bug it triggers): poison if it lasts
            if await self._count_failure(read.entry_id) >= self.settings.max_deliveries:
                why = f"handling failed {self.settings.max_deliveries} times (last error: {exc!r})"
                return await self.dead_letter(read, why[:1000])
            raise
        if read.entry_id in self._acked:
            self._acked.discard(read.entry_id)
        else:
            await self._ack(read.entry_id, redelivered=redelivered)
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

    async def _apply_with_retries(self, entry: Entry, entry_id: str) -> RequestOutcome:
        """Transient trouble is retried here first (cheaper than a re-read); after TRANSIENT_RETRIES the Transient
        goes up and the entry stays pending (the bridge pauses, backing off, then reads it again). A 403 (RBAC
        or a quota) is retried in place for FORBIDDEN_PATIENCE seconds, then rejects the request: an apiserver
        that has just restarted refuses everyone for a moment, but one namespace the operator may not write to
        must not hold up the whole stream. Stopping leaves the entry pending, never rejected."""
        delay = RETRY_DELAY
        loop = asyncio.get_running_loop()
        transient, forbidden_since = 0, None
        with bind_job(entry.job_id, entry=entry_id):  # its lines (ours, the API wrapper's) name the request
            for attempt in itertools.count(1):
                try:
                    return await self._apply(entry, entry_id)
                except Transient as exc:
                    self.stats.transient_errors_total += 1
                    transient += 1
                    if transient > TRANSIENT_RETRIES or self._stop.is_set():
                        raise
                    error = str(exc)
                except Forbidden as exc:
                    self.stats.transient_errors_total += 1
                    forbidden_since = loop.time() if forbidden_since is None else forbidden_since
                    if self._stop.is_set():
                        raise Transient(exc.reason) from None
                    if loop.time() - forbidden_since >= FORBIDDEN_PATIENCE:
                        raise InvalidEntry(exc.reason) from None
                    error = exc.reason
                log.info("request failed, retrying", error=error, retry=attempt, retry_in=delay)
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

    def _memo(self, what: str, namespace: str, job_id: str) -> str:
        """Key of what the intake remembers about one jobId: `seen` (a GpuJob was created for it) or `cancel`
        (a cancel came before any GpuJob), for REMEMBER_SECONDS."""
        return f"{self.stream}:{what}:{namespace}/{job_id}"

    async def _apply(self, entry: Entry, entry_id: str) -> RequestOutcome:
        namespace = self._namespace(entry)
        try:
            if entry.action is Action.CANCEL:
                return await self._cancel(namespace, entry.job_id, entry_id)
            assert isinstance(entry.request, JobRequest)
            return await self._submit(namespace, entry.request, entry_id)
        except (RedisError, InvalidEntry):
            raise
        except Exception as exc:
            raise api_failure(exc, entry.job_id) from None

    async def _submit(self, namespace: str, request: JobRequest, entry_id: str) -> RequestOutcome:
        """Create the GpuJob, once per jobId for REMEMBER_SECONDS (also after the GpuJob is gone: a TTL-deleted
        job is not run again by a redelivery or a re-send), cancelled at once when its cancel came first."""
        seen_key, cancel_key = (
            self._memo("seen", namespace, request.job_id),
            self._memo("cancel", namespace, request.job_id),
        )
        recalled = self._recalled.pop((namespace, request.job_id), None)
        seen, cancel = recalled if recalled is not None else await self.client.mget(seen_key, cancel_key)
        if seen is not None:  # its GpuJob was made (from this entry or an earlier one); it may be gone by now
            if cancel is not None:  # finish what a crash between that create and its cancel check cut short
                await kube.patch_gpujob(namespace, job_name(request.job_id), {"spec": {"cancel": True}})
            return RequestOutcome.DUPLICATE
        outcome = await kube.create_gpujob(namespace, gpujob_body(request, entry_id, cancelled=cancel is not None))
        args = [entry_id, REMEMBER_SECONDS, self.group]
        if await self._finish(keys=[seen_key, cancel_key, self.stream, self.failures_key], args=args) == 0:
            self._acked.add(entry_id)
        elif cancel is None:  # the cancel landed (on any replica) while we created: apply it, then ack
            await kube.patch_gpujob(namespace, job_name(request.job_id), {"spec": {"cancel": True}})
        return RequestOutcome.CREATED if outcome is kube.Effect.CREATED else RequestOutcome.DUPLICATE

    async def _cancel(self, namespace: str, job_id: str, entry_id: str) -> RequestOutcome:
        """Cancel the jobId's GpuJob; before it exists (its submit is on another replica, retried, or late), the
        cancel is remembered and the submit creates the GpuJob cancelled. Written before the second look, read
        by the submit after its create: whichever comes second sees the other, so no order loses the cancel."""
        patch = {"spec": {"cancel": True}}
        name = job_name(job_id)
        if await kube.patch_gpujob(namespace, name, patch) is kube.Effect.PATCHED:
            return RequestOutcome.CANCELLED
        await self.client.set(self._memo("cancel", namespace, job_id), entry_id, ex=REMEMBER_SECONDS)
        if await kube.patch_gpujob(namespace, name, patch) is kube.Effect.PATCHED:
            return RequestOutcome.CANCELLED
        return RequestOutcome.CANCEL_REMEMBERED

    async def dead_letter(self, read: Read, reason: str) -> RequestOutcome:
        """The entry's fields as read (bytes, cut when it was too large) and why, to the dead-letter stream; first
        a `rejected` event for its jobId when one can be read (the backend hears about every request)."""
        await self._publish_rejected(read, reason)
        extra = {"reason": reason, "sourceId": read.entry_id, "consumer": self.consumer}
        if read.cut:
            extra["size"] = str(read.size)
        dead = {**read.fields, **{k.encode(): v.encode() for k, v in extra.items()}}
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.settings.dead_letter_stream, dead, maxlen=self.settings.events_maxlen, approximate=True)
        pipe.xack(self.stream, self.group, read.entry_id)
        pipe.hdel(self.failures_key, read.entry_id)
        await pipe.execute()
        log.warning("request dead-lettered", entry=read.entry_id, reason=reason)
        self.stats.dead_lettered_total[reason_kind(reason)] += 1
        self.stats.requests_total[RequestOutcome.DEAD_LETTERED] += 1
        return RequestOutcome.DEAD_LETTERED

    async def _publish_rejected(self, read: Read, reason: str) -> None:
        """A `rejected` event on the jobId's channel, state and the events stream, published before the dead letter
        is written (a crash in between repeats the dead letter, and the event is not published twice: see below).
        Nothing when no valid jobId can be read (also from an entry cut for its size), and nothing when the jobId
        already has events or a GpuJob made from the stream (a bad resend of a live or finished job must not end it
        for its subscribers). Redis errors go up (the entry stays pending); anything else is logged and the dead
        letter is written regardless."""
        found = None if read.cut else readable_job_id(read.fields)  # a cut `job` is not the request sent
        if found is None:
            return
        job_id, namespace = found
        event = make_event(job_id, REJECTED, 0.0, f"request rejected: {reason}", reason=reason,
                           source="operator", sourceId=read.entry_id)  # fmt: skip
        try:
            seen = self._memo("seen", namespace or self.settings.namespace, job_id)
            await self._events.publish_if_unheard(event, seen)
        except (RedisError, OSError):
            raise
        except Exception:  # a bug here must not keep the entry from its dead letter (the intake stays total)
            log.exception("rejected event not published", job_id=job_id)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def intake_client(settings: Settings) -> Any:
    """The intake's own Redis client: it replies bytes (each field is decoded, and may fail to, by itself)."""
    return async_client(settings, decode_responses=False)


async def run_bridge(settings: Settings, stop: asyncio.Event, stats: BridgeStats | None = None) -> None:
    """The intake with its own Redis client, until `stop` is set; never raises (failures are logged)."""
    client = intake_client(settings)
    try:
        await Bridge(settings, client, stats=stats or BridgeStats()).run(stop)
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
