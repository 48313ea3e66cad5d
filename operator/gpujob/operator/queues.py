"""The queue manager (docs/queues.md): GpuQueues in, admissions out.

It holds the GpuQueues (kopf's watch, and a list at start-up so that no job is decided on before the queues are
known), builds the workloads from the runtime's job cache, runs the pure `admission.plan()` whenever something
relevant changed (at most every `interval` seconds) and asks the reconciler to look at each job whose word
changed. Admitted jobs get their admission through `gate()`, which the reconciler hands to the pure `decide()`:
the pass that starts the attempt writes the admission with it (one status write, guarded by the resourceVersion)
before it creates the Pod; until the job's status holds it, the plans count it as admitted. Waiting jobs get
their reason and position the same way. Durable admission state lives only in the statuses (no Pod exists
before its admission is stored), so a restarted operator rebuilds the usage from them and never over-admits.
With no GpuQueue at all there is no gate: every job is admitted at once, as before queues.

While a job waits, the manager also publishes its queue and position on the job's event channel (rate-limited,
with an estimated start once the queue's recent durations allow one: `positions`), and keeps each queue's
figures for the metrics (pending, usage vs quota, borrowed, admissions and their wait, preemptions).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from pydantic import ValidationError

from gpujob import kube
from gpujob.api.constants import ConditionType, Phase
from gpujob.api.events import ProgressEvent
from gpujob.api.models import Admission, GpuJobSpec
from gpujob.api.naming import job_id_of
from gpujob.api.quantity import parse_quantity
from gpujob.api.queues import GpuQueueSpec, WithinQueue
from gpujob.events import make_event
from gpujob.logging import get_logger
from gpujob.metrics import Metrics, QueueStats
from gpujob.operator.admission import Plan, Queue, Wait, Waiting, Workload, plan
from gpujob.operator.cache import JobKey, Store
from gpujob.operator.conventions import iso, parse_time
from gpujob.operator.positions import DEFAULT_EXACT, Durations, Throttle, estimate_wait, published_position
from gpujob.operator.status import QueueGate

log = get_logger(__name__)

# Resources of a job's request that a queue may count besides its GPUs (spec.resources.requests).
COUNTED_REQUESTS: Final = ("cpu", "memory")
TERMINAL: Final = frozenset(p.value for p in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED))
# Ends whose run time feeds the start estimate (a cancelled job says nothing about how long jobs take).
FINISHED: Final = frozenset(p.value for p in (Phase.SUCCEEDED, Phase.FAILED))
EVENT_SOURCE: Final = "operator"  # as gpujob.operator.progress marks the operator's events
_COUNTED_MEMORY: Final = 10_000  # finished jobs whose run time was counted (each once)


def queue_of(body: dict[str, Any]) -> Queue | None:
    """A GpuQueue object as admission's Queue (None when its spec does not parse: it is left out, with a log)."""
    name = (body.get("metadata") or {}).get("name", "")
    try:
        spec = GpuQueueSpec.model_validate(body.get("spec") or {})
    except (ValidationError, ValueError) as exc:
        log.warning("GpuQueue spec invalid, queue ignored", queue=name, error=str(exc)[:500])
        return None
    return Queue(
        name=name,
        quota=spec.amounts(),
        weight=spec.weight,
        borrow=spec.borrow,
        preempt_within=spec.preemption.within_queue is WithinQueue.LOWER_PRIORITY,
        reclaim=spec.preemption.reclaim,
        namespaces=frozenset(spec.namespaces),
    )


def request_of(spec: GpuJobSpec) -> dict[str, Decimal]:
    """What one attempt of the job asks for: its GPUs under their resource name, and its cpu/memory requests."""
    request: dict[str, Decimal] = {}
    if spec.gpus:
        request[spec.gpu_resource] = Decimal(spec.gpus)
    for name in COUNTED_REQUESTS:
        if (amount := spec.resources.requests.get(name)) is not None:
            request[name] = parse_quantity(amount)
    return request


def workload_of(key: JobKey, job: dict[str, Any]) -> Workload | None:
    """The job's demand on its queue; None for a job that names no queue or holds none (finished, suspended,
    cancelled, being deleted, or a spec that does not parse: decide() fails that one)."""
    meta, raw, status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
    if not raw.get("queue") or meta.get("deletionTimestamp") or status.get("phase") in TERMINAL:
        return None
    try:
        spec = GpuJobSpec.model_validate(raw)
    except (ValidationError, ValueError):
        return None
    if spec.suspend or spec.cancel or spec.queue is None or status.get("fallback"):  # on CPU: out of the queue
        return None
    admission = status.get("admission") or None
    evicting = bool(admission and status.get("preempting"))
    arrival = parse_time(meta.get("creationTimestamp")) or datetime.fromtimestamp(0, UTC)
    admitted_at = (parse_time(admission.get("admittedAt")) or arrival) if admission else None
    return Workload(
        key=f"{key[0]}/{key[1]}",
        namespace=key[0],
        queue=admission.get("queue", spec.queue) if admission else spec.queue,
        priority=spec.priority,
        arrival=arrival,
        request=request_of(spec),
        admitted_at=admitted_at,
        preemptible=not evicting,
        evicting=evicting,
    )


def queue_status(name: str, result: Plan, workloads: Iterable[Workload]) -> dict[str, Any]:
    """A GpuQueue's status from a plan: usage and borrowed (quantities as strings), pending and admitted jobs."""
    admitted = set(result.admit)
    mine = [w for w in workloads if w.queue == name]
    return {
        "usage": _amounts(result.usage.get(name, {})),
        "borrowed": _amounts(result.borrowed.get(name, {})),
        "pending": sum(1 for w in mine if not w.admitted and w.key not in admitted),
        "admitted": sum(1 for w in mine if w.admitted or w.key in admitted),
    }


def run_seconds(job: Mapping[str, Any]) -> tuple[str, float] | None:
    """(queue, seconds from admission to the end) of a finished job that a queue admitted; None otherwise."""
    status = job.get("status") or {}
    admission = status.get("admission") or {}
    if status.get("phase") not in FINISHED or not admission.get("queue"):
        return None
    start, end = parse_time(admission.get("admittedAt")), parse_time(status.get("completionTime"))
    if start is None or end is None:
        return None
    return admission["queue"], max(0.0, (end - start).total_seconds())


def waiting_since(job: Mapping[str, Any]) -> datetime | None:
    """When the job began to wait for admission: its Admitted=False condition's transition (a preempted job waits
    again from its preemption), else its creation."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        admitted = condition.get("type") == ConditionType.ADMITTED.value
        if (
            admitted
            and condition.get("status") == "False"
            and (since := parse_time(condition.get("lastTransitionTime")))
        ):
            return since
    return parse_time((job.get("metadata") or {}).get("creationTimestamp"))


def _amounts(resources: dict[str, Decimal]) -> dict[str, str]:
    return {r: f"{amount.normalize():f}" for r, amount in sorted(resources.items())}


def _key(workload_key: str) -> JobKey:
    namespace, _, name = workload_key.partition("/")
    return (namespace, name)


@dataclass
class QueueManager:
    store: Store
    # Asks the reconciler to look at a job (admitted, or its wait changed).
    on_change: Callable[[JobKey], None]
    interval: float = 0.5  # at most one plan per interval
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    queues: dict[str, Queue] = field(default_factory=dict)
    _gates: dict[JobKey, QueueGate] = field(default_factory=dict)
    _written: dict[str, dict[str, Any]] = field(default_factory=dict)  # queue status last written, per queue
    _dirty: asyncio.Event = field(default_factory=asyncio.Event)
    # Workloads by job, kept while the job's version is the same (a plan parses only what changed).
    _memo: dict[JobKey, tuple[tuple[str, str], Workload | None]] = field(default_factory=dict)
    # Admitted jobs listed at start-up that kopf has not delivered yet (counted until it has, or they are gone).
    _baseline: dict[JobKey, Workload] = field(default_factory=dict)
    # Jobs a plan admitted whose status does not say so yet (the reconciler writes the admission with the attempt,
    # before the Pod): counted as admitted until it does, or the job leaves its queue. Lost on a restart, which is
    # safe: no Pod exists before its admission is stored. Each with its gate and the seconds it waited.
    _promised: dict[JobKey, tuple[Workload, QueueGate, float]] = field(default_factory=dict)
    # --- what the backend and Prometheus see (docs/queues.md, "The backend sees the queue")
    exact_positions: int = DEFAULT_EXACT  # exact positions for the first K; an upper bound behind (positions)
    event_interval: float = 2.0  # at most one position event per job per interval
    publish: Callable[[list[ProgressEvent]], None] | None = None  # the event forwarder's submit (None: no Redis)
    metrics: Metrics | None = None
    monotonic: Callable[[], float] = time.monotonic
    durations: Durations = field(default_factory=Durations)
    _throttle: Throttle[JobKey, tuple[str, int]] = field(default_factory=lambda: Throttle(2.0))
    _positions: dict[JobKey, tuple[str, int]] = field(default_factory=dict)  # waiting jobs: (queue, position)
    _running: dict[str, int] = field(default_factory=dict)  # admitted jobs per queue, at the last plan
    _counted: OrderedDict[str, None] = field(default_factory=OrderedDict)  # uids whose run time was counted
    _stats: dict[str, QueueStats] = field(default_factory=dict)
    paused: Callable[[], bool] | None = None  # HA: a paused replica plans and writes nothing (operator.pause)

    def __post_init__(self) -> None:
        self._throttle.interval = self.event_interval

    # --- inputs
    async def list_queues(self, namespaces: list[str] | None) -> None:
        """Know every GpuQueue before the first reconcile (start-up): a job naming a queue is never admitted at
        once just because the queues were not listed yet. No GpuQueue CRD: no queues. With queues, also every
        admitted job (the baseline): kopf delivers the jobs one by one after start-up, and a plan made before it
        has delivered one admitted earlier would not count that one's usage."""
        for body in await kube.list_gpuqueues() or []:
            self.queue_event("ADDED", body)
        if not self.queues:
            return
        baseline: dict[JobKey, Workload] = {}
        async for page in kube.list_gpujobs(namespaces):
            for body in page:
                meta = body.get("metadata") or {}
                key: JobKey = (meta.get("namespace", ""), meta.get("name", ""))
                if (w := workload_of(key, body)) is not None and w.admitted:
                    baseline[key] = w
                self._count_run(body)  # finished jobs seed the start estimates
        self._baseline = baseline

    def queue_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        name = (body.get("metadata") or {}).get("name", "")
        queue = None if event_type == "DELETED" else queue_of(body)
        if queue is None:
            self.queues.pop(name, None)
            self._written.pop(name, None)
            self._stats.pop(name, None)
            if self.metrics is not None:
                self.metrics.queue_gone(name)
        else:
            self.queues[name] = queue
            if self.metrics is not None:
                self.metrics.queue_seen(name)
        self.poke()

    def job_changed(self, job: dict[str, Any]) -> None:
        """A GpuJob event or a status write: plan again if the job is (or was) in a queue."""
        meta = job.get("metadata") or {}
        key: JobKey = (meta.get("namespace", ""), meta.get("name", ""))
        if key not in self.store.jobs:  # deleted: its start-up baseline, if any, goes too
            self._baseline.pop(key, None)
        self._count_run(job)
        if (job.get("spec") or {}).get("queue") or key in self._gates or (job.get("status") or {}).get("admission"):
            self.poke()

    def poke(self) -> None:
        self._dirty.set()

    # --- what the reconciler asks
    def gate(self, key: JobKey, spec: GpuJobSpec) -> QueueGate | None:
        """None: admit at once (no spec.queue, or no GpuQueue at all). Else the last plan's word on the job."""
        if not spec.queue or not self.queues:
            return None
        return self._gates.get(key, QueueGate())

    def queue_stats(self) -> dict[str, QueueStats]:
        """Each queue as the last plan left it (the metrics read it at scrape time)."""
        return dict(self._stats)

    # --- the loop
    async def run(self) -> None:
        while True:
            paused = self.paused is not None and self.paused()
            due = None if paused else self._throttle.next_due()
            try:
                async with asyncio.timeout(None if due is None else max(0.0, due - self.monotonic())):
                    await self._dirty.wait()
            except TimeoutError:  # a held position event is due (no plan needed for it)
                self._send_due()
                continue
            self._dirty.clear()
            if self.paused is not None and self.paused():
                continue  # a paused replica writes nothing; its resume pokes the manager
            try:
                await self.plan_once()
            except Exception as exc:  # the next change (or this retry) plans again
                log.warning("queue plan failed, retrying", error=kube.message_of(exc))
                self.poke()
            await asyncio.sleep(self.interval)

    async def plan_once(self) -> None:
        if not self.queues:  # no queues: nothing waits; wake what did
            waiting, self._gates = list(self._gates), {}
            for key in waiting:
                self.on_change(key)
                self._throttle.forget(key)
            self._positions = {}
            return
        workloads = self._workloads()
        result = plan(self.queues, workloads)
        by_key = {w.key: w for w in workloads}
        for admitted in result.admit:
            self._promise(by_key[admitted])
        for victim, head in sorted(result.preempt.items()):
            await self._preempt(by_key[victim], head)
        gates = {_key(k): self._gate(wait, by_key[k]) for k, wait in result.waiting.items()}
        gates |= {key: gate for key, (_, gate, _) in self._promised.items()}
        for key in set(gates) | set(self._gates):
            old, new = self._gates.get(key), gates.get(key)
            if new != old and not (new is None and old is not None and old.admission is not None):
                self.on_change(key)  # (an admission that left the gate is in the status, or the job left)
        self._gates = gates
        self._keep_stats(result, workloads)
        self._send_positions(result, by_key)
        for name in list(self.queues):  # a GpuQueue event may come while a status is written
            status = queue_status(name, result, workloads)
            if name in self.queues and self._written.get(name) != status:
                await kube.patch_gpuqueue_status(name, status)
                self._written[name] = status

    def _workloads(self) -> list[Workload]:
        memo: dict[JobKey, tuple[tuple[str, str], Workload | None]] = {}
        for key, job in list(self.store.jobs.items()):
            if not (job.get("spec") or {}).get("queue"):
                continue
            meta = job.get("metadata") or {}
            stamp = (meta.get("uid", ""), meta.get("resourceVersion", ""))
            held = self._memo.get(key)
            fresh = held is not None and held[0] == stamp and bool(stamp[1])
            memo[key] = (stamp, held[1] if held is not None and fresh else workload_of(key, job))
        self._memo = memo
        self._baseline = {key: w for key, w in self._baseline.items() if key not in self.store.jobs}
        current = {key: w for key, (_, w) in memo.items() if w is not None}
        for key, (promised, gate, waited) in list(self._promised.items()):
            stored = current.get(key)
            if stored is not None and not stored.admitted:
                current[key] = promised  # admitted by a plan, its status not written yet
                continue
            del self._promised[key]  # stored (counted from its status now), or out of the queue
            job = self.store.job(key) or {}
            admission = (job.get("status") or {}).get("admission") or {}
            if gate.admission is not None and admission.get("admittedAt") == gate.admission.admitted_at:
                self._admitted(promised, waited)  # written (the job may have finished since)
        return list(current.values()) + list(self._baseline.values())

    def _promise(self, w: Workload) -> None:
        """Admit `w`: its gate carries the admission, which the reconciler writes into the status with the
        attempt (one write), before the Pod is created; the plans count it as admitted meanwhile."""
        now = self.clock()
        admission = Admission(queue=w.queue, admitted_at=iso(now), resources=_amounts(dict(w.request)))
        job = self.store.job(_key(w.key))
        since = waiting_since(job) if job is not None else None
        waited = (now - since).total_seconds() if since is not None else 0.0
        admitted = dataclasses.replace(w, admitted_at=now, preemptible=False)  # no Pod to evict yet
        self._promised[_key(w.key)] = (admitted, QueueGate(admission=admission), waited)

    def _admitted(self, w: Workload, waited: float) -> None:
        """A promised admission is in the job's status: logged and counted."""
        log.info("job admitted", job=w.key, queue=w.queue, resources=_amounts(dict(w.request)))
        if self.metrics is not None:
            self.metrics.queue_admitted(w.queue, waited)

    async def _preempt(self, w: Workload, head: str) -> None:
        """Mark an admitted job for eviction: the reconciler stops its Pod gracefully, then hands the admission
        back (decide(): phase Queued, reason Preempted). Its usage counts until then."""
        if await self._write(_key(w.key), {"preempting": {"by": head, "since": iso(self.clock())}}):
            log.info("job preempted", job=w.key, queue=w.queue, by=head)
            if self.metrics is not None:
                self.metrics.queue_preempted(w.queue)

    async def _write(self, key: JobKey, status: dict[str, Any]) -> bool:
        """A status merge-patch guarded by the resourceVersion the plan saw; the stored job is filed and
        reconciled. A job changed since (409) is re-read and planned again, never written from a stale view."""
        job = self.store.job(key)
        if job is None:
            return False
        try:
            stored = await kube.patch_gpujob_status(*key, status, job["metadata"].get("resourceVersion"))
        except kube.ApiException as exc:
            if exc.status != 409:
                raise
            fresh = await kube.get_gpujob(*key)
            if fresh is not None:
                self.store.put_job(fresh)
            self.poke()
            return False
        if stored is None:
            return False
        self.store.put_job(stored)
        self.on_change(key)
        return True

    # --- positions, estimates and figures
    def _gate(self, wait: Wait, w: Workload) -> QueueGate:
        """The reconciler's word: the position as written (exact for the first K, an upper bound behind, so that
        one job leaving the head rewrites K + log2(N/K) statuses, not N), with a message that changes with it."""
        shown = published_position(wait.position, self.exact_positions)
        exact = wait.position <= self.exact_positions
        message = wait.message if exact else f"position at most {shown} in queue {w.queue!r}"
        return QueueGate(wait.reason.value, shown, message)

    def _send_positions(self, result: Plan, by_key: Mapping[str, Workload]) -> None:
        """Offer every waiting job's (queue, position) to the throttle; send what it lets through now."""
        positions: dict[JobKey, tuple[str, int]] = {}
        for k, wait in result.waiting.items():
            if wait.reason is Waiting.QUOTA_EXCEEDED and wait.position > 0:
                positions[_key(k)] = (by_key[k].queue, published_position(wait.position, self.exact_positions))
        for key in self._throttle.keys() - positions.keys():  # admitted, gone or out of any queue
            self._throttle.forget(key)
        self._positions = positions
        if self.publish is None:
            return
        now = self.monotonic()
        events = [
            e for key, at in positions.items() if self._throttle.offer(key, at, now) and (e := self._event(key, at))
        ]
        if events:
            self.publish(events)

    def _send_due(self) -> None:
        ready = self._throttle.due(self.monotonic())
        events = [e for key, at in ready if self._positions.get(key) == at and (e := self._event(key, at))]
        if events and self.publish is not None:
            self.publish(events)

    def _event(self, key: JobKey, at: tuple[str, int]) -> ProgressEvent | None:
        job = self.store.job(key)
        if job is None:
            return None
        queue, position = at
        status = job.get("status") or {}
        wait = estimate_wait(position, self._running.get(queue, 0), self.durations.of(queue))
        start = iso(self.clock() + timedelta(seconds=wait)) if wait is not None else None
        where = f"position {position}" if position <= self.exact_positions else f"position at most {position}"
        message = f"{where} in queue {queue!r}" + (f", expected to start around {start}" if start else "")
        return make_event(
            job_id_of(job),
            Phase.QUEUED.event_status,
            float((status.get("progress") or {}).get("percent") or 0.0),
            message,
            phase=Phase.QUEUED.value,
            attempt=status.get("attempts") or None,
            reason=Waiting.QUOTA_EXCEEDED.value,
            source=EVENT_SOURCE,
            queue=queue,
            position=position,
            estimatedStart=start,
        )

    def _keep_stats(self, result: Plan, workloads: Iterable[Workload]) -> None:
        admitted_now = set(result.admit)
        running: dict[str, int] = defaultdict(int)
        pending: dict[str, int] = defaultdict(int)
        oldest: dict[str, datetime] = {}
        for w in workloads:
            if w.admitted or w.key in admitted_now:
                running[w.queue] += 1
            elif w.queue in self.queues:
                pending[w.queue] += 1
                job = self.store.job(_key(w.key))
                since = waiting_since(job) if job is not None else None
                if since is not None and (w.queue not in oldest or since < oldest[w.queue]):
                    oldest[w.queue] = since
        self._running = dict(running)
        self._stats = {
            name: QueueStats(
                quota={r: float(a) for r, a in queue.quota.items()},
                usage={r: float(a) for r, a in result.usage.get(name, {}).items()},
                borrowed={r: float(a) for r, a in result.borrowed.get(name, {}).items()},
                pending=pending.get(name, 0),
                admitted=running.get(name, 0),
                oldest_pending_since=oldest.get(name),
            )
            for name, queue in self.queues.items()
        }

    def _count_run(self, job: Mapping[str, Any]) -> None:
        """A finished job's run time, once, into its queue's recent durations (the start estimates)."""
        uid = (job.get("metadata") or {}).get("uid", "")
        if not uid or uid in self._counted or (run := run_seconds(job)) is None:
            return
        self._counted[uid] = None
        while len(self._counted) > _COUNTED_MEMORY:
            self._counted.popitem(last=False)
        self.durations.add(*run)
