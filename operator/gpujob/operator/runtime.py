"""Everything one operator process runs beside kopf's watchers, built from settings and started once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
from aiohttp import web

from gpujob import kube, metrics
from gpujob.api.constants import GROUP, MANAGER, PLURAL, VERSION, Label, Phase
from gpujob.api.models import GpuJobStatus, Progress
from gpujob.api.naming import job_id_of
from gpujob.events import EventPublisher, async_client
from gpujob.gpu_efficiency import gpu_efficiency
from gpujob.operator.builders import PodDefaults
from gpujob.operator.cache import JobKey, Store
from gpujob.operator.conventions import parse_time
from gpujob.operator.progress import EventForwarder, ProgressMirror
from gpujob.operator.reconciler import Reconciler, utcnow
from gpujob.operator.status import Transition
from gpujob.settings import Settings

log = logging.getLogger("gpujob.runtime")

POD_SELECTOR = f"{Label.MANAGED_BY}={MANAGER}"

# A service the entry point hands in (the stream bridge): started with the shared Redis client once it is
# connected, it runs until the event is set. The operator does not know what it is.
RedisService = Callable[["redis.asyncio.Redis", asyncio.Event], Coroutine[Any, Any, None]]


def pod_defaults(settings: Settings, environ: dict[str, str]) -> PodDefaults:
    passthrough = {name: environ[name] for name in settings.worker_env_passthrough if name in environ}
    return PodDefaults(
        worker_image=settings.worker_image,
        worker_command=tuple(settings.worker_command),
        image_pull_policy=settings.image_pull_policy,
        models_pvc=settings.models_pvc,
        worker_secret=settings.worker_secret or None,
        run_as_user=settings.pod_run_as_user,
        service_account=settings.worker_service_account,
        passthrough_env=passthrough,
    )


async def write_progress(key: JobKey, progress: Progress) -> None:
    await kube.patch_gpujob(*key, {"status": {"progress": progress.wire()}}, status=True)


@dataclass
class Runtime:
    settings: Settings
    namespaces: list[str] | None  # None = all namespaces
    defaults: PodDefaults
    store: Store = field(default_factory=Store)
    reconciler: Reconciler = field(init=False)
    redis: redis.asyncio.Redis | None = None
    forwarder: EventForwarder | None = None
    mirror: ProgressMirror | None = None
    http: web.AppRunner | None = None
    services: dict[str, RedisService] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reconciler = Reconciler(self.store, self.defaults, on_error=metrics.handler_error)
        self.reconciler.sinks.append(self.record_metrics)
        if self.settings.prometheus_url:
            self.reconciler.sinks.append(self.record_gpu_efficiency)

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(_log_crash)
        task.add_done_callback(self._forget_task)
        self._tasks.append(task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    async def start(self) -> None:
        metrics.add_readiness_check("kubernetes", kube.ping)
        self.http = await metrics.METRICS.start_http_server(self.settings.metrics_port)
        # Before kopf resolves its resources (its watchers start after this startup handler).
        await kube.wait_for_discovery({"v1": "pods", f"{GROUP}/{VERSION}": PLURAL})
        # Know every Pod before the first reconcile, so a Pod not yet seen is never taken for a deleted one.
        # Page by page (each page retried on its own), so 10,000 full Pod bodies are never held at once.
        async for page in kube.list_pods(self.namespaces, POD_SELECTOR):
            for pod in page:
                self.store.put_pod(pod)
        if self.settings.redis_url is not None:
            self.redis = async_client(self.settings)
            metrics.add_readiness_check("redis", self._redis_ping)
            self.forwarder = EventForwarder(EventPublisher(self.redis, self.settings))
            self.reconciler.sinks.append(self.forwarder.sink)
            self.spawn("events", self.forwarder.run())
            self.mirror = ProgressMirror(
                self.redis,
                self.settings.progress_channel_prefix,
                self.store,
                write_progress,
                interval=self.settings.status_progress_interval,
                on_progress=lambda job_id, job_type, percent: metrics.record_progress(
                    job_id=job_id, job_type=job_type, percent=percent
                ),
            )
            self.spawn("progress-mirror", self.mirror.run())
            for name, service in self.services.items():
                self.spawn(name, service(self.redis, self.stopping))

    async def stop(self) -> None:
        self.stopping.set()
        await self.reconciler.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.redis is not None:
            await self.redis.aclose()
        if self.http is not None:
            await self.http.cleanup()
        await kube.close()

    async def _redis_ping(self) -> bool:
        return self.redis is not None and bool(await self.redis.ping())

    # --- what happens after a status write with phase transitions
    async def record_metrics(self, job: dict[str, Any], transitions: list[Transition], status: GpuJobStatus) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        created = parse_time(meta.get("creationTimestamp")) or utcnow()
        for t in transitions:
            metrics.record_transition(
                job_id=job_id_of(job),
                namespace=meta.get("namespace", ""),
                name=meta["name"],
                job_type=str(spec.get("type", "")),
                old=t.old,
                new=t.new,
                reason=t.reason,
                created_at=created,
                transition_at=utcnow(),
                started_at=parse_time(status.start_time),
            )

    async def record_gpu_efficiency(
        self, job: dict[str, Any], transitions: list[Transition], status: GpuJobStatus
    ) -> None:
        """Once per finished job: mean GPU utilisation and peak memory from DCGM, into status.metrics."""
        if not any(t.new.terminal for t in transitions) or not status.pod_name:
            return
        if not (job.get("spec") or {}).get("gpus", 1):
            return
        key: JobKey = (job["metadata"].get("namespace", ""), job["metadata"]["name"])
        start = parse_time(status.start_time)
        end = parse_time(status.completion_time) or utcnow()
        url = self.settings.prometheus_url or ""

        async def query() -> None:
            found = await gpu_efficiency(url, key[0], status.pod_name or "", start or end, end)
            if found:
                await kube.patch_gpujob(*key, {"status": {"metrics": {**status.metrics, **found}}}, status=True)

        self.spawn(f"gpu-efficiency-{key[1]}", query())

    # --- watch events
    def job_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key: JobKey = (meta.get("namespace", ""), meta.get("name", ""))
        if event_type == "DELETED":
            held = self.store.job(key)
            if held is not None:
                metrics.forget(job_id_of(held))
            self.store.drop_job(key)
            self.reconciler.forget(key)
            if self.mirror is not None:
                self.mirror.forget(key)
            return
        if self.store.holds_job(body):
            # The echo of our own status write: that state has been decided on already (decide() is a fixed
            # point, or the pass set a timer), so another pass would only cost CPU.
            return
        if self.store.job(key) is None:
            self._resync_metrics(body)
        self.store.put_job(body)
        self.spawn_reconcile(key)

    def pod_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        if event_type != "DELETED" and self.store.holds_pod(body):
            return  # our own create, or filed by the start-up list: nothing new for the job
        uid = self.store.drop_pod(body) if event_type == "DELETED" else self.store.put_pod(body)
        key = self.store.key_of_uid(uid) if uid else None
        if key is not None:
            self.spawn_reconcile(key)

    def _resync_metrics(self, body: dict[str, Any]) -> None:
        """A job first seen with a phase already (an operator restart): seed the live gauges, count nothing."""
        meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
        if not status.get("phase"):
            return
        since = parse_time(status.get("startTime")) or parse_time(meta.get("creationTimestamp")) or utcnow()
        metrics.resync(
            job_id=job_id_of(body),
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            job_type=str(spec.get("type", "")),
            phase=Phase(status["phase"]),
            since=since,
            ran=bool(status.get("startTime")),
        )

    def spawn_reconcile(self, key: JobKey) -> None:
        self.reconciler.trigger_soon(key, 0.0)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s crashed: %r", task.get_name(), task.exception())
