"""Job metrics through a job's life, scraped from the real /metrics endpoint; health and readiness endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY as GLOBAL_REGISTRY
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gpujob import health
from gpujob.api.constants import JobType, Phase, Reason
from gpujob.health import Health, bound_port
from gpujob.metrics import Metrics, QueueStats, StreamStatsSnapshot

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
LORA = JobType.TRAIN_LORA.value


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


Key = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Scrape:
    status: int
    content_type: str
    text: str
    samples: dict[Key, float] = field(default_factory=dict)
    families: set[str] = field(default_factory=set)

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def named(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(labels), v) for (n, labels), v in self.samples.items() if n == name]


@dataclass
class Endpoint:
    metrics: Metrics
    health: Health
    clock: Clock
    url: str
    session: aiohttp.ClientSession

    async def scrape(self, accept: str | None = None) -> Scrape:
        headers = {"Accept": accept} if accept else {}
        async with self.session.get(f"{self.url}/metrics", headers=headers) as response:
            scrape = Scrape(response.status, response.headers["Content-Type"], await response.text())
        if not accept:
            for family in text_string_to_metric_families(scrape.text):
                scrape.families.add(family.name)
                for s in family.samples:
                    scrape.samples[s.name, frozenset(s.labels.items())] = s.value
        return scrape

    async def get_json(self, path: str) -> tuple[int, Any]:
        async with self.session.get(f"{self.url}{path}") as response:
            return response.status, await response.json()

    def transition(
        self,
        job_id: str,
        old: Phase | None,
        new: Phase,
        at: timedelta,
        *,
        reason: str | None = None,
        started: timedelta | None = None,
        job_type: str = LORA,
    ) -> None:
        self.clock.now = T0 + at
        self.metrics.record_transition(
            job_id=job_id,
            namespace="ml",
            name=f"job-{job_id}",
            job_type=job_type,
            old=old,
            new=new,
            reason=reason,
            created_at=T0,
            transition_at=T0 + at,
            started_at=None if started is None else T0 + started,
        )


async def _serve(m: Metrics, clock: Clock) -> AsyncIterator[Endpoint]:
    h = Health()
    runner = await health.serve(h, m.registry, 0, "127.0.0.1")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            yield Endpoint(m, h, clock, f"http://127.0.0.1:{bound_port(runner)}", session)
    finally:
        await runner.cleanup()


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    clock = Clock()
    async for ep in _serve(Metrics(clock=clock), clock):
        yield ep


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


async def test_a_job_through_its_life(endpoint: Endpoint) -> None:
    ep = endpoint
    ep.transition("a1", None, Phase.QUEUED, minutes(0), reason=Reason.CREATED)
    ep.clock.now = T0 + minutes(0.5)
    s = await ep.scrape()
    assert s.status == 200
    assert s.value("gpujob_jobs", phase="Queued", type=LORA) == 1
    assert s.value("gpujob_jobs", phase="Running", type=LORA) == 0
    assert s.value("gpujob_pending_oldest_age_seconds") == 30
    assert s.value("gpujob_phase_age_seconds_count", phase="Queued") == 1
    assert s.value("gpujob_phase_age_seconds_sum", phase="Queued") == 30
    # Finished-job counters exist at 0 for every type, before any job ends.
    assert s.value("gpu_worker_jobs_total", type=LORA, status="failed") == 0
    assert s.value("gpu_worker_jobs_total", type=JobType.RENDER_VIDEO.value, status="succeeded") == 0

    ep.transition("a1", Phase.QUEUED, Phase.SCHEDULED, minutes(1), reason=Reason.POD_CREATED)
    ep.clock.now = T0 + minutes(1.25)
    s = await ep.scrape()
    assert s.value("gpujob_jobs", phase="Scheduled", type=LORA) == 1
    assert s.value("gpujob_jobs", phase="Queued", type=LORA) == 0
    assert s.value("gpujob_pending_oldest_age_seconds") == 75  # pending since Queued, not since Scheduled
    assert s.value("gpujob_phase_age_seconds_max", phase="Scheduled") == 15

    ep.transition("a1", Phase.SCHEDULED, Phase.RUNNING, minutes(1.5), reason=Reason.POD_RUNNING)
    ep.metrics.record_progress(job_id="a1", job_type=LORA, percent=10)
    ep.metrics.record_progress(job_id="a1", job_type=LORA, percent=55.5)
    s = await ep.scrape()
    assert s.value("gpujob_queue_wait_seconds_count", type=LORA) == 1
    assert s.value("gpujob_queue_wait_seconds_sum", type=LORA) == 90
    assert s.value("gpujob_queue_wait_seconds_bucket", type=LORA, le="60.0") == 0
    assert s.value("gpujob_queue_wait_seconds_bucket", type=LORA, le="120.0") == 1
    assert s.value("gpujob_pending_oldest_age_seconds") == 0
    assert s.value("gpu_worker_progress_percent", job_id="a1", type=LORA) == 55.5

    # The first attempt fails; the job is retried.
    ep.transition("a1", Phase.RUNNING, Phase.RETRYING, minutes(10), reason=Reason.OOM_KILLED)
    s = await ep.scrape()
    assert s.value("gpu_worker_job_errors_total", type=LORA, reason="OOMKilled") == 1
    assert s.value("gpujob_retries_total", type=LORA, reason="OOMKilled") == 1
    assert s.value("gpujob_jobs", phase="Retrying", type=LORA) == 1
    assert s.value("gpu_worker_jobs_total", type=LORA, status="failed") == 0

    ep.transition("a1", Phase.RETRYING, Phase.QUEUED, minutes(11))
    ep.clock.now = T0 + minutes(11.5)
    assert (await ep.scrape()).value("gpujob_pending_oldest_age_seconds") == 30
    ep.transition("a1", Phase.QUEUED, Phase.SCHEDULED, minutes(11.75))
    ep.transition("a1", Phase.SCHEDULED, Phase.RUNNING, minutes(12))
    ep.metrics.record_progress(job_id="a1", job_type=LORA, percent=80)
    s = await ep.scrape()
    assert s.value("gpujob_queue_wait_seconds_count", type=LORA) == 1  # only the first Running is queue wait
    assert s.value("gpu_worker_progress_percent", job_id="a1", type=LORA) == 80

    ep.transition("a1", Phase.RUNNING, Phase.SUCCEEDED, minutes(70), reason=Reason.SUCCEEDED, started=minutes(1.5))
    s = await ep.scrape()
    assert s.value("gpu_worker_jobs_total", type=LORA, status="succeeded") == 1
    assert s.value("gpu_worker_job_duration_seconds_count", type=LORA) == 1
    assert s.value("gpu_worker_job_duration_seconds_sum", type=LORA) == 70 * 60 - 90
    assert s.value("gpu_worker_job_duration_seconds_bucket", type=LORA, le="3600.0") == 0
    assert s.value("gpu_worker_job_duration_seconds_bucket", type=LORA, le="5400.0") == 1
    assert s.named("gpu_worker_progress_percent") == []  # removed when the job ends
    assert all(v == 0 for _, v in s.named("gpujob_jobs"))
    assert s.value("gpu_worker_job_errors_total", type=LORA, reason="OOMKilled") == 1  # success adds no error

    # A progress event that arrives late must not bring the gauge back.
    ep.metrics.record_progress(job_id="a1", job_type=LORA, percent=100)
    assert (await ep.scrape()).named("gpu_worker_progress_percent") == []


async def test_failed_and_cancelled_jobs(endpoint: Endpoint) -> None:
    ep = endpoint
    voice = JobType.TRAIN_VOICE.value
    ep.transition("f1", None, Phase.QUEUED, minutes(0), job_type=voice)
    ep.transition("f1", Phase.QUEUED, Phase.RUNNING, minutes(2), job_type=voice)
    ep.metrics.record_progress(job_id="f1", job_type=voice, percent=20)
    ep.transition("f1", Phase.RUNNING, Phase.FAILED, minutes(5), reason=Reason.BACKOFF_LIMIT_EXCEEDED, job_type=voice)
    # Rejected at once: no Pod ever ran, duration counts from creation.
    ep.transition("f2", None, Phase.FAILED, minutes(1), reason=Reason.INVALID_SPEC, job_type=voice)
    ep.transition("f3", None, Phase.FAILED, minutes(1), reason="SomethingNew", job_type=voice)
    ep.transition("f4", None, Phase.FAILED, minutes(1), reason=None, job_type=voice)
    ep.transition("c1", None, Phase.QUEUED, minutes(0), job_type=voice)
    ep.transition("c1", Phase.QUEUED, Phase.CANCELLED, minutes(3), reason=Reason.CANCELLED, job_type=voice)
    s = await ep.scrape()
    assert s.value("gpu_worker_jobs_total", type=voice, status="failed") == 4
    assert s.value("gpu_worker_jobs_total", type=voice, status="cancelled") == 1
    errors = {  # (user-error reasons are exported at 0 from the start: USER_ERROR_REASONS)
        labels["reason"]: v for labels, v in s.named("gpu_worker_job_errors_total") if labels["type"] == voice and v
    }
    assert errors == {"BackoffLimitExceeded": 1, "InvalidSpec": 1, "Other": 1, "Unknown": 1}
    assert s.value("gpu_worker_job_duration_seconds_count", type=voice) == 5
    assert s.value("gpu_worker_job_duration_seconds_sum", type=voice) == 5 * 60 + 60 + 60 + 60 + 3 * 60
    assert s.named("gpu_worker_progress_percent") == []
    assert s.value("gpujob_queue_wait_seconds_sum", type=voice) == 120


async def test_an_end_reported_twice_counts_once(endpoint: Endpoint) -> None:
    ep = endpoint
    ep.transition("e1", None, Phase.QUEUED, minutes(0))
    ep.transition("e1", Phase.QUEUED, Phase.RUNNING, minutes(1))
    for _ in range(2):  # a handler retried after its status patch failed
        ep.transition("e1", Phase.RUNNING, Phase.FAILED, minutes(9), reason=Reason.ERROR, started=minutes(1))
    # Deleted first, its end reported after: still counted, once.
    ep.transition("e2", None, Phase.QUEUED, minutes(0))
    ep.metrics.forget("e2")
    ep.transition("e2", Phase.QUEUED, Phase.CANCELLED, minutes(2), reason=Reason.CANCELLED)
    ep.transition("e2", Phase.QUEUED, Phase.CANCELLED, minutes(2), reason=Reason.CANCELLED)
    s = await ep.scrape()
    assert s.value("gpu_worker_jobs_total", type=LORA, status="failed") == 1
    assert s.value("gpu_worker_job_errors_total", type=LORA, reason="Error") == 1
    assert s.value("gpu_worker_jobs_total", type=LORA, status="cancelled") == 1
    assert s.value("gpu_worker_job_duration_seconds_count", type=LORA) == 2


async def test_forget_drops_a_deleted_job(endpoint: Endpoint) -> None:
    ep = endpoint
    ep.transition("d1", None, Phase.QUEUED, minutes(0))
    ep.transition("d1", Phase.QUEUED, Phase.RUNNING, minutes(1))
    ep.metrics.record_progress(job_id="d1", job_type=LORA, percent=40)
    ep.transition("d2", None, Phase.QUEUED, minutes(1))
    ep.metrics.forget("d1")
    ep.metrics.forget("never-seen")
    s = await ep.scrape()
    assert s.named("gpu_worker_progress_percent") == []
    assert s.value("gpujob_jobs", phase="Running", type=LORA) == 0
    assert s.value("gpujob_jobs", phase="Queued", type=LORA) == 1
    ep.metrics.record_progress(job_id="d1", job_type=LORA, percent=50)
    assert (await ep.scrape()).named("gpu_worker_progress_percent") == []
    # A job re-created with the same id is live again.
    ep.transition("d1", None, Phase.QUEUED, minutes(2))
    ep.metrics.record_progress(job_id="d1", job_type=LORA, percent=1)
    assert (await ep.scrape()).value("gpu_worker_progress_percent", job_id="d1", type=LORA) == 1


async def test_resync_seeds_live_jobs_without_counting(endpoint: Endpoint) -> None:
    ep = endpoint
    ep.clock.now = T0 + minutes(20)
    ep.metrics.resync(
        job_id="r1", namespace="ml", name="r1", job_type=LORA, phase=Phase.QUEUED, since=T0, ran=False
    )  # fmt: skip
    ep.metrics.resync(job_id="r2", namespace="ml", name="r2", job_type=LORA, phase=Phase.RUNNING, since=T0, ran=True)
    s = await ep.scrape()
    assert s.value("gpujob_pending_oldest_age_seconds") == 20 * 60
    assert s.value("gpujob_jobs", phase="Running", type=LORA) == 1
    ep.transition("r2", Phase.RUNNING, Phase.SUCCEEDED, minutes(21), started=minutes(1))
    ep.transition("r1", Phase.QUEUED, Phase.RUNNING, minutes(22))
    s = await ep.scrape()
    assert s.value("gpu_worker_jobs_total", type=LORA, status="succeeded") == 1
    assert s.value("gpujob_queue_wait_seconds_count", type=LORA) == 1
    assert s.value("gpujob_queue_wait_seconds_sum", type=LORA) == 22 * 60


async def test_stream_stats_are_read_at_scrape_time(endpoint: Endpoint) -> None:
    ep = endpoint
    stream_families = {"gpujob_stream_lag", "gpujob_stream_pending", "gpujob_requests_dead_lettered", "gpujob_requests"}
    assert not (await ep.scrape()).families & stream_families  # nothing registered

    current: list[StreamStatsSnapshot | None] = [None]
    ep.metrics.register_stream_stats(lambda: current[0])
    assert not (await ep.scrape()).families & stream_families  # bridge not running

    current[0] = StreamStatsSnapshot(
        lag=7, pending=2, dead_lettered_total={"invalid_json": 3, "schema": 1}, requests_total={"created": 10}
    )
    s = await ep.scrape()
    assert s.value("gpujob_stream_lag") == 7
    assert s.value("gpujob_stream_pending") == 2
    assert s.value("gpujob_requests_dead_lettered_total", reason="invalid_json") == 3
    assert s.value("gpujob_requests_dead_lettered_total", reason="schema") == 1
    assert s.value("gpujob_requests_total", outcome="created") == 10
    assert s.value("gpujob_requests_total", outcome="dead_lettered") == 0  # known outcomes always present
    assert s.value("gpujob_requests_total", outcome="duplicate") == 0

    current[0] = StreamStatsSnapshot(lag=None, pending=0)  # a Redis that can't report lag
    s = await ep.scrape()
    assert "gpujob_stream_lag" not in s.families
    assert s.value("gpujob_stream_pending") == 0

    def broken() -> StreamStatsSnapshot:
        raise ConnectionError("redis went away")

    ep.metrics.register_stream_stats(broken)
    s = await ep.scrape()
    assert s.status == 200 and not s.families & stream_families
    assert s.value("gpu_worker_jobs_total", type=LORA, status="failed") == 0


async def test_handler_errors_and_operator_info(endpoint: Endpoint) -> None:
    endpoint.metrics.handler_error("create")
    endpoint.metrics.handler_error("create")
    endpoint.metrics.handler_error("pod_event")
    s = await endpoint.scrape()
    assert s.value("gpujob_handler_errors_total", handler="create") == 2
    assert s.value("gpujob_handler_errors_total", handler="pod_event") == 1
    [(labels, value)] = s.named("gpujob_operator_info")
    assert value == 1 and labels["version"]


async def test_exposition_content_types(endpoint: Endpoint) -> None:
    s = await endpoint.scrape()
    assert s.content_type.startswith("text/plain") and "version=" in s.content_type
    assert "# TYPE gpu_worker_job_duration_seconds histogram" in s.text
    om = await endpoint.scrape(accept="application/openmetrics-text; version=1.0.0")
    assert om.content_type.startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")


async def test_healthz_and_readiness_flips(endpoint: Endpoint) -> None:
    ep = endpoint
    assert await ep.get_json("/healthz") == (200, {"alive": True})
    assert await ep.get_json("/readyz") == (200, {"ready": True, "checks": {}})

    state = {"kubernetes": True, "redis": True}

    async def kubernetes() -> bool:
        return state["kubernetes"]

    async def redis() -> bool:
        if not state["redis"]:
            raise ConnectionError("connection refused")
        return True

    ep.health.add_readiness_check("kubernetes", kubernetes)
    ep.health.add_readiness_check("redis", redis)
    assert await ep.get_json("/readyz") == (200, {"ready": True, "checks": {"kubernetes": True, "redis": True}})
    state["redis"] = False
    assert await ep.get_json("/readyz") == (503, {"ready": False, "checks": {"kubernetes": True, "redis": False}})
    state["kubernetes"] = False
    state["redis"] = True
    assert await ep.get_json("/readyz") == (503, {"ready": False, "checks": {"kubernetes": False, "redis": True}})
    state["kubernetes"] = True
    assert (await ep.get_json("/readyz"))[0] == 200
    assert (await ep.get_json("/healthz"))[0] == 200  # liveness never depends on dependencies


async def test_a_hanging_check_is_not_ready(endpoint: Endpoint) -> None:
    endpoint.health.readiness_timeout = 0.2
    release = asyncio.Event()

    async def hangs() -> bool:
        await release.wait()
        return True

    endpoint.health.add_readiness_check("kubernetes", hangs)
    assert await endpoint.get_json("/readyz") == (503, {"ready": False, "checks": {"kubernetes": False}})
    release.set()
    assert (await endpoint.get_json("/readyz"))[0] == 200


async def test_instances_are_separate_and_not_global() -> None:
    a, b = Metrics(), Metrics()
    a.handler_error("x")
    assert a.registry.get_sample_value("gpujob_handler_errors_total", {"handler": "x"}) == 1
    assert b.registry.get_sample_value("gpujob_handler_errors_total", {"handler": "x"}) is None
    assert isinstance(a.registry, CollectorRegistry) and a.registry is not GLOBAL_REGISTRY
    assert GLOBAL_REGISTRY.get_sample_value("gpu_worker_jobs_total", {"type": LORA, "status": "failed"}) is None


async def test_one_server_for_metrics_and_health() -> None:
    """The server the operator runs: one injected Metrics (no module-level instance) and one Health, on one port."""
    m, h = Metrics(), Health()
    job = "one-server-job"
    m.record_transition(
        job_id=job, namespace="ml", name=job, job_type=LORA, old=None, new=Phase.QUEUED, reason=None,
        created_at=T0, transition_at=T0, started_at=None,
    )  # fmt: skip
    m.record_progress(job_id=job, job_type=LORA, percent=33)
    m.handler_error("one-server")
    m.register_stream_stats(lambda: StreamStatsSnapshot(lag=1, pending=0))

    async def ok() -> bool:
        return True

    h.add_readiness_check("kubernetes", ok)
    runner = await health.serve(h, m.registry, 0, "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{bound_port(runner)}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
            async with session.get(f"{url}/readyz") as response:
                assert response.status == 200
            h.remove_readiness_check("kubernetes")
            h.add_readiness_check("watchers", lambda: asyncio.sleep(0, result=False))
            async with session.get(f"{url}/readyz") as response:
                assert response.status == 503
        assert f'gpu_worker_progress_percent{{job_id="{job}",type="{LORA}"}} 33.0' in text
        assert 'gpujob_handler_errors_total{handler="one-server"} 1.0' in text
        assert "gpujob_stream_lag 1.0" in text
    finally:
        await runner.cleanup()
    m.forget(job)
    assert m.registry.get_sample_value("gpu_worker_progress_percent", {"job_id": job, "type": LORA}) is None


def exported_sample_names(registry: CollectorRegistry) -> set[str]:
    return {sample.name for family in registry.collect() for sample in family.samples}


def exercised_metrics() -> Metrics:
    """A Metrics instance with every family populated (used by tests/integration/test_rules.py too)."""
    m = Metrics()
    stamps: Iterable[tuple[Phase | None, Phase]] = [
        (None, Phase.QUEUED),
        (Phase.QUEUED, Phase.SCHEDULED),
        (Phase.SCHEDULED, Phase.RUNNING),
        (Phase.RUNNING, Phase.RETRYING),
        (Phase.RETRYING, Phase.RUNNING),
        (Phase.RUNNING, Phase.FAILED),
    ]
    for i, (old, new) in enumerate(stamps):
        m.record_transition(
            job_id="x", namespace="ml", name="x", job_type=LORA, old=old, new=new, reason=Reason.ERROR,
            created_at=T0, transition_at=T0 + minutes(i), started_at=T0,
        )  # fmt: skip
    m.record_transition(
        job_id="y", namespace="ml", name="y", job_type=LORA, old=None, new=Phase.RUNNING, reason=None,
        created_at=T0, transition_at=T0, started_at=T0,
    )  # fmt: skip
    m.record_progress(job_id="y", job_type=LORA, percent=5)
    m.handler_error("create")
    m.register_stream_stats(
        lambda: StreamStatsSnapshot(
            lag=1,
            pending=1,
            dead_lettered_total={"invalid": 1},
            requests_total={"created": 1, "dead_lettered": 1},
            redis_up=True,
        )
    )
    m.queue_seen("renders")
    m.queue_admitted("renders", 42.0)
    m.queue_preempted("renders")
    m.queue_fallback("renders")
    m.register_queue_stats(lambda: {"renders": RENDERS})
    return m


RENDERS = QueueStats(
    quota={"nvidia.com/gpu": 2.0},
    usage={"nvidia.com/gpu": 3.0},
    borrowed={"nvidia.com/gpu": 1.0},
    pending=4,
    admitted=3,
    oldest_pending_since=datetime.now(UTC) - timedelta(minutes=5),
)


def test_every_family_is_exported_once_exercised() -> None:
    names = exported_sample_names(exercised_metrics().registry)
    for name in [
        "gpu_worker_jobs_total",
        "gpu_worker_job_duration_seconds_bucket",
        "gpu_worker_job_errors_total",
        "gpu_worker_progress_percent",
        "gpujob_jobs",
        "gpujob_queue_wait_seconds_bucket",
        "gpujob_pending_oldest_age_seconds",
        "gpujob_phase_age_seconds_count",
        "gpujob_phase_age_seconds_max",
        "gpujob_retries_total",
        "gpujob_handler_errors_total",
        "gpujob_stream_lag",
        "gpujob_stream_pending",
        "gpujob_requests_dead_lettered_total",
        "gpujob_requests_total",
        "gpujob_operator_info",
        "gpujob_queue_pending_jobs",
        "gpujob_queue_admitted_jobs",
        "gpujob_queue_oldest_pending_age_seconds",
        "gpujob_queue_quota",
        "gpujob_queue_usage",
        "gpujob_queue_borrowed",
        "gpujob_queue_admissions_total",
        "gpujob_queue_preemptions_total",
        "gpujob_queue_fallbacks_total",
        "gpujob_queue_admission_wait_seconds_bucket",
    ]:
        assert name in names, name


def test_queue_figures_per_queue_and_series_from_the_start() -> None:
    m = Metrics(clock=lambda: T0)
    m.queue_seen("idle")  # a queue with no admission yet: its counters exist at 0 (increase() sees the first)
    m.register_queue_stats(
        lambda: {
            "idle": QueueStats(quota={"nvidia.com/gpu": 1.0}),
            "renders": replace(RENDERS, oldest_pending_since=T0 - timedelta(seconds=90)),
        }
    )
    m.queue_admitted("renders", 30.0)
    m.queue_preempted("renders")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in m.registry.collect() for s in f.samples}
    assert samples[("gpujob_queue_admissions_total", (("queue", "idle"),))] == 0
    assert samples[("gpujob_queue_admissions_total", (("queue", "renders"),))] == 1
    assert samples[("gpujob_queue_preemptions_total", (("queue", "renders"),))] == 1
    assert samples[("gpujob_queue_fallbacks_total", (("queue", "idle"),))] == 0
    assert samples[("gpujob_queue_admission_wait_seconds_count", (("queue", "renders"),))] == 1
    assert samples[("gpujob_queue_pending_jobs", (("queue", "renders"),))] == 4
    assert samples[("gpujob_queue_oldest_pending_age_seconds", (("queue", "renders"),))] == 90
    assert samples[("gpujob_queue_oldest_pending_age_seconds", (("queue", "idle"),))] == 0
    gpu = (("queue", "renders"), ("resource", "nvidia.com/gpu"))
    assert [samples[(n, gpu)] for n in ("gpujob_queue_quota", "gpujob_queue_usage", "gpujob_queue_borrowed")] == [
        2,
        3,
        1,
    ]
    m.queue_gone("idle")
    assert not [
        s for f in m.registry.collect() for s in f.samples if s.labels.get("queue") == "idle" and "total" in s.name
    ]


async def test_readiness_follows_the_operator_watchers() -> None:
    """The operator's `kubernetes` check is ready only while kopf's watchers run (a live `watcher for ...` task
    per resource), after start-up succeeded and before stop: never while start-up is still being retried."""
    from gpujob.operator.runtime import Runtime, pod_defaults
    from gpujob.settings import Settings

    settings = Settings()
    runtime = Runtime(settings, None, pod_defaults(settings, {}), Metrics(), Health())
    assert not runtime.watching()
    runtime.started.set()  # kopf's ready flag: start-up succeeded, watchers about to start
    assert not runtime.watching()

    async def watch() -> None:
        await asyncio.Event().wait()

    pods = asyncio.create_task(watch(), name="watcher for pods.v1@default")
    jobs = asyncio.create_task(watch(), name="watcher for gpujobs.v1alpha1.gpujob.dev@default")
    await asyncio.sleep(0)
    assert runtime.watching()
    pods.cancel()
    await asyncio.gather(pods, return_exceptions=True)
    assert not runtime.watching()  # one watcher gone: not ready
    pods = asyncio.create_task(watch(), name="watcher for pods.v1@default")
    await asyncio.sleep(0)
    assert runtime.watching()
    runtime.stopping.set()
    assert not runtime.watching()
    for task in (pods, jobs):
        task.cancel()
    await asyncio.gather(pods, jobs, return_exceptions=True)
    await runtime.reconciler.close()
