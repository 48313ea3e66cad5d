"""Queue admission (pure): which waiting jobs get their Pod now, which admitted jobs make room for them, and
where each waiting job stands in its queue. No I/O and no clock; the caller passes every queue and every
job's demand, acts on the Plan (admits, preempts) and writes it into the jobs' statuses, so admission state
lives in the API and a restarted or failed-over operator re-derives the same usage and never over-admits.

Rules (README, "GPU queues"):
- A queue's usage is the sum of its admitted jobs' requests, counted for the resources some queue has a quota
  for (other resources are not queued). All queues form one cohort: the cluster's capacity is the sum of their
  quotas, and every queue lends what it does not use.
- Order within a queue: priority (higher first), then arrival; best-effort FIFO: a job that fits may pass a
  head that does not.
- 1. Within quota: each queue admits what fits in its own quota.
  2. Borrowing: what is left idle goes to queues with `borrow`, one job at a time to the queue whose borrowed
     share (dominant resource: borrowed / capacity, divided by its weight) is lowest: lent quota is split in
     proportion to the weights.
  3. Preemption, for each queue's first waiting job that still does not fit: lower-priority jobs of its own
     queue make room within its quota (`withinQueue: LowerPriority`), and a queue under its quota takes lent
     quota back from borrowers (`reclaim`); victims lowest priority first, then most recently admitted first,
     and only when the evictions make the job fit. The job is admitted by a later plan, once its victims are
     back in the queue (their usage is freed when their status says so, not when their Pods are gone).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

Resources = dict[str, Decimal]


class Waiting(StrEnum):
    """Why a queued job has no Pod yet (its `Admitted=False` condition's reason)."""

    QUOTA_EXCEEDED = "QuotaExceeded"
    QUEUE_NOT_FOUND = "QueueNotFound"
    NAMESPACE_NOT_ALLOWED = "NamespaceNotAllowed"


@dataclass(frozen=True)
class Queue:
    name: str
    quota: Mapping[str, Decimal]
    weight: int = 1
    borrow: bool = True
    preempt_within: bool = True  # spec.preemption.withinQueue: LowerPriority (Never: False)
    reclaim: bool = True
    namespaces: frozenset[str] = frozenset()  # empty: every namespace

    def admits_namespace(self, namespace: str) -> bool:
        return not self.namespaces or namespace in self.namespaces


@dataclass(frozen=True)
class Workload:
    """One job's demand on its queue."""

    key: str  # namespace/name
    namespace: str
    queue: str
    priority: int
    arrival: datetime  # when it entered the queue (FIFO among equal priorities)
    request: Mapping[str, Decimal]
    admitted_at: datetime | None = None  # None: waiting
    preemptible: bool = True  # False while it is already being preempted, or finishing
    evicting: bool = False  # being preempted: still counted (its Pod may run), but its room is already promised

    @property
    def admitted(self) -> bool:
        return self.admitted_at is not None


@dataclass(frozen=True)
class Wait:
    reason: Waiting
    position: int  # 1-based, in its queue (0 when it is in none)
    message: str


@dataclass
class Plan:
    admit: list[str] = field(default_factory=list)
    preempt: dict[str, str] = field(default_factory=dict)  # victim -> the job it makes room for
    waiting: dict[str, Wait] = field(default_factory=dict)
    usage: dict[str, Resources] = field(default_factory=dict)  # per queue, after this plan's admissions
    borrowed: dict[str, Resources] = field(default_factory=dict)  # per queue: usage beyond its quota


def plan(queues: Mapping[str, Queue], workloads: Iterable[Workload]) -> Plan:
    """The next admissions, preemptions and waiting positions (deterministic for the same input)."""
    tracked = sorted({r for q in queues.values() for r in q.quota})
    capacity = {r: sum((q.quota.get(r, Decimal(0)) for q in queues.values()), Decimal(0)) for r in tracked}
    usage: dict[str, Resources] = {name: dict.fromkeys(tracked, Decimal(0)) for name in queues}
    admitted: dict[str, list[Workload]] = defaultdict(list)
    pending: dict[str, list[Workload]] = defaultdict(list)
    result = Plan()
    for w in workloads:
        queue = queues.get(w.queue)
        if queue is None or not queue.admits_namespace(w.namespace):
            if not w.admitted:  # (an admitted job of a deleted queue runs on, counted nowhere)
                result.waiting[w.key] = _outside(w, queue)
            continue
        if w.admitted:
            admitted[w.queue].append(w)
            _add(usage[w.queue], w.request, tracked)
        else:
            pending[w.queue].append(w)
    for items in pending.values():
        items.sort(key=_order)

    def request_of(w: Workload) -> Resources:
        return {r: Decimal(w.request.get(r, 0)) for r in tracked}

    def admit(w: Workload) -> None:
        result.admit.append(w.key)
        _add(usage[w.queue], w.request, tracked)
        pending[w.queue].remove(w)

    # 1. within each queue's own quota (and what is free: borrowers may hold some of it until reclaimed)
    for name in sorted(pending):
        for w in list(pending[name]):
            request = request_of(w)
            if _fits(usage[name], request, queues[name].quota) and _fits(_total(usage, tracked), request, capacity):
                admit(w)
    # 2. borrowing idle quota, weighted
    while True:
        chosen = None
        borrowers = [n for n in pending if queues[n].borrow and pending[n]]
        for name in sorted(borrowers, key=lambda n: (_share(usage[n], queues[n], capacity), n)):
            total = _total(usage, tracked)
            chosen = next((w for w in pending[name] if _fits(total, request_of(w), capacity)), None)
            if chosen is not None:
                break
        if chosen is None:
            break
        admit(chosen)
    # 3. preemption: one waiting job per queue, highest priority first
    taken: set[str] = set()
    for name in sorted(pending, key=lambda n: (min((_order(w) for w in pending[n]), default=(0,)), n)):
        if not pending[name]:
            continue
        head = pending[name][0]
        victims = _make_room(head, queues, usage, admitted, capacity, tracked, taken)
        for victim in victims:
            result.preempt[victim.key] = head.key
            taken.add(victim.key)
    # (The parts of the messages are computed once per queue and per distinct request: 10,000 waiting jobs.)
    making_room = Counter(result.preempt.values())
    for name, items in pending.items():
        uses = f"queue uses {_show(usage[name])} of {_show(dict(queues[name].quota))}"
        needs: dict[tuple[tuple[str, Decimal], ...], str] = {}
        for position, w in enumerate(items, start=1):
            if stopping := making_room.get(w.key, 0):
                message = f"waiting for {stopping} preempted job(s) to make room in queue {name!r}"
            else:
                shape = tuple(sorted(w.request.items()))
                if (need := needs.get(shape)) is None:
                    need = needs[shape] = _show(request_of(w))
                message = f"position {position} in queue {name!r}: needs {need}, {uses}"
            result.waiting[w.key] = Wait(Waiting.QUOTA_EXCEEDED, position, message)
    result.usage = usage
    result.borrowed = {
        n: {r: max(Decimal(0), usage[n][r] - queues[n].quota.get(r, Decimal(0))) for r in tracked} for n in queues
    }
    return result


def _make_room(
    head: Workload,
    queues: Mapping[str, Queue],
    usage: dict[str, Resources],
    admitted: Mapping[str, list[Workload]],
    capacity: Resources,
    tracked: list[str],
    taken: set[str],
) -> list[Workload]:
    """The admitted jobs whose eviction lets `head` in (empty when none would, or the rules allow none)."""
    queue = queues[head.queue]
    request = {r: Decimal(head.request.get(r, 0)) for r in tracked}
    # Jobs being preempted already (by an earlier plan) free their room once they are gone: count it as free
    # here, so that a plan never evicts more jobs for the same head while the first victims stop.
    evicting = [w for items in admitted.values() for w in items if w.evicting]
    own = dict(usage[head.queue])
    for w in evicting:
        if w.queue == head.queue:
            _add(own, w.request, tracked, sign=-1)
    victims: list[Workload] = []
    # Within the queue: lower priorities make room inside its own quota.
    if not _fits(own, request, queue.quota):
        if not queue.preempt_within:
            return []
        for w in sorted(admitted.get(head.queue, []), key=_victim_order):
            if _fits(own, request, queue.quota):
                break
            if w.priority < head.priority and w.preemptible and w.key not in taken:
                victims.append(w)
                _add(own, w.request, tracked, sign=-1)
        if not _fits(own, request, queue.quota):
            return []
    # Across queues: a queue within its quota takes lent quota back from borrowers.
    total = _total(usage, tracked)
    for w in [*victims, *evicting]:
        _add(total, w.request, tracked, sign=-1)
    if not _fits(total, request, capacity):
        if not queue.reclaim:
            return []
        others = {n: dict(usage[n]) for n in queues if n != head.queue}
        for w in evicting:
            if w.queue in others:
                _add(others[w.queue], w.request, tracked, sign=-1)
        borrowers = [w for n in others for w in admitted.get(n, []) if w.preemptible and w.key not in taken]
        for w in sorted(borrowers, key=_victim_order):
            if _fits(total, request, capacity):
                break
            lender_quota = queues[w.queue].quota
            if not any(others[w.queue][r] > lender_quota.get(r, Decimal(0)) for r in tracked if w.request.get(r)):
                continue  # it runs within its own queue's quota: not borrowed, not reclaimable
            victims.append(w)
            _add(others[w.queue], w.request, tracked, sign=-1)
            _add(total, w.request, tracked, sign=-1)
        if not _fits(total, request, capacity):
            return []
    return victims


def _outside(w: Workload, queue: Queue | None) -> Wait:
    if queue is None:
        return Wait(Waiting.QUEUE_NOT_FOUND, 0, f"GpuQueue {w.queue!r} does not exist")
    return Wait(Waiting.NAMESPACE_NOT_ALLOWED, 0, f"GpuQueue {w.queue!r} does not admit namespace {w.namespace!r}")


def _order(w: Workload) -> tuple[int, datetime, str]:
    return (-w.priority, w.arrival, w.key)


def _victim_order(w: Workload) -> tuple[int, float, str]:
    """Lowest priority first, then the most recently admitted (it has the least work to lose)."""
    admitted_at = w.admitted_at.timestamp() if w.admitted_at else 0.0
    return (w.priority, -admitted_at, w.key)


def _add(into: Resources, request: Mapping[str, Decimal], tracked: list[str], sign: int = 1) -> None:
    for r in tracked:
        if r in request:
            into[r] += sign * Decimal(request[r])


def _fits(used: Mapping[str, Decimal], request: Mapping[str, Decimal], limit: Mapping[str, Decimal]) -> bool:
    return all(used.get(r, Decimal(0)) + amount <= limit.get(r, Decimal(0)) for r, amount in request.items() if amount)


def _total(usage: Mapping[str, Resources], tracked: list[str]) -> Resources:
    return {r: sum((u[r] for u in usage.values()), Decimal(0)) for r in tracked}


def _share(used: Mapping[str, Decimal], queue: Queue, capacity: Mapping[str, Decimal]) -> Decimal:
    """Dominant borrowed share over weight: the queue that has borrowed least for its weight goes first."""
    shares = [
        max(Decimal(0), used[r] - queue.quota.get(r, Decimal(0))) / capacity[r] for r in capacity if capacity[r] > 0
    ]
    return max(shares, default=Decimal(0)) / max(1, queue.weight)


def _show(resources: Mapping[str, Decimal]) -> str:
    return ", ".join(f"{r}={amount.normalize():f}" for r, amount in sorted(resources.items()) if amount) or "nothing"
