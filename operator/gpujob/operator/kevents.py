"""Kubernetes Events about GpuJobs (events.k8s.io/v1), for `kubectl describe gj` and `kubectl get events`.

- Which Events a pass posts is pure (`events_for`): derived from what `decide` computed, i.e. the phase
  transitions, the attempt it started, the Scheduled condition flipping to True, and a spec change under a live
  attempt. Nothing else decides.
- `EventRecorder` posts them in the background, never in a reconcile's way: `record()` only files them in a
  bounded queue (full = dropped and counted), one task posts them. Aggregated as client-go's events/v1 recorder
  does: an Event with the same regarding object, action, reason, type and note within SERIES_WINDOW_SECONDS bumps
  `series.count` of the first one (one patch per SERIES_FLUSH_SECONDS at most) instead of creating another. New
  Events are rate-limited per job (token bucket: a burst, then one per refill period), so a hot loop cannot flood
  the API. Failures are logged and dropped: Events are best effort.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from gpujob import kube
from gpujob.api.constants import API_VERSION, GROUP, KIND, ConditionType, EventReason, Phase, Reason
from gpujob.api.models import GpuJobStatus
from gpujob.logging import get_logger
from gpujob.operator.status import Decision

log = get_logger("gpujob.kevents")

REPORTING_CONTROLLER: Final = f"{GROUP}/operator"
NORMAL: Final = "Normal"
WARNING: Final = "Warning"
NOTE_LIMIT_BYTES: Final = 1024  # events.k8s.io/v1 validation: note is at most 1 kB
SERIES_WINDOW_SECONDS: Final = 360.0  # client-go's events/v1 recorder keeps a series open 6 minutes
SERIES_FLUSH_SECONDS: Final = 5.0  # at most one series patch per Event in this time
BURST: Final = 25  # new Events per job at once (client-go's spam filter: 25) ...
REFILL_SECONDS: Final = 10.0  # ... then one more per this many seconds
QUEUE_LIMIT: Final = 1000
MEMORY_LIMIT: Final = 4096  # series and token buckets kept; idle ones are forgotten beyond this
LIVE_PHASES: Final = frozenset({Phase.SCHEDULED, Phase.PENDING, Phase.RUNNING})
SPEC_CHANGE_NOTE: Final = (
    "spec changed (generation {generation}) while attempt {attempt} is {phase}: its Pod keeps the spec it was "
    "created with; the change applies to the next attempt. To restart now with the new spec, suspend and resume "
    "the job (spec.suspend true, then false)."
)


@dataclass(frozen=True)
class EventSpec:
    """One Event to post about a GpuJob."""

    type: str  # Normal | Warning
    reason: EventReason
    action: str  # what the operator did or saw (events.k8s.io/v1 `action`)
    note: str


def _because(reason: str | None, message: str) -> str:
    return f"{reason}: {message}" if reason and message else (reason or message)


def events_for(old: GpuJobStatus, decision: Decision, generation: int | None) -> list[EventSpec]:
    """The Events of one written status (pure): `old` is the status the pass started from."""
    new = decision.status
    out: list[EventSpec] = _queue_events(old, new)  # admitted (before its attempt), queued, preempted
    if decision.create_attempt is not None:
        cause = None  # why this attempt: a retry, a resume, the last Pod deleted or evicted from outside
        if new.message and new.message != "Pod created":
            plain = new.reason in (Reason.POD_CREATED, Reason.RESUMED)
            cause = new.message if plain else _because(new.reason, new.message)
        note = f"attempt {decision.create_attempt}: created Pod {new.pod_name or ''}".rstrip()
        out.append(EventSpec(NORMAL, EventReason.ATTEMPT_STARTED, "CreatePod", f"{note} ({cause})" if cause else note))
    was = next((c for c in old.conditions if c.type == ConditionType.FALLBACK), None)
    now = next((c for c in new.conditions if c.type == ConditionType.FALLBACK), None)
    if now is not None and now.status == "True" and (was is None or was.status != "True"):  # moved to CPU
        out.append(EventSpec(WARNING, EventReason.FALLBACK, "Fallback", now.message))
    was = next((c for c in old.conditions if c.type == ConditionType.SCHEDULED), None)
    now = next((c for c in new.conditions if c.type == ConditionType.SCHEDULED), None)
    if now is not None and now.status == "True" and (was is None or was.status != "True") and new.node_name:
        note = f"attempt {new.attempts}: Pod {new.pod_name} bound to node {new.node_name}"
        out.append(EventSpec(NORMAL, EventReason.SCHEDULED, "Schedule", note))
    for t in decision.transitions:
        because = _because(t.reason, t.message)
        if t.new is Phase.PENDING:
            out.append(EventSpec(WARNING, EventReason.WAITING, "Schedule", f"attempt {t.attempt}: {because}"))
        elif t.new is Phase.RUNNING:
            out.append(EventSpec(NORMAL, EventReason.RUNNING, "Run", t.message))
        elif t.new is Phase.RETRYING:
            out.append(EventSpec(WARNING, EventReason.RETRYING, "Retry", because))
        elif t.new is Phase.FAILED:
            out.append(EventSpec(WARNING, EventReason.FAILED, "Fail", because))
        elif t.new is Phase.SUCCEEDED:
            out.append(EventSpec(NORMAL, EventReason.SUCCEEDED, "Complete", t.message))
        elif t.new is Phase.SUSPENDED:
            out.append(EventSpec(NORMAL, EventReason.SUSPENDED, "Suspend", "spec.suspend is true: Pod deleted"))
        elif t.new is Phase.CANCELLED:
            out.append(EventSpec(NORMAL, EventReason.CANCELLED, "Cancel", "spec.cancel is true: stopped for good"))
        elif t.new is Phase.SCHEDULED and t.reason == Reason.RESUMED:
            out.append(EventSpec(NORMAL, EventReason.RESUMED, "Resume", "spec.suspend is false: new attempt"))
    spec_changed = (
        generation is not None
        and old.observed_generation is not None
        and generation > old.observed_generation
        and old.phase in LIVE_PHASES
        and new.phase in LIVE_PHASES
        and decision.create_attempt is None
    )
    if spec_changed and new.phase is not None:
        note = SPEC_CHANGE_NOTE.format(generation=generation, attempt=new.attempts, phase=new.phase.value.lower())
        out.append(EventSpec(NORMAL, EventReason.SPEC_CHANGED, "Observe", note))
    return out


def _queue_events(old: GpuJobStatus, new: GpuJobStatus) -> list[EventSpec]:
    """Queue admission (docs/queues.md), from the Admitted condition: an Event when its status or reason changes
    (not for each new position), none for a suspend (the Suspended Event says it)."""
    was = next((c for c in old.conditions if c.type == ConditionType.ADMITTED), None)
    now = next((c for c in new.conditions if c.type == ConditionType.ADMITTED), None)
    if now is None or (was is not None and (was.status, was.reason) == (now.status, now.reason)):
        return []
    if now.status == "True":
        return [EventSpec(NORMAL, EventReason.ADMITTED, "Admit", now.message)]
    if now.reason == Reason.PREEMPTED:
        return [EventSpec(NORMAL, EventReason.PREEMPTED, "Preempt", now.message)]
    if now.reason in (Reason.SUSPENDED, Reason.CPU_FALLBACK):  # the Suspended or Fallback Event says it
        return []
    return [EventSpec(NORMAL, EventReason.QUEUED, "Admit", _because(now.reason, now.message))]


def micro_time(moment: datetime) -> str:
    """A MicroTime (RFC 3339 with microseconds, UTC)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _bounded_note(note: str) -> str:
    data = note.encode()
    if len(data) <= NOTE_LIMIT_BYTES:
        return note
    return data[: NOTE_LIMIT_BYTES - 3].decode(errors="ignore") + "..."


SeriesKey = tuple[str, str, str, str, str, str]  # namespace, uid, action, reason, type, note


@dataclass
class _Series:
    namespace: str
    name: str
    count: int
    last: float  # monotonic time of the last occurrence
    last_wall: datetime
    flushed: float = 0.0  # monotonic time of the last patch
    scheduled: bool = False  # a patch is pending


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class EventRecorder:
    instance: str  # the operator's Pod name (reportingInstance)
    create: Callable[[str, dict[str, Any]], Awaitable[Any]] = kube.create_event
    patch: Callable[[str, str, dict[str, Any]], Awaitable[Any]] = kube.patch_event
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], datetime] = lambda: datetime.now(UTC)
    burst: int = BURST
    refill_seconds: float = REFILL_SECONDS
    flush_seconds: float = SERIES_FLUSH_SECONDS
    window_seconds: float = SERIES_WINDOW_SECONDS
    queue_limit: int = QUEUE_LIMIT
    dropped: int = 0  # Events not posted: rate limit or full queue
    failed: int = 0  # posts the API server refused or that failed
    _queue: asyncio.Queue[tuple[str, SeriesKey, dict[str, Any]]] = field(init=False)
    _series: dict[SeriesKey, _Series] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _names: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self._queue = asyncio.Queue(self.queue_limit)

    # --- the reconciler's side: never blocks, never raises
    def observe(self, job: dict[str, Any], decision: Decision) -> None:
        """After a status write (`job` as stored): file the Events of the pass that decided it."""
        if decision.previous is not None:
            self.record(job, events_for(decision.previous, decision, (job.get("metadata") or {}).get("generation")))

    def record(self, job: dict[str, Any], specs: list[EventSpec]) -> None:
        meta = job.get("metadata") or {}
        namespace, uid = meta.get("namespace", ""), meta.get("uid", "")
        for spec in specs:
            key: SeriesKey = (namespace, uid, spec.action, spec.reason, spec.type, spec.note)
            now = self.clock()
            held = self._series.get(key)
            if held is not None and now - held.last <= self.window_seconds:
                held.count += 1
                held.last, held.last_wall = now, self.wall()
                if not held.scheduled:
                    held.scheduled = True
                    delay = max(0.0, held.flushed + self.flush_seconds - now)
                    asyncio.get_running_loop().call_later(delay, self._put, "patch", key, {})
                continue
            if not self._take(uid, now):
                self.dropped += 1
                continue
            body = self._body(meta, spec)
            self._forget_idle(now)
            self._series[key] = _Series(namespace, body["metadata"]["name"], 1, now, self.wall())
            self._put("create", key, body)

    def _put(self, kind: str, key: SeriesKey, body: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((kind, key, body))
        except asyncio.QueueFull:
            self.dropped += 1
            held = self._series.get(key)
            if held is not None:
                held.scheduled = False
                if kind == "create":
                    del self._series[key]

    def _take(self, uid: str, now: float) -> bool:
        bucket = self._buckets.get(uid)
        if bucket is None:
            bucket = self._buckets[uid] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) / self.refill_seconds)
        bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _forget_idle(self, now: float) -> None:
        if len(self._series) >= MEMORY_LIMIT:
            for key in [k for k, s in self._series.items() if now - s.last > self.window_seconds and not s.scheduled]:
                del self._series[key]
        if len(self._buckets) >= MEMORY_LIMIT:  # a bucket refilled to its burst is the same as none
            full = self.burst * self.refill_seconds
            for uid in [u for u, b in self._buckets.items() if now - b.at >= full]:
                del self._buckets[uid]

    def _body(self, meta: dict[str, Any], spec: EventSpec) -> dict[str, Any]:
        name, namespace = meta.get("name", ""), meta.get("namespace", "")
        stem = name[:200].rstrip(".-") or "gpujob"
        return {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": f"{stem}.{time.time_ns():x}{next(self._names):x}", "namespace": namespace},
            "eventTime": micro_time(self.wall()),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self.instance[:128] or "gpujob-operator",
            "action": spec.action,
            "reason": spec.reason.value,
            "type": spec.type,
            "note": _bounded_note(spec.note),
            "regarding": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": name,
                "namespace": namespace,
                "uid": meta.get("uid", ""),
            },
        }

    # --- the poster
    async def run(self) -> None:
        while True:
            kind, key, body = await self._queue.get()
            try:
                await self._post(kind, key, body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # best effort: an Event is never worth a retry loop
                self.failed += 1
                level = logging.DEBUG if self.failed > 10 and self.failed % 100 else logging.WARNING
                job = (body.get("regarding") or {}).get("name")  # (a series' patch names only its Event)
                where = {"job": f"{key[0]}/{job}"} if job else {"namespace": key[0]}
                log.log(
                    level,
                    "posting a Kubernetes Event failed",
                    error=kube.message_of(exc),
                    failed=self.failed,  # so far
                    reason=key[3],
                    write=kind,
                    **where,
                )
                if kind == "create":
                    self._series.pop(key, None)  # the next occurrence creates it anew

    async def _post(self, kind: str, key: SeriesKey, body: dict[str, Any]) -> None:
        if kind == "create":
            await self.create(key[0], body)
            return
        held = self._series.get(key)
        if held is None:
            return
        held.scheduled = False
        held.flushed = self.clock()
        patch = {"series": {"count": held.count, "lastObservedTime": micro_time(held.last_wall)}}
        if await self.patch(held.namespace, held.name, patch) == kube.Effect.ABSENT:
            self._series.pop(key, None)  # expired or deleted: the next occurrence creates it anew

    def pending(self) -> int:
        return self._queue.qsize()
