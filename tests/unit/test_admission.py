"""Queue admission, the pure part (issue 14): quotas, order, borrowing, weighted fair sharing, preemption within a
queue and reclaim of lent quota, positions; and that no plan ever admits past quota."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from gpujob.operator.admission import Plan, Queue, Waiting, Workload, plan

GPU = "nvidia.com/gpu"
T0 = datetime(2026, 11, 30, tzinfo=UTC)


def q(name: str, gpus: int, **kw: object) -> Queue:
    return Queue(name=name, quota={GPU: Decimal(gpus)}, **kw)  # type: ignore[arg-type]


def job(key: str, queue: str, gpus: int = 1, priority: int = 0, at: int = 0, admitted: int | None = None,
        namespace: str = "team") -> Workload:  # fmt: skip
    return Workload(key=key, namespace=namespace, queue=queue, priority=priority, arrival=T0 + timedelta(seconds=at),
                    request={GPU: Decimal(gpus)},
                    admitted_at=None if admitted is None else T0 + timedelta(seconds=admitted))  # fmt: skip


def queues(*items: Queue) -> dict[str, Queue]:
    return {item.name: item for item in items}


def test_jobs_that_fit_are_admitted_by_priority_then_arrival_and_the_rest_wait_with_positions() -> None:
    jobs = [
        job("late", "a", at=2),
        job("early", "a", at=1),
        job("urgent", "a", priority=5, at=3),
        job("third", "a", at=4),
    ]
    result = plan(queues(q("a", 2)), jobs)
    assert result.admit == ["urgent", "early"]
    assert {k: (w.reason, w.position) for k, w in result.waiting.items()} == {
        "late": (Waiting.QUOTA_EXCEEDED, 1), "third": (Waiting.QUOTA_EXCEEDED, 2)}  # fmt: skip
    assert "position 1 in queue 'a'" in result.waiting["late"].message
    assert result.usage["a"][GPU] == 2


def test_best_effort_fifo_a_small_job_passes_a_head_that_does_not_fit() -> None:
    result = plan(queues(q("a", 3, borrow=False)), [job("big", "a", gpus=4, at=1), job("small", "a", gpus=2, at=2)])
    assert result.admit == ["small"] and result.waiting["big"].position == 1


def test_a_missing_queue_or_a_namespace_it_does_not_admit_waits_with_the_reason() -> None:
    result = plan(queues(q("a", 4, namespaces=frozenset({"ml"}))), [job("x", "nope"), job("y", "a", namespace="other")])
    assert result.admit == []
    assert (
        result.waiting["x"].reason is Waiting.QUEUE_NOT_FOUND and "'nope' does not exist" in result.waiting["x"].message
    )
    assert result.waiting["y"].reason is Waiting.NAMESPACE_NOT_ALLOWED


def test_idle_quota_is_borrowed_unless_the_queue_may_not_borrow() -> None:
    jobs = [job(f"a{i}", "a", at=i) for i in range(4)] + [job(f"n{i}", "nob", at=i) for i in range(4)]
    result = plan(queues(q("a", 1), q("nob", 1, borrow=False), q("idle", 4)), jobs)
    assert sorted(result.admit) == ["a0", "a1", "a2", "a3", "n0"]
    assert result.borrowed["a"][GPU] == 3 and result.borrowed["nob"][GPU] == 0


def test_lent_quota_is_split_by_weight() -> None:
    jobs = [job(f"a{i}", "a", at=i) for i in range(10)] + [job(f"b{i}", "b", at=i) for i in range(10)]
    result = plan(queues(q("a", 0, weight=1), q("b", 0, weight=3), q("idle", 8)), jobs)
    assert result.usage["a"][GPU] == 2 and result.usage["b"][GPU] == 6


def test_a_higher_priority_job_preempts_the_lowest_priority_most_recent_jobs_of_its_queue() -> None:
    running = [job("old-low", "a", priority=0, admitted=1), job("new-low", "a", priority=0, admitted=5),
               job("mid", "a", priority=3, admitted=2)]  # fmt: skip
    result = plan(queues(q("a", 3, borrow=False)), [*running, job("urgent", "a", priority=9, gpus=1, at=10)])
    assert result.preempt == {"new-low": "urgent"}, "one victim is enough: the most recent of the lowest priority"
    assert result.admit == [] and "waiting for 1 preempted job(s)" in result.waiting["urgent"].message
    # Once the victim is back in the queue (its status says so), the next plan admits the urgent job.
    after = plan(queues(q("a", 3, borrow=False)), [running[0], running[2], job("new-low", "a", priority=0, at=5),
                                                   job("urgent", "a", priority=9, at=10)])  # fmt: skip
    assert after.admit == ["urgent"] and after.waiting["new-low"].position == 1


def test_jobs_being_preempted_count_until_they_are_gone_and_no_more_victims_are_taken_meanwhile() -> None:
    from dataclasses import replace

    running = [job("old-low", "a", priority=0, admitted=1), job("new-low", "a", priority=0, admitted=5)]
    stopping = replace(running[1], evicting=True, preemptible=False)
    result = plan(queues(q("a", 2, borrow=False)), [running[0], stopping, job("urgent", "a", priority=9, at=10)])
    assert result.admit == [] and result.preempt == {}, "the room is promised: no second victim, no admission yet"
    assert result.usage["a"][GPU] == 2


def test_no_preemption_when_it_would_not_make_room_or_the_queue_says_never() -> None:
    running = [job("low", "a", priority=0, admitted=1), job("high", "a", priority=9, admitted=2)]
    too_big = plan(queues(q("a", 2, borrow=False)), [*running, job("wants-2", "a", priority=5, gpus=2, at=3)])
    assert too_big.preempt == {}, "evicting 'low' alone would not make room, and 'high' outranks it"
    never = plan(queues(q("a", 2, borrow=False, preempt_within=False)), [*running, job("u", "a", priority=5, at=3)])
    assert never.preempt == {}
    equal = plan(queues(q("a", 2, borrow=False)), [*running, job("same", "a", priority=0, at=3)])
    assert equal.preempt == {}, "equal priority never preempts"


def test_a_queue_under_its_quota_reclaims_lent_quota_from_borrowers() -> None:
    borrowers = [job(f"b{i}", "b", priority=i % 2, admitted=i) for i in range(4)]  # b has no quota: all borrowed
    lender = q("a", 4)
    result = plan(queues(lender, q("b", 0)), [*borrowers, job("mine", "a", gpus=2, at=9)])
    assert result.preempt == {"b2": "mine", "b0": "mine"}, "lowest priority first, most recent first"
    no_reclaim = plan(
        queues(Queue("a", {GPU: Decimal(4)}, reclaim=False), q("b", 0)), [*borrowers, job("m", "a", at=9)]
    )
    assert no_reclaim.preempt == {}


def test_jobs_within_their_own_quota_are_never_reclaimed() -> None:
    owners = [job("b-own", "b", admitted=1)]  # within b's quota of 1
    result = plan(queues(q("a", 1), q("b", 1)), [*owners, job("a-borrowed", "a", admitted=2), job("mine", "b", at=3)])
    # b is at its quota already (b-own): 'mine' would make b borrow, which reclaim does not do for it
    assert result.preempt == {}


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, Queue], list[Workload]]:
    names = ["q0", "q1", "q2"]
    qs = {n: Queue(n, {GPU: Decimal(draw(st.integers(0, 6)))}, weight=draw(st.integers(1, 4)),
                   borrow=draw(st.booleans()), preempt_within=draw(st.booleans()), reclaim=draw(st.booleans()))
          for n in names}  # fmt: skip
    capacity = sum(x.quota[GPU] for x in qs.values())
    jobs: list[Workload] = []
    used = Decimal(0)
    for i in range(draw(st.integers(0, 30))):
        queue = draw(st.sampled_from(names))
        gpus = draw(st.integers(1, 3))
        running = draw(st.booleans()) and used + gpus <= capacity and (qs[queue].borrow or gpus <= qs[queue].quota[GPU])
        if running:
            used += gpus
        jobs.append(job(f"j{i}", queue, gpus=gpus, priority=draw(st.integers(0, 3)), at=i,
                        admitted=i if running else None))  # fmt: skip
    return qs, jobs


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_no_plan_admits_past_quota(scenario: tuple[dict[str, Queue], list[Workload]]) -> None:
    qs, jobs = scenario
    result: Plan = plan(qs, jobs)
    capacity = sum(x.quota[GPU] for x in qs.values())
    assert sum(u[GPU] for u in result.usage.values()) <= capacity
    for name, queue in qs.items():
        newly = sum(j.request[GPU] for j in jobs if j.key in result.admit and j.queue == name)
        if not queue.borrow and newly:
            assert result.usage[name][GPU] <= queue.quota[GPU]
    assert not set(result.admit) & set(result.waiting), "a job is admitted or waiting, not both"
    assert all(not j.admitted for j in jobs if j.key in result.admit)
    assert all(j.admitted for j in jobs if j.key in result.preempt), "only admitted jobs are preempted"


def test_a_long_saturated_run_shares_lent_gpus_by_weight_within_5_percent() -> None:
    """Two queues with no quota of their own and weights 1:3 keep 8 lent GPUs busy with jobs of mixed lengths:
    the GPU-seconds each gets are 1:3 (a discrete simulation: jobs end, the next plan admits)."""
    qs = queues(q("light", 0, weight=1), q("heavy", 0, weight=3), q("lender", 8))
    durations = {"light": [3, 7, 5], "heavy": [4, 6, 9]}
    waiting = {name: [job(f"{name}-{i}", name, at=i) for i in range(4000)] for name in durations}  # never runs dry
    running: dict[str, tuple[Workload, int]] = {}  # key -> (workload, ends at)
    gpu_seconds = {"light": 0, "heavy": 0}
    for now in range(1, 3000):
        for key, (_, end) in list(running.items()):
            if end <= now:
                del running[key]
        current = [w for w, _ in running.values()] + [w for name in waiting for w in waiting[name][:20]]
        result = plan(qs, current)
        for key in result.admit:
            name = key.split("-")[0]
            w = next(w for w in waiting[name] if w.key == key)
            waiting[name].remove(w)
            length = durations[name][int(key.split("-")[1]) % 3]
            running[key] = (Workload(**{**w.__dict__, "admitted_at": T0 + timedelta(seconds=now)}), now + length)
        for w, _ in running.values():
            gpu_seconds[w.queue] += 1
    assert all(waiting.values()), "both queues stayed saturated"
    share = gpu_seconds["heavy"] / (gpu_seconds["light"] + gpu_seconds["heavy"])
    assert abs(share - 0.75) <= 0.05 * 0.75, gpu_seconds
