"""The queue manager (docs/queues.md): GpuQueues in, admissions out.

It holds the GpuQueues (kopf's watch, and a list at start-up so that no job is decided on before the queues are
known), builds the workloads from the runtime's job cache, runs the pure `admission.plan()` whenever something
relevant changed (at most every `interval` seconds), writes each admission into the job's status (guarded by its
resourceVersion: a job changed since is planned again, never admitted from a stale view) and asks the
reconciler to look at the job, which then creates its Pod. Waiting jobs get their reason and position through
`gate()`, which the reconciler hands to the pure `decide()`. Admission state lives only in the statuses, so a
restarted operator rebuilds the usage from them and never over-admits. With no GpuQueue at all there is no gate:
every job is admitted at once, as before queues.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from pydantic import ValidationError

from gpujob import kube
from gpujob.api.constants import Phase
from gpujob.api.models import GpuJobSpec
from gpujob.api.quantity import parse_quantity
from gpujob.api.queues import GpuQueueSpec, WithinQueue
from gpujob.logging import get_logger
from gpujob.operator.admission import Plan, Queue, Workload, plan
from gpujob.operator.cache import JobKey, Store
from gpujob.operator.conventions import iso, parse_time
from gpujob.operator.status import QueueGate

log = get_logger(__name__)

# Resources of a job's request that a queue may count besides its GPUs (spec.resources.requests).
COUNTED_REQUESTS: Final = ("cpu", "memory")
TERMINAL: Final = frozenset(p.value for p in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED))


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
    if spec.suspend or spec.cancel or spec.queue is None:
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
        self._baseline = baseline

    def queue_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        name = (body.get("metadata") or {}).get("name", "")
        queue = None if event_type == "DELETED" else queue_of(body)
        if queue is None:
            self.queues.pop(name, None)
            self._written.pop(name, None)
        else:
            self.queues[name] = queue
        self.poke()

    def job_changed(self, job: dict[str, Any]) -> None:
        """A GpuJob event or a status write: plan again if the job is (or was) in a queue."""
        meta = job.get("metadata") or {}
        key: JobKey = (meta.get("namespace", ""), meta.get("name", ""))
        if key not in self.store.jobs:  # deleted: its start-up baseline, if any, goes too
            self._baseline.pop(key, None)
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

    # --- the loop
    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
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
            return
        workloads = self._workloads()
        result = plan(self.queues, workloads)
        by_key = {w.key: w for w in workloads}
        for admitted in result.admit:
            await self._admit(by_key[admitted])
        for victim, head in sorted(result.preempt.items()):
            await self._preempt(by_key[victim], head)
        gates = {
            _key(k): QueueGate(wait.reason.value, wait.position, wait.message) for k, wait in result.waiting.items()
        }
        for key in set(gates) | set(self._gates):
            if gates.get(key) != self._gates.get(key):
                self.on_change(key)
        self._gates = gates
        for name in self.queues:
            status = queue_status(name, result, workloads)
            if self._written.get(name) != status:
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
        return [w for _, w in memo.values() if w is not None] + list(self._baseline.values())

    async def _admit(self, w: Workload) -> None:
        """Write the admission (before any Pod exists), file the stored job, and have it reconciled."""
        admission = {
            "queue": w.queue,
            "admittedAt": iso(self.clock()),
            "resources": _amounts(dict(w.request)),
        }
        if await self._write(_key(w.key), {"admission": admission}):
            log.info("job admitted", job=w.key, queue=w.queue, resources=admission["resources"])

    async def _preempt(self, w: Workload, head: str) -> None:
        """Mark an admitted job for eviction: the reconciler stops its Pod gracefully, then hands the admission
        back (decide(): phase Queued, reason Preempted). Its usage counts until then."""
        if await self._write(_key(w.key), {"preempting": {"by": head, "since": iso(self.clock())}}):
            log.info("job preempted", job=w.key, queue=w.queue, by=head)

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
