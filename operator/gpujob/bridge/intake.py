"""Redis Stream intake: `gpujobs:requests` -> GpuJobs, exactly once.

- One consumer group (`gpujob-operator`); the consumer name is the pod/host name, so replicas share the work.
- A request is acknowledged only after its GpuJob exists (created now, or 409: created before). The GpuJob's
  name derives from the jobId, so a request handled twice (crash between create and ack, a claim from a dead
  consumer) still makes one GpuJob.
- On start the bridge first re-processes its own pending entries, and it periodically claims entries left idle
  by dead consumers (XAUTOCLAIM).
- Entries that can never work (malformed, invalid, rejected by the API server as invalid/forbidden, delivered
  too many times) go to `gpujobs:requests:dead` with the original fields and a readable reason, then are acked.
- Transient failures (API 5xx/429/unreachable) leave the entry pending; the bridge backs off and retries.
- Entries of one jobId in a batch are handled in order (submit then cancel); different jobIds concurrently.
- Redis going away is logged and retried with capped back-off; it never stops the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException
from redis.exceptions import RedisError, ResponseError

from gpujob.api.constants import API_VERSION, KIND, Annotation, Label
from gpujob.api.naming import job_name, label_value
from gpujob.api.request import Action, Entry, InvalidEntry, JobRequest, parse_entry
from gpujob.operator import k8s
from gpujob.settings import Settings

log = logging.getLogger("gpujob.bridge")

MAX_BACKOFF = 30.0
PERMANENT_API_STATUSES = frozenset({400, 403, 404, 422})
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
    dead_lettered_total: Counter[str] = field(default_factory=Counter)
    requests_total: Counter[str] = field(default_factory=Counter)


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

    # --- the loop
    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: never raises on Redis or API trouble, only backs off."""
        delay = 0.5
        while not stop.is_set():
            try:
                await self._serve(stop)
                return
            except (RedisError, OSError) as exc:
                log.warning("bridge lost Redis (%s); reconnecting in %.1fs", exc, delay)
            except Transient as exc:
                log.warning("bridge paused: %s", exc)
                await self._wait_for_api(stop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(MAX_BACKOFF, delay * 2)

    async def _serve(self, stop: asyncio.Event) -> None:
        await self.ensure_group()
        await self.process_own_pending()
        loop = asyncio.get_running_loop()
        next_claim = next_stats = loop.time()
        while not stop.is_set():
            now = loop.time()
            if now >= next_claim:
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
                await self.handle_batch(entries, redelivered=False)

    async def _wait_for_api(self, stop: asyncio.Event) -> None:
        """While the API server is unreachable, don't re-read pending entries (each read counts as a delivery)."""
        delay = 0.5
        while not stop.is_set():
            try:
                await k8s.ping()
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
            entries = [e for _, es in batch or [] for e in es if e[1] is not None]
            if not entries:
                return
            await self.handle_batch(entries, redelivered=True)
            start = entries[-1][0]

    async def claim_abandoned(self) -> None:
        """Take over entries idle longer than claim_idle_ms in dead consumers' pending lists."""
        cursor = "0-0"
        while True:
            result = await self.client.xautoclaim(
                self.stream, self.group, self.consumer, self.settings.claim_idle_ms, cursor, count=100
            )
            cursor, entries = result[0], [e for e in result[1] if e[1] is not None]
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
        by_job: dict[str, list[tuple[str, Fields]]] = defaultdict(list)
        for entry_id, fields in entries:
            by_job[_job_id(fields) or entry_id].append((entry_id, fields))

        async def in_order(items: list[tuple[str, Fields]]) -> None:
            async with self._sem:
                for entry_id, fields in items:
                    await self.handle(entry_id, fields, redelivered=redelivered)

        results = await asyncio.gather(*(in_order(items) for items in by_job.values()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def handle(self, entry_id: str, fields: Fields, *, redelivered: bool = False) -> str | None:
        """Process one entry; returns its outcome, or None when it stays pending (transient trouble)."""
        if redelivered and (deliveries := await self._deliveries(entry_id)) > self.settings.max_deliveries:
            return await self.dead_letter(entry_id, fields, f"delivered {deliveries} times without success")
        try:
            entry = parse_entry(fields)
        except InvalidEntry as exc:
            return await self.dead_letter(entry_id, fields, exc.reason)
        try:
            outcome = await self._apply(entry, entry_id)
        except InvalidEntry as exc:
            return await self.dead_letter(entry_id, fields, exc.reason)
        await self.client.xack(self.stream, self.group, entry_id)
        self.stats.requests_total[outcome] += 1
        return outcome

    async def _apply(self, entry: Entry, entry_id: str) -> str:
        namespace = entry.request.namespace or self.settings.namespace
        name = job_name(entry.job_id)
        try:
            if entry.action is Action.CANCEL:
                result = await k8s.patch_gpujob(namespace, name, {"spec": {"cancel": True}})
                if result is k8s.Outcome.ABSENT:
                    raise InvalidEntry(f"cancel: no GpuJob for jobId {entry.job_id!r} in namespace {namespace!r}")
                return Outcome.CANCELLED
            assert isinstance(entry.request, JobRequest)
            created = await k8s.create_gpujob(namespace, gpujob_body(entry.request, entry_id))
        except ApiException as exc:
            if exc.status in PERMANENT_API_STATUSES:
                raise InvalidEntry(_api_reason(exc)) from None
            raise Transient(f"API server answered {exc.status} for {entry.job_id!r}") from None
        except (OSError, TimeoutError) as exc:
            raise Transient(f"API server unreachable: {exc!r}") from None
        return Outcome.CREATED if created is k8s.Outcome.CREATED else Outcome.DUPLICATE

    async def _deliveries(self, entry_id: str) -> int:
        rows = await self.client.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    async def dead_letter(self, entry_id: str, fields: Fields, reason: str) -> str:
        dead = {**{str(k): v for k, v in fields.items()}, "reason": reason, "sourceId": entry_id,
                "consumer": self.consumer}  # fmt: skip
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.settings.dead_letter_stream, dead, maxlen=self.settings.events_maxlen, approximate=True)
        pipe.xack(self.stream, self.group, entry_id)
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
    for kind in ("invalid request", "rejected by the API server", "delivered", "missing field", "not JSON",
                 "unknown action", "cancel", "must be a JSON object"):  # fmt: skip
        if kind in reason:
            return kind.replace(" ", "_")
    return "other"
