"""Where a waiting job stands, as the backend and `kubectl` see it (pure; docs/queues.md, "The backend sees the
queue"): the position written and published (exact for the first K, coarser behind), the estimated start from the
queue's recent durations, and the per-job rate limit of position events.

- `published_position(p, exact)`: p itself while p <= exact (K, `GPUJOB_QUEUE_EXACT_POSITIONS`); behind that the
  smallest exact·2^m >= p, an upper bound ("at most 400"). One job leaving the head of a queue of N waiting jobs
  then changes the written position of at most K + log2(N/K) jobs instead of N (status writes, reconciles and
  events alike).
- `Durations` and `estimate_wait()`: the mean of the queue's last `window` run times (admitted -> finished, in
  seconds) and the number of its jobs running now; a job at position p is expected to start in about
  p x mean / running seconds (the queue finishes `running` jobs per mean duration: Little's law in steady state).
  No estimate before `min_samples` durations, or while the queue runs nothing. Rough on purpose: jobs ahead are
  taken to be like the recent ones, and borrowing, preemption and priorities arriving later are not foreseen.
- `Throttle`: at most one event per job per `interval` seconds; the first change is sent at once, later ones
  within the interval are folded into one sent when it ends (the latest value: a backend never keeps a stale
  position), and a value equal to the last one sent is never sent again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

DEFAULT_EXACT: Final = 100
DEFAULT_WINDOW: Final = 20
DEFAULT_MIN_SAMPLES: Final = 3

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def published_position(position: int, exact: int = DEFAULT_EXACT) -> int:
    """The position written to status and sent on the event channel: exact up to `exact`, then an upper bound
    (exact·2^m). 0 (in no queue) stays 0."""
    if position <= exact or exact < 1:
        return position
    bound = exact
    while bound < position:
        bound *= 2
    return bound


@dataclass
class Durations:
    """Recent run times per queue (seconds from admission to the end), newest last, `window` kept per queue."""

    window: int = DEFAULT_WINDOW
    _by_queue: dict[str, deque[float]] = field(default_factory=dict)

    def add(self, queue: str, seconds: float) -> None:
        if seconds < 0:
            return
        self._by_queue.setdefault(queue, deque(maxlen=self.window)).append(seconds)

    def of(self, queue: str) -> list[float]:
        return list(self._by_queue.get(queue, ()))


def estimate_wait(
    position: int, running: int, durations: Iterable[float], min_samples: int = DEFAULT_MIN_SAMPLES
) -> float | None:
    """Seconds until the job at `position` (1-based) is expected to start; None when the queue cannot tell yet
    (fewer than `min_samples` recent durations, nothing running to measure a pace by, or no position)."""
    samples = list(durations)
    if position < 1 or running < 1 or len(samples) < max(1, min_samples):
        return None
    mean = sum(samples) / len(samples)
    return position * mean / running


@dataclass
class Throttle(Generic[K, V]):
    """Per-key rate limit with a trailing send. Times are the caller's (monotonic seconds)."""

    interval: float
    _sent_at: dict[K, float] = field(default_factory=dict)
    _sent: dict[K, V] = field(default_factory=dict)
    _due: dict[K, V] = field(default_factory=dict)

    def offer(self, key: K, value: V, now: float) -> bool:
        """True: send `value` now. False: nothing new, or held until the interval ends (see `due`)."""
        if key in self._sent and self._sent[key] == value:
            self._due.pop(key, None)  # back to what was last sent: nothing to say
            return False
        last = self._sent_at.get(key)
        if last is None or now - last >= self.interval:
            self._record(key, value, now)
            return True
        self._due[key] = value
        return False

    def due(self, now: float) -> list[tuple[K, V]]:
        """The held values whose interval has ended (recorded as sent)."""
        ready = [(k, v) for k, v in self._due.items() if now - self._sent_at.get(k, now) >= self.interval]
        for key, value in ready:
            self._record(key, value, now)
        return ready

    def next_due(self) -> float | None:
        """When the earliest held value may be sent (None: nothing held)."""
        return min((self._sent_at[k] + self.interval for k in self._due if k in self._sent_at), default=None)

    def forget(self, key: K) -> None:
        self._sent_at.pop(key, None)
        self._sent.pop(key, None)
        self._due.pop(key, None)

    def keys(self) -> set[K]:
        return set(self._sent) | set(self._due)

    def _record(self, key: K, value: V, now: float) -> None:
        self._sent_at[key] = now
        self._sent[key] = value
        self._due.pop(key, None)
