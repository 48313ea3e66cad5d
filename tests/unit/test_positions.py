"""Where a waiting job stands (gpujob.operator.positions): the position written and published, the start estimate
from the queue's recent durations, and the per-job rate limit of position events."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpujob.operator.positions import Durations, Throttle, estimate_wait, published_position


def test_positions_are_exact_for_the_first_k_then_an_upper_bound_doubling_per_bucket() -> None:
    assert [published_position(p, 100) for p in (0, 1, 57, 100)] == [0, 1, 57, 100]
    assert [published_position(p, 100) for p in (101, 200, 201, 400, 401, 10_000)] == [200, 200, 400, 400, 800, 12_800]


@given(st.integers(min_value=1, max_value=200), st.integers(min_value=2, max_value=20_000))
def test_a_published_position_is_never_below_the_exact_one_and_the_head_leaving_rewrites_few(
    exact: int, waiting: int
) -> None:
    before = [published_position(p, exact) for p in range(1, waiting + 1)]
    after = [published_position(p - 1, exact) for p in range(2, waiting + 1)]  # the head left: all move up one
    assert all(shown >= p for p, shown in enumerate(before, start=1))
    changed = sum(1 for old, new in zip(before[1:], after, strict=True) if old != new)
    buckets = 0
    while exact * 2**buckets < waiting:
        buckets += 1
    assert changed <= min(exact, waiting) + buckets  # K exact ones, one per bucket behind: never N


def test_no_estimate_until_the_queue_has_durations_and_runs_something() -> None:
    assert estimate_wait(3, running=2, durations=[]) is None
    assert estimate_wait(3, running=2, durations=[60.0, 60.0]) is None  # fewer than 3 samples
    assert estimate_wait(3, running=0, durations=[60.0] * 5) is None  # nothing running: no pace to go by
    assert estimate_wait(0, running=2, durations=[60.0] * 5) is None


def test_the_estimate_is_position_times_the_mean_duration_over_the_jobs_running() -> None:
    # The queue finishes `running` jobs per mean duration: position 4 with 2 running, jobs of 100 s mean: 200 s.
    assert estimate_wait(4, running=2, durations=[50.0, 100.0, 150.0]) == 200.0
    assert estimate_wait(1, running=1, durations=[30.0, 30.0, 30.0]) == 30.0


def test_durations_keep_the_last_window_per_queue() -> None:
    durations = Durations(window=3)
    for seconds in (1.0, 2.0, 3.0, 4.0):
        durations.add("a", seconds)
    durations.add("b", 9.0)
    durations.add("b", -1.0)  # a clock skewed backwards: not a duration
    assert durations.of("a") == [2.0, 3.0, 4.0] and durations.of("b") == [9.0] and durations.of("c") == []


def test_the_throttle_sends_the_first_change_at_once_and_folds_the_rest_into_one_at_the_interval() -> None:
    throttle: Throttle[str, int] = Throttle(interval=2.0)
    assert throttle.offer("job", 5, now=0.0)  # first: at once
    assert not throttle.offer("job", 5, now=0.1)  # unchanged: never again
    assert not throttle.offer("job", 4, now=0.5)  # within the interval: held
    assert not throttle.offer("job", 3, now=1.0)  # replaced by the latest
    assert throttle.next_due() == 2.0
    assert throttle.due(1.9) == []
    assert throttle.due(2.0) == [("job", 3)]  # one event, with the latest position
    assert throttle.due(10.0) == [] and throttle.next_due() is None
    assert throttle.offer("job", 2, now=4.5)  # a full interval later: at once again


def test_a_held_value_that_returns_to_what_was_sent_is_dropped() -> None:
    throttle: Throttle[str, int] = Throttle(interval=2.0)
    assert throttle.offer("job", 5, now=0.0)
    assert not throttle.offer("job", 4, now=0.5)
    assert not throttle.offer("job", 5, now=1.0)  # back to the value the backend has
    assert throttle.due(5.0) == []


def test_a_forgotten_job_gets_nothing_held_and_its_next_wait_starts_fresh() -> None:
    throttle: Throttle[str, int] = Throttle(interval=2.0)
    assert throttle.offer("job", 5, now=0.0)
    assert not throttle.offer("job", 4, now=0.5)
    throttle.forget("job")  # admitted: its held position must not be sent after its Pod exists
    assert throttle.due(5.0) == [] and throttle.keys() == set()
    assert throttle.offer("job", 5, now=0.6)  # preempted later: waits again, told at once
