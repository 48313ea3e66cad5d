"""Prometheus metrics of the operator (Prometheus only: health and the HTTP server are in `gpujob.health`).

Everything lives in one `Metrics` object with its own `CollectorRegistry` (never the global default), so tests
and several operators in one process stay apart. There is no module-level instance: the entry point
(`gpujob.entrypoints`) builds one and hands it to the runtime and to whatever else records metrics.

The job metrics named in docs/architecture.md (`gpu_worker_*`) keep their names exactly; the SRE metrics are
`gpujob_*`. Live-job gauges (jobs by phase, pending age) and stream statistics are computed at scrape time by
custom collectors, so they are never stale and need no background task.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from gpujob import __version__
from gpujob.api.constants import TERMINAL_PHASES, JobType, Phase, Reason
from gpujob.api.request import RequestOutcome
from gpujob.logging import get_logger

log = get_logger(__name__)

# No `*_created` series beside each counter and histogram: one more series per label set that no rule or
# dashboard reads (process-wide, as PROMETHEUS_DISABLE_CREATED_SERIES=true would do).
disable_created_metrics()  # type: ignore[no-untyped-call]  # (prometheus_client leaves it untyped)

# Jobs run for minutes to hours; the top bucket is a day (the longest deadline we expect).
DURATION_BUCKETS: Final = (
    10, 30, 60, 120, 300, 600, 900, 1800, 2700, 3600, 5400, 7200, 10800, 14400, 21600, 28800, 43200, 86400,
)  # fmt: skip
# Queue wait is seconds when the cluster has room, hours when GPUs are scarce.
QUEUE_WAIT_BUCKETS: Final = (1, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400)

# A job is "pending" from the moment it is accepted until its first Running (Queued and Scheduled).
PENDING_PHASES: Final = frozenset({Phase.QUEUED, Phase.SCHEDULED, Phase.PENDING})
LIVE_PHASES: Final = tuple(p for p in Phase if p not in TERMINAL_PHASES)

UNKNOWN_REASON: Final = "Unknown"  # the operator gave no reason
OTHER_REASON: Final = "Other"  # a reason outside the vocabulary: folded, so labels stay bounded
_KNOWN_REASONS: Final = frozenset(r.value for r in Reason)
_FINISHED_MEMORY: Final = 10_000  # finished job ids remembered, so late progress can't resurrect a gauge
_ENDED: Final = "ended"
_DELETED: Final = "deleted"
# Outcomes of a stream request (the bridge's vocabulary); exported at 0 before the first of each.
REQUEST_OUTCOMES: Final = tuple(RequestOutcome)  # each always exported, 0 until it happens
# Reasons of a job that failed through its own input, not the platform: a non-retryable exit code (the job's own
# declaration that retrying cannot help; default [64], the worker's bad-input code) and a spec or params refused
# before any Pod. The failure-ratio alert leaves them out; their error series exist from the start (at 0), so
# increase() sees the first one.
USER_ERROR_REASONS: Final = frozenset(
    r for r in Reason if r.value in {"NonRetryableExitCode", "InvalidSpec", "InvalidParams"}
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())


def reason_label(reason: str | None) -> str:
    """Reasons become label values only from the shared vocabulary (bounded cardinality)."""
    if not reason:
        return UNKNOWN_REASON
    return reason if reason in _KNOWN_REASONS else OTHER_REASON


class StreamStats(Protocol):
    """What the Redis bridge reports; read at scrape time through the function given to
    `register_stream_stats`. Any object with these attributes will do (`StreamStatsSnapshot` is one)."""

    @property
    def lag(self) -> int | None:
        """Entries not yet delivered to the consumer group (XINFO GROUPS `lag`; None if Redis can't tell)."""

    @property
    def pending(self) -> int:
        """Entries delivered but not acknowledged (XPENDING count)."""

    @property
    def dead_lettered_total(self) -> Mapping[str, int]:
        """Requests moved to the dead-letter stream since start, by reason."""

    @property
    def requests_total(self) -> Mapping[str, int]:
        """Requests handled since start, by outcome: created, duplicate, dead_lettered, cancelled."""

    @property
    def redis_up(self) -> bool | None:
        """Whether the bridge's last Redis call succeeded (None before its first)."""


@dataclass(frozen=True)
class StreamStatsSnapshot:
    lag: int | None = None
    pending: int = 0
    dead_lettered_total: Mapping[str, int] = field(default_factory=dict)
    requests_total: Mapping[str, int] = field(default_factory=dict)
    redis_up: bool | None = None


@dataclass(frozen=True)
class QueueStats:
    """One GpuQueue as its last admission plan left it (docs/queues.md): read at scrape time through the function
    given to `register_queue_stats`. Resource amounts are in the resource's unit (GPUs, cores, bytes)."""

    quota: Mapping[str, float] = field(default_factory=dict)
    usage: Mapping[str, float] = field(default_factory=dict)  # admitted jobs' requests, borrowed included
    borrowed: Mapping[str, float] = field(default_factory=dict)  # usage beyond the quota
    pending: int = 0
    admitted: int = 0
    oldest_pending_since: datetime | None = None  # when its longest-waiting job began to wait


@dataclass
class LiveJob:
    job_type: str
    namespace: str
    name: str
    phase: Phase
    since: datetime  # when it entered `phase`
    pending_since: datetime | None  # when it became pending (Queued/Scheduled streak), None if not pending
    ran: bool  # reached Running at least once (queue wait already observed)


class _LiveJobsCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        now = self._metrics.clock()
        jobs = self._metrics.live_jobs()
        types = sorted({t.value for t in JobType} | {j.job_type for j in jobs.values()})
        counts = {(phase, t): 0 for phase in LIVE_PHASES for t in types}
        ages: dict[Phase, list[float]] = {phase: [] for phase in LIVE_PHASES}
        oldest_pending = 0.0
        for job in jobs.values():
            counts[job.phase, job.job_type] += 1
            ages[job.phase].append(_seconds(job.since, now))
            if job.pending_since is not None:
                oldest_pending = max(oldest_pending, _seconds(job.pending_since, now))

        by_phase = GaugeMetricFamily(
            "gpujob_jobs", "GpuJobs known to the operator, by phase.", labels=["phase", "type"]
        )
        for (phase, job_type), n in counts.items():
            by_phase.add_metric([phase.value, job_type], n)
        yield by_phase

        yield GaugeMetricFamily(
            "gpujob_pending_oldest_age_seconds",
            "Seconds the longest-waiting job has been pending (Queued/Scheduled, before its first Running); 0 if none.",
            value=oldest_pending,
        )
        summary = SummaryMetricFamily(
            "gpujob_phase_age_seconds", "Seconds live jobs have spent in their current phase.", labels=["phase"]
        )
        oldest = GaugeMetricFamily(
            "gpujob_phase_age_seconds_max",
            "Seconds the oldest job has spent in each phase; 0 if none.",
            labels=["phase"],
        )
        for phase, values in ages.items():
            summary.add_metric([phase.value], count_value=len(values), sum_value=sum(values))
            oldest.add_metric([phase.value], max(values, default=0.0))
        yield summary
        yield oldest


class _StreamCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        source = self._metrics.stream_stats_source
        if source is None:
            return
        try:
            stats = source()
        except Exception as exc:  # a scrape must never fail because the bridge is in a bad state
            log.warning("stream stats unavailable", error=repr(exc))
            return
        if stats is None:  # bridge not running: export nothing rather than misleading zeros
            return
        if stats.redis_up is not None:
            yield GaugeMetricFamily(
                "gpujob_bridge_redis_up",
                "1 while the stream bridge reaches Redis, 0 while its Redis calls fail (it retries).",
                value=1 if stats.redis_up else 0,
            )
        if stats.lag is not None:
            yield GaugeMetricFamily(
                "gpujob_stream_lag", "Request-stream entries not yet delivered to the consumer group.", value=stats.lag
            )
        yield GaugeMetricFamily(
            "gpujob_stream_pending", "Request-stream entries delivered but not yet acknowledged.", value=stats.pending
        )
        dead = CounterMetricFamily(
            "gpujob_requests_dead_lettered", "Requests moved to the dead-letter stream, by reason.", labels=["reason"]
        )
        for reason, n in sorted(stats.dead_lettered_total.items()):
            dead.add_metric([reason], n)
        yield dead
        requests = CounterMetricFamily("gpujob_requests", "Stream requests handled, by outcome.", labels=["outcome"])
        # Known outcomes are always present (0 until the first), so increase() sees the first dead letter too.
        outcomes = {outcome: 0 for outcome in REQUEST_OUTCOMES} | dict(stats.requests_total)
        for outcome, n in sorted(outcomes.items()):
            requests.add_metric([outcome], n)
        yield requests


class _QueueCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        source = self._metrics.queue_stats_source
        if source is None:
            return
        try:
            queues = source()
        except Exception as exc:  # a scrape must never fail because of the queue manager
            log.warning("queue stats unavailable", error=repr(exc))
            return
        now = self._metrics.clock()
        pending = GaugeMetricFamily(
            "gpujob_queue_pending_jobs", "Jobs waiting for admission, by GpuQueue.", labels=["queue"]
        )
        admitted = GaugeMetricFamily(
            "gpujob_queue_admitted_jobs", "Admitted jobs holding quota, by GpuQueue.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "gpujob_queue_oldest_pending_age_seconds",
            "Seconds the longest-waiting job of the queue has waited for admission; 0 if none waits.",
            labels=["queue"],
        )
        families = {
            "quota": GaugeMetricFamily(
                "gpujob_queue_quota", "The GpuQueue's spec.quota, by resource.", labels=["queue", "resource"]
            ),
            "usage": GaugeMetricFamily(
                "gpujob_queue_usage",
                "Resources its admitted jobs hold (borrowed included), by GpuQueue and resource.",
                labels=["queue", "resource"],
            ),
            "borrowed": GaugeMetricFamily(
                "gpujob_queue_borrowed",
                "Resources the queue uses beyond its quota (other queues' idle quota), by resource.",
                labels=["queue", "resource"],
            ),
        }
        for name, stats in sorted(queues.items()):
            pending.add_metric([name], stats.pending)
            admitted.add_metric([name], stats.admitted)
            since = stats.oldest_pending_since
            oldest.add_metric([name], _seconds(since, now) if since is not None and stats.pending else 0.0)
            for what, family in families.items():
                for resource, amount in sorted(getattr(stats, what).items()):
                    family.add_metric([name, resource], amount)
        yield from (pending, admitted, oldest, *families.values())


class Metrics:
    """All metrics of one operator, in one registry. `clock` is injectable for tests."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], datetime] = _utcnow) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.clock = clock
        self.stream_stats_source: Callable[[], StreamStats | None] | None = None
        self.queue_stats_source: Callable[[], Mapping[str, QueueStats]] | None = None
        self._lock = threading.Lock()
        self._live: dict[str, LiveJob] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()  # job id -> _ENDED | _DELETED
        r = self.registry

        self.jobs_total = Counter(
            "gpu_worker_jobs_total", "Jobs finished, by type and terminal status.", ["type", "status"], registry=r
        )
        self.job_duration = Histogram(
            "gpu_worker_job_duration_seconds",
            "Seconds from a job's first Running (or creation) to its end.",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.job_errors = Counter(
            "gpu_worker_job_errors_total",
            "Failed jobs and failed attempts (retried), by type and reason.",
            ["type", "reason"],
            registry=r,
        )
        self.progress = Gauge(
            "gpu_worker_progress_percent", "Progress of running jobs (0-100).", ["job_id", "type"], registry=r
        )
        self.queue_wait = Histogram(
            "gpujob_queue_wait_seconds",
            "Seconds from a job's creation to its first Running.",
            ["type"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "gpujob_retries_total", "Failed attempts that will be retried, by type and reason.", ["type", "reason"],
            registry=r,
        )  # fmt: skip
        self.handler_errors = Counter(
            "gpujob_handler_errors_total", "Exceptions raised by operator handlers.", ["handler"], registry=r
        )
        Info("gpujob_operator", "The running operator (absent = operator down).", registry=r).info(
            {"version": __version__}
        )
        self.queue_admissions = Counter(
            "gpujob_queue_admissions_total", "Jobs admitted by their GpuQueue.", ["queue"], registry=r
        )
        self.queue_preemptions = Counter(
            "gpujob_queue_preemptions_total",
            "Admitted jobs their GpuQueue evicted (for a higher priority or to reclaim lent quota), by the queue "
            "that admitted them.",
            ["queue"],
            registry=r,
        )
        self.queue_fallbacks = Counter(
            "gpujob_queue_fallbacks_total",
            "Jobs of the GpuQueue moved to CPU (spec.fallback) after waiting too long for a GPU.",
            ["queue"],
            registry=r,
        )
        self.queue_admission_wait = Histogram(
            "gpujob_queue_admission_wait_seconds",
            "Seconds a job waited for its GpuQueue's admission (since it was created, or last preempted).",
            ["queue"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        r.register(_LiveJobsCollector(self))
        r.register(_StreamCollector(self))
        r.register(_QueueCollector(self))
        # Series exist from the start (at 0), so rate() and ratios see the first event of each kind.
        for job_type in JobType:
            for phase in TERMINAL_PHASES:
                self.jobs_total.labels(job_type.value, phase.event_status)
            self.job_duration.labels(job_type.value)
            self.queue_wait.labels(job_type.value)
            for reason in USER_ERROR_REASONS:
                self.job_errors.labels(job_type.value, reason.value)

    # --- job lifecycle

    def record_transition(
        self,
        *,
        job_id: str,
        namespace: str,
        name: str,
        job_type: str,
        old: Phase | None,
        new: Phase,
        reason: str | None,
        created_at: datetime,
        transition_at: datetime,
        started_at: datetime | None,
    ) -> None:
        """Account for one phase change (call once per change; `old=None` = the job had no phase yet).

        Terminal phases count the job, observe its duration and drop its live entry and progress gauge;
        Failed and each Retrying (a failed attempt) count an error with the reason; the first Running
        observes the queue wait."""
        new = Phase(new)
        old = Phase(old) if old is not None else None
        if old == new and new is not Phase.RETRYING:
            return
        reason_value = reason_label(reason)
        first_run = False
        with self._lock:
            job = self._live.get(job_id)
            if new.terminal:
                if self._finished.get(job_id) == _ENDED:  # the same end reported again (a retried handler)
                    return
                self._live.pop(job_id, None)
                self._remember_finished(job_id, _ENDED)
            else:
                self._finished.pop(job_id, None)
                pending_since = None
                if new in PENDING_PHASES:
                    pending_since = job.pending_since if job and job.pending_since else transition_at
                first_run = new is Phase.RUNNING and not (job and job.ran)
                self._live[job_id] = LiveJob(
                    job_type=job_type,
                    namespace=namespace,
                    name=name,
                    phase=new,
                    since=transition_at,
                    pending_since=pending_since,
                    ran=bool(job and job.ran) or new is Phase.RUNNING,
                )
        if new.terminal:
            self.jobs_total.labels(job_type, new.event_status).inc()
            self.job_duration.labels(job_type).observe(_seconds(started_at or created_at, transition_at))
            if new is Phase.FAILED:
                self.job_errors.labels(job_type, reason_value).inc()
            self._remove_progress(job_id, job_type, job)
        elif new is Phase.RETRYING:
            self.job_errors.labels(job_type, reason_value).inc()
            self.retries.labels(job_type, reason_value).inc()
        elif first_run:
            self.queue_wait.labels(job_type).observe(_seconds(created_at, transition_at))

    def resync(
        self, *, job_id: str, namespace: str, name: str, job_type: str, phase: Phase, since: datetime, ran: bool
    ) -> None:
        """Seed the live map with a job seen after a restart: counts nothing, observes nothing."""
        with self._lock:
            if phase.terminal:
                self._live.pop(job_id, None)
                self._remember_finished(job_id, _ENDED)
                return
            self._finished.pop(job_id, None)
            self._live[job_id] = LiveJob(
                job_type=job_type,
                namespace=namespace,
                name=name,
                phase=phase,
                since=since,
                pending_since=since if phase in PENDING_PHASES else None,
                ran=ran or phase is Phase.RUNNING,
            )

    def record_progress(self, *, job_id: str, job_type: str, percent: float) -> None:
        with self._lock:
            if job_id in self._finished:  # a late event after the end must not bring the gauge back
                return
        self.progress.labels(job_id, job_type).set(min(100.0, max(0.0, percent)))

    def forget(self, job_id: str) -> None:
        """The GpuJob was deleted: drop everything live about it."""
        with self._lock:
            job = self._live.pop(job_id, None)
            if job_id not in self._finished:
                self._remember_finished(job_id, _DELETED)
        self._remove_progress(job_id, job.job_type if job else None, job)

    def handler_error(self, handler: str) -> None:
        self.handler_errors.labels(handler).inc()

    # --- GPU queues

    def queue_seen(self, queue: str) -> None:
        """A GpuQueue exists: its counters and histogram are exported (at 0) from now on, so increase() and the
        starving alert see the first admission, or the lack of one."""
        self.queue_admissions.labels(queue)
        self.queue_preemptions.labels(queue)
        self.queue_fallbacks.labels(queue)
        self.queue_admission_wait.labels(queue)

    def queue_gone(self, queue: str) -> None:
        for family in (self.queue_admissions, self.queue_preemptions, self.queue_fallbacks, self.queue_admission_wait):
            with contextlib.suppress(KeyError):
                family.remove(queue)

    def queue_admitted(self, queue: str, waited_seconds: float) -> None:
        self.queue_admissions.labels(queue).inc()
        self.queue_admission_wait.labels(queue).observe(max(0.0, waited_seconds))

    def queue_preempted(self, queue: str) -> None:
        self.queue_preemptions.labels(queue).inc()

    def queue_fallback(self, queue: str) -> None:
        self.queue_fallbacks.labels(queue).inc()

    def register_queue_stats(self, fn: Callable[[], Mapping[str, QueueStats]] | None) -> None:
        """`fn` is called at every scrape (queue name -> QueueStats). None unregisters."""
        self.queue_stats_source = fn

    def register_stream_stats(self, fn: Callable[[], StreamStats | None] | None) -> None:
        """`fn` is called at every scrape; it returns None while the bridge is not running. None unregisters."""
        self.stream_stats_source = fn

    def live_jobs(self) -> dict[str, LiveJob]:
        with self._lock:
            return dict(self._live)

    def _remember_finished(self, job_id: str, how: str) -> None:
        self._finished[job_id] = how
        self._finished.move_to_end(job_id)
        while len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _remove_progress(self, job_id: str, job_type: str | None, job: LiveJob | None) -> None:
        types = {t for t in (job_type, job.job_type if job else None) if t}
        # The type given at the end may differ from the one progress was reported with: remove any match.
        types |= {labels[1] for labels in self._progress_label_sets() if labels[0] == job_id}
        for t in types:
            with contextlib.suppress(KeyError):
                self.progress.remove(job_id, t)

    def _progress_label_sets(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for metric in self.progress.collect():
            for sample in metric.samples:
                found.append((sample.labels["job_id"], sample.labels["type"]))
        return found
