"""The queue manager's pure parts (gpujob.operator.queues): GpuQueue -> Queue, GpuJob -> Workload, the gate, the
queue status; no server."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from gpujob.api.models import GpuJobSpec
from gpujob.operator.admission import plan
from gpujob.operator.cache import Store
from gpujob.operator.queues import QueueManager, queue_of, queue_status, workload_of
from gpujob.operator.status import QueueGate

T0 = "2026-01-01T12:00:00Z"


def job(name: str, spec: dict[str, Any], status: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ml", "uid": f"u-{name}", "creationTimestamp": T0, **meta},
        "spec": {"type": "custom", **spec},
        "status": status or {},
    }


def queue(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"quota": {"nvidia.com/gpu": 2}, **spec}}


def test_a_gpuqueue_becomes_an_admission_queue() -> None:
    q = queue_of(queue("a", weight=3, borrow=False, preemption={"withinQueue": "Never"}, namespaces=["ml"]))
    assert q is not None and q.quota == {"nvidia.com/gpu": Decimal(2)} and q.weight == 3
    assert not q.borrow and not q.preempt_within and q.reclaim and q.namespaces == {"ml"}
    assert queue_of({"metadata": {"name": "bad"}, "spec": {"quota": {"nvidia.com/gpu": "-1"}}}) is None


def test_a_job_in_a_queue_is_a_workload_with_its_request() -> None:
    spec = {"queue": "a", "priority": 5, "gpus": 2, "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}
    w = workload_of(("ml", "j"), job("j", spec))
    assert w is not None and w.key == "ml/j" and w.queue == "a" and w.priority == 5 and not w.admitted
    assert w.request == {"nvidia.com/gpu": 2, "cpu": Decimal("0.5"), "memory": 2**30}
    assert w.arrival == datetime(2026, 1, 1, 12, tzinfo=UTC)
    admitted = job("j", spec, {"admission": {"queue": "old", "admittedAt": T0}})
    w = workload_of(("ml", "j"), admitted)
    assert w is not None and w.admitted and w.queue == "old"  # counted where it was admitted


def test_jobs_that_hold_no_queue_are_not_workloads() -> None:
    assert workload_of(("ml", "j"), job("j", {})) is None
    assert workload_of(("ml", "j"), job("j", {"queue": "a", "suspend": True})) is None
    assert workload_of(("ml", "j"), job("j", {"queue": "a", "cancel": True})) is None
    assert workload_of(("ml", "j"), job("j", {"queue": "a"}, {"phase": "Succeeded"})) is None
    assert workload_of(("ml", "j"), job("j", {"queue": "a"}, deletionTimestamp=T0)) is None
    assert workload_of(("ml", "j"), job("j", {"queue": "a", "gpus": -1})) is None


def test_queue_status_counts_usage_pending_and_admitted() -> None:
    q = queue_of(queue("a"))
    assert q is not None
    workloads = [
        w
        for i, status in enumerate(({"admission": {"queue": "a", "admittedAt": T0}}, {}, {}))
        if (w := workload_of(("ml", f"j{i}"), job(f"j{i}", {"queue": "a"}, status))) is not None
    ]
    result = plan({"a": q}, workloads)
    assert result.admit == ["ml/j1"] and result.waiting["ml/j2"].position == 1
    assert queue_status("a", result, workloads) == {
        "usage": {"nvidia.com/gpu": "2"},
        "borrowed": {"nvidia.com/gpu": "0"},
        "pending": 1,
        "admitted": 2,
    }


def test_the_gate_is_none_without_queues_or_without_spec_queue() -> None:
    from gpujob.api.models import GpuJobSpec

    manager = QueueManager(Store(), on_change=lambda key: None)
    in_queue = GpuJobSpec.model_validate({"type": "custom", "queue": "a"})
    assert manager.gate(("ml", "j"), in_queue) is None  # no GpuQueue at all: admitted at once
    manager.queue_event("ADDED", queue("a"))
    assert manager.gate(("ml", "j"), in_queue) == QueueGate()  # not planned yet: waits
    assert manager.gate(("ml", "j"), GpuJobSpec.model_validate({"type": "custom"})) is None
    manager.queue_event("DELETED", queue("a"))
    assert manager.gate(("ml", "j"), in_queue) is None


def test_workloads_are_parsed_again_only_when_the_job_changed() -> None:
    store = Store()
    manager = QueueManager(store, on_change=lambda key: None)
    store.put_job(job("a", {"queue": "q", "priority": 1}, resourceVersion="1"))
    store.put_job(job("b", {}, resourceVersion="1"))
    [first] = manager._workloads()
    assert first.priority == 1 and manager._workloads()[0] is first
    store.put_job(job("a", {"queue": "q", "priority": 2}, resourceVersion="2"))
    [second] = manager._workloads()
    assert second.priority == 2
    store.drop_job(("ml", "a"))
    assert manager._workloads() == [] and manager._memo == {}


def test_admitted_jobs_listed_at_start_up_count_until_kopf_delivers_them(monkeypatch: Any) -> None:
    """A plan made before kopf has delivered an earlier-admitted job must still count its usage."""
    import asyncio
    from collections.abc import AsyncIterator

    from gpujob import kube

    held = job("held", {"queue": "a", "gpus": 2}, {"admission": {"queue": "a", "admittedAt": T0}}, resourceVersion="5")

    async def queues() -> list[dict[str, Any]]:
        return [queue("a")]

    async def jobs(namespaces: list[str] | None) -> AsyncIterator[list[dict[str, Any]]]:
        yield [held, job("waiting", {"queue": "a"})]

    monkeypatch.setattr(kube, "list_gpuqueues", queues)
    monkeypatch.setattr(kube, "list_gpujobs", jobs)
    store = Store()
    manager = QueueManager(store, on_change=lambda key: None)
    asyncio.run(manager.list_queues(None))
    store.put_job(job("new", {"queue": "a"}, resourceVersion="6"))  # delivered first
    keys = {w.key: w.admitted for w in manager._workloads()}
    assert keys == {"ml/held": True, "ml/new": False}
    assert plan(manager.queues, manager._workloads()).admit == [], "the quota (2) is used by the listed job"
    store.put_job(held)  # kopf delivers it: the store's copy counts, the baseline goes
    assert {w.key for w in manager._workloads()} == {"ml/held", "ml/new"} and manager._baseline == {}


def _full_queue(monkeypatch: Any, waiting: int, **manager: Any) -> tuple[Store, QueueManager, list[Any], list[Any]]:
    """One 2-GPU queue, used up by an admitted job, and `waiting` 2-GPU jobs behind it (no API: queue status
    writes are recorded, there are no admissions to write)."""
    from gpujob import kube

    async def patch_queue_status(name: str, status: dict[str, Any]) -> None:
        return None

    monkeypatch.setattr(kube, "patch_gpuqueue_status", patch_queue_status)
    store = Store()
    changed: list[Any] = []
    events: list[Any] = []
    now = [0.0]
    mgr = QueueManager(store, on_change=changed.append, publish=events.extend, monotonic=lambda: now[0], **manager)
    mgr.queue_event("ADDED", queue("a"))
    store.put_job(job("run", {"queue": "a", "gpus": 2}, {"admission": {"queue": "a", "admittedAt": T0}}))
    for i in range(waiting):
        store.put_job(job(f"w{i:04d}", {"queue": "a", "gpus": 2}, resourceVersion=str(i + 1)))
    return store, mgr, changed, events


def test_positions_beyond_k_are_upper_bounds_so_the_head_leaving_rewrites_few_statuses(monkeypatch: Any) -> None:
    import asyncio

    store, mgr, changed, events = _full_queue(monkeypatch, 1000, exact_positions=100, event_interval=0.0)
    asyncio.run(mgr.plan_once())
    gates = {key[1]: gate for key, gate in mgr._gates.items()}
    assert [gates[f"w{i:04d}"].position for i in (0, 99, 100, 199, 200, 999)] == [1, 100, 200, 200, 400, 1600]
    assert gates["w0500"].message == "position at most 800 in queue 'a'"  # no usage figures: they change often
    assert len(events) == 1000 and {e.queue for e in events} == {"a"}
    assert [e.position for e in events[:2]] == [1, 2] and events[0].status == "queued"
    changed.clear()
    events.clear()

    store.drop_job(("ml", "w0000"))  # the head leaves: 999 jobs move up one place
    asyncio.run(mgr.plan_once())
    # The 99 exact ones behind it, the job leaving, and one per bucket boundary crossed (200, 400, 800, 1600).
    assert len(changed) <= 100 + 4, len(changed)
    assert len(events) <= 99 + 4 and {e.position for e in events if e.jobId == "w0001"} == {1}
    stats = mgr.queue_stats()["a"]
    assert (stats.pending, stats.admitted, stats.quota, stats.usage) == (
        999,
        1,
        {"nvidia.com/gpu": 2.0},
        {"nvidia.com/gpu": 2.0},
    )


def test_the_start_estimate_comes_from_the_queues_finished_jobs_and_is_sent_with_the_position(monkeypatch: Any) -> None:
    import asyncio

    store, mgr, _, events = _full_queue(monkeypatch, 2, event_interval=0.0)
    asyncio.run(mgr.plan_once())
    assert [e.estimatedStart for e in events] == [None, None]  # nothing finished yet
    for i, minutes in enumerate((10, 20, 30)):  # three finished jobs of the queue: 10, 20 and 30 minutes
        mgr.job_changed(job(f"done{i}", {"queue": "a"}, {
            "phase": "Succeeded", "completionTime": f"2026-01-01T12:{minutes:02d}:00Z",
            "admission": {"queue": "a", "admittedAt": T0},
        }))  # fmt: skip
    assert mgr.durations.of("a") == [600.0, 1200.0, 1800.0]
    mgr.clock = lambda: datetime(2026, 1, 1, 13, 0, tzinfo=UTC)
    events.clear()
    store.drop_job(("ml", "w0000"))
    asyncio.run(mgr.plan_once())
    # Position 1, one job running, a mean of 20 minutes: about 20 minutes from now.
    assert [(e.jobId, e.position, e.estimatedStart) for e in events] == [("w0001", 1, "2026-01-01T13:20:00Z")]


def test_a_new_queued_job_is_not_written_before_its_queues_first_plan() -> None:
    """The reconciler leaves a new job of a queue alone until the plan has a word on it (admitted: Queued and
    Scheduled in one write, one write fewer per job); a job that waits, or has a phase, or is being cancelled or
    suspended, is reconciled as before."""
    from gpujob.api.models import GpuJobSpec
    from gpujob.operator.reconciler import _first_plan_pending

    spec = GpuJobSpec.model_validate({"type": "custom", "queue": "a"})
    new = job("new", {"queue": "a"})
    assert _first_plan_pending(new, spec, QueueGate())
    assert not _first_plan_pending(new, spec, QueueGate("QuotaExceeded", 3, "position 3"))
    assert not _first_plan_pending(job("q", {"queue": "a"}, {"phase": "Queued"}), spec, QueueGate())
    assert not _first_plan_pending(job("a", {"queue": "a"}, {"admission": {"queue": "a"}}), spec, QueueGate())
    cancelled = GpuJobSpec.model_validate({"type": "custom", "queue": "a", "cancel": True})
    assert not _first_plan_pending(new, cancelled, QueueGate())


def test_a_plan_s_admissions_are_promised_to_the_reconciler_and_counted_until_their_statuses_say_so(
    monkeypatch: Any,
) -> None:
    """The manager writes no admission: the job's gate carries it, and the reconciler writes it with the attempt
    (one write per job fewer). Until the job's status holds it, later plans count it as admitted: never more
    than the quota, whatever the plans see meanwhile."""
    import asyncio

    from gpujob import kube

    written: list[Any] = []

    async def record(*args: Any) -> None:
        written.append(args)

    monkeypatch.setattr(kube, "patch_gpuqueue_status", record)
    monkeypatch.setattr(kube, "patch_gpujob_status", record)
    store = Store()
    changed: list[Any] = []
    mgr = QueueManager(store, on_change=changed.append)
    mgr.queue_event("ADDED", queue("a"))  # 2 GPUs
    for i in range(3):
        store.put_job(job(f"w{i}", {"queue": "a", "gpus": 1}, resourceVersion=str(i + 1)))
    asyncio.run(mgr.plan_once())
    admitted = {key[1]: gate.admission for key, gate in mgr._gates.items() if gate.admission is not None}
    assert sorted(admitted) == ["w0", "w1"] and set(changed) == {("ml", "w0"), ("ml", "w1"), ("ml", "w2")}
    assert admitted["w0"] is not None and admitted["w0"].queue == "a"
    assert admitted["w0"].resources == {"nvidia.com/gpu": "1"}
    assert mgr._gates[("ml", "w2")].reason == "QuotaExceeded" and mgr._gates[("ml", "w2")].position == 1
    assert [w for w in written if w[0] != "a"] == [], "no job status written by the manager"
    changed.clear()

    asyncio.run(mgr.plan_once())  # the statuses do not say so yet: still counted, nothing new admitted
    assert changed == [] and mgr.gate(("ml", "w2"), GpuJobSpec.model_validate({"type": "custom", "queue": "a"}))
    store.put_job(job("w0", {"queue": "a", "gpus": 1}, {"admission": {"queue": "a", "admittedAt": T0}},
                      resourceVersion="10"))  # fmt: skip
    asyncio.run(mgr.plan_once())
    assert ("ml", "w0") not in mgr._promised and ("ml", "w1") in mgr._promised
    assert mgr._gates[("ml", "w2")].reason == "QuotaExceeded"
    store.drop_job(("ml", "w1"))  # gone before its status was written: its promise goes, w2 is admitted
    asyncio.run(mgr.plan_once())
    assert list(mgr._promised) == [("ml", "w2")] and mgr._gates[("ml", "w2")].admission is not None
