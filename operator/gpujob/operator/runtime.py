"""Everything one operator process runs beside kopf's watchers, built from settings and started once.

The entry point hands in what the runtime reports to (the `Metrics` and the `Health` the HTTP server serves) and
the services it runs (the stream bridge); the runtime imports none of them by name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Final

import redis.asyncio

from gpujob import kube
from gpujob.api.constants import GROUP, MANAGER, PLURAL, VERSION, Label, Phase, Reason
from gpujob.api.models import GpuJobStatus, Progress
from gpujob.api.naming import job_id_of
from gpujob.events import EventPublisher, async_client
from gpujob.gpu_efficiency import gpu_efficiency
from gpujob.health import Health
from gpujob.logging import bind_job, get_logger
from gpujob.metrics import Metrics
from gpujob.operator.audit import CacheAudit
from gpujob.operator.builders import PodDefaults
from gpujob.operator.cache import JobKey, Store
from gpujob.operator.conventions import parse_time
from gpujob.operator.credentials import JobCredentials
from gpujob.operator.kevents import EventRecorder
from gpujob.operator.pause import Pause, replica_identity
from gpujob.operator.progress import EventForwarder, ProgressMirror
from gpujob.operator.queues import QueueManager
from gpujob.operator.reconciler import Reconciler, utcnow
from gpujob.operator.status import Transition
from gpujob.settings import Settings

log = get_logger(__name__)

POD_SELECTOR = f"{Label.MANAGED_BY}={MANAGER}"
# kopf names each watcher task `watcher for <plural.version.group>@<namespace>` (kopf 1.45, orchestration.py):
# the operator is watching when there is a live one for each resource it handles.
WATCHER_TASKS: Final = ("watcher for pods.v1@", f"watcher for {PLURAL}.{VERSION}.{GROUP}@")
# The start-up Pod list is retried until it succeeds (a 403 while RBAC settles, 5xx), backing off up to this.
STARTUP_RETRY_CAP_SECONDS: Final = 10.0

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
        image_pull_secrets=tuple(settings.image_pull_secrets),
        node_selector=dict(settings.job_node_selector),
        tolerations=tuple(t.wire() for t in settings.job_tolerations),
        priority_class_name=settings.job_priority_class_name or None,
    )


async def write_progress(key: JobKey, progress: Progress) -> None:
    await kube.patch_gpujob(*key, {"status": {"progress": progress.wire()}}, status=True)


@dataclass
class Runtime:
    settings: Settings
    namespaces: list[str] | None  # None = all namespaces
    defaults: PodDefaults
    metrics: Metrics
    health: Health
    store: Store = field(default_factory=Store)
    reconciler: Reconciler = field(init=False)
    queues: QueueManager = field(init=False)
    redis: redis.asyncio.Redis | None = None
    forwarder: EventForwarder | None = None
    mirror: ProgressMirror | None = None
    pause: Pause | None = None  # HA: this replica's kopf peering pause (gpujob.operator.pause)
    audit: CacheAudit | None = None  # the cache checked against the API (gpujob.operator.audit)
    credentials: JobCredentials | None = None  # per-job credentials, when on (gpujob.operator.credentials)
    services: dict[str, RedisService] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Raised by kopf (its `ready_flag`) once the start-up handler has succeeded and its watchers may start.
    started: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _announced: bool = False
    # Kubernetes Events about GpuJobs (reportingInstance: this operator's Pod, as the chart's POD_ID names it).
    recorder: EventRecorder = field(
        default_factory=lambda: EventRecorder(os.environ.get("POD_ID") or socket.gethostname())
    )

    def __post_init__(self) -> None:
        self.reconciler = Reconciler(self.store, self.defaults, on_error=self.metrics.handler_error)
        self.queues = QueueManager(
            self.store,
            self.spawn_reconcile,
            exact_positions=self.settings.queue_exact_positions,
            event_interval=self.settings.queue_event_interval,
            metrics=self.metrics,
        )
        self.metrics.register_queue_stats(self.queues.queue_stats)
        self.reconciler.gate_of = self.queues.gate
        self.reconciler.on_gone = self.job_gone
        self.reconciler.observers.append(lambda stored, _: self.queues.job_changed(stored))
        self.reconciler.observers.append(self.recorder.observe)
        self.reconciler.sinks.append(self.record_metrics)
        if self.settings.prometheus_url:
            self.reconciler.sinks.append(self.record_gpu_efficiency)
        # Ready only while the watchers run: before start-up has succeeded (it is retried) the operator does
        # nothing, and after they stop it does nothing either, whatever the API server answers.
        self.health.add_readiness_check("kubernetes", self._kubernetes_ready)

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(_log_crash)
        task.add_done_callback(self._forget_task)
        self._tasks.append(task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    def watch_pause(self, peering: str, priority: int) -> None:
        """HA (kopf peering): follow this replica's pause; while paused no pass runs, no timer acts, the progress
        mirror and the queue manager write nothing. On resume every job is passed again (kopf relists too)."""
        if self.pause is not None:
            return
        self.pause = Pause(peering, replica_identity(), priority, self.namespaces)
        self.pause.on_resume.append(self._resumed)
        self.reconciler.paused = self.pause.active
        self.queues.paused = self.pause.active

    def _resumed(self) -> None:
        self.reconciler.resume(list(self.store.jobs))
        self.queues.poke()

    async def start(self) -> None:
        """kopf's start-up handler: safe to run again if kopf retries it (nothing here is started twice)."""
        # Before kopf resolves its resources (its watchers start after this startup handler).
        await kube.wait_for_discovery({"v1": "pods", f"{GROUP}/{VERSION}": PLURAL})
        await self._list_pods()
        await self._list_queues()
        if not any(task.get_name() == "kubernetes-events" for task in self._tasks):
            self.spawn("kubernetes-events", self.recorder.run())
        if self.pause is not None and not any(task.get_name() == "pause" for task in self._tasks):
            self.spawn("pause", self.pause.run(self.stopping))
        if not any(task.get_name() == "queues" for task in self._tasks):
            self.spawn("queues", self.queues.run())
        if self.settings.cache_audit_seconds > 0 and not any(t.get_name() == "cache-audit" for t in self._tasks):
            self.audit = CacheAudit(self.store, self.namespaces, POD_SELECTOR, self.job_gone, self.pod_gone)
            self.spawn("cache-audit", self.audit.run(self.settings.cache_audit_seconds, self.stopping))
        if self.settings.redis_url is not None and self.redis is None:
            self.redis = async_client(self.settings)
            self.health.add_readiness_check("redis", self._redis_ping)
            self.forwarder = EventForwarder(EventPublisher(self.redis, self.settings))
            self.reconciler.sinks.append(self.forwarder.sink)
            self.queues.publish = self.forwarder.submit  # queue positions of waiting jobs
            self.spawn("events", self.forwarder.run())
            self.mirror = ProgressMirror(
                self.redis,
                self.settings.progress_channel_prefix,
                self.store,
                write_progress,
                interval=self.settings.status_progress_interval,
                on_progress=self._on_progress,
            )
            if self.pause is not None:
                self.mirror.paused = self.pause.active
            self.spawn("progress-mirror", self.mirror.run())
            for name, service in self.services.items():
                self.spawn(name, service(self.redis, self.stopping))
        await self._setup_credentials()
        if not self._announced:
            self._announced = True
            self.spawn("announce", self.announce())

    async def _setup_credentials(self) -> None:
        """Per-job credentials (GPUJOB_CREDENTIALS_MODE): before the first reconcile, so no Pod is made without
        them; with them, job Pods get their own Secret and never GPUJOB_WORKER_SECRET."""
        if self.credentials is not None or self.settings.credentials_mode == "off":
            return
        self.credentials = await JobCredentials.setup(self.settings, self.redis, self.namespaces)
        if self.credentials is None:
            return
        if self.pause is not None:
            self.credentials.paused = self.pause.active
        self.reconciler.defaults = replace(self.reconciler.defaults, worker_secret=None)
        self.reconciler.issue_credentials = self.credentials.issue
        self.reconciler.sinks.append(self.credentials.sink)
        self.spawn("credentials", self.credentials.run(self._job_by_uid, self.stopping))

    def _job_by_uid(self, uid: str) -> dict[str, Any] | None:
        key = self.store.key_of_uid(uid)
        return self.store.job(key) if key is not None else None

    def _on_progress(self, job_id: str, job_type: str, percent: float) -> None:
        self.metrics.record_progress(job_id=job_id, job_type=job_type, percent=percent)
        if self.credentials is not None:  # the worker's events are in its own stream: relay them
            self.credentials.relay_soon(job_id)

    async def _list_pods(self) -> None:
        """Know every Pod before the first reconcile, so a Pod not yet seen is never taken for a deleted one.
        Page by page (each page retried on its own), so 10,000 full Pod bodies are never held at once; the whole
        list is retried until it succeeds (filing a Pod twice is harmless)."""

        async def file_pods() -> None:
            async for page in kube.list_pods(self.namespaces, POD_SELECTOR):
                for pod in page:
                    self.store.put_pod(pod)

        await until_done("start-up pod list", file_pods)

    async def _list_queues(self) -> None:
        """Know every GpuQueue before the first reconcile (retried as the Pod list is)."""
        await until_done("start-up queue list", lambda: self.queues.list_queues(self.namespaces))

    def watching(self) -> bool:
        """kopf's watchers run: start-up has succeeded, the operator is not stopping, and there is a live
        watcher task for each resource the operator handles."""
        if not self.started.is_set() or self.stopping.is_set():
            return False
        live = [task.get_name() for task in asyncio.all_tasks() if not task.done()]
        return all(any(name.startswith(prefix) for name in live) for prefix in WATCHER_TASKS)

    async def announce(self) -> None:
        """Log "operator started" (what tests and benchmarks wait for) once the watchers run, i.e. once /readyz
        can say ready: kopf starts them only after the start-up handler has returned."""
        await self.started.wait()
        while True:  # kopf's watcher tasks appear a moment later and offer nothing to wait on
            if self.watching():
                break
            await asyncio.sleep(0.05)
        log.info("operator started", namespaces=self.namespaces or "*", jobs_pods=len(self.store.pods))

    async def _kubernetes_ready(self) -> bool:
        return self.watching() and await kube.ping()

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
        await kube.close()

    async def _redis_ping(self) -> bool:
        return self.redis is not None and bool(await self.redis.ping())

    # --- what happens after a status write with phase transitions
    async def record_metrics(self, job: dict[str, Any], transitions: list[Transition], status: GpuJobStatus) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        created = parse_time(meta.get("creationTimestamp")) or utcnow()
        for t in transitions:
            self.metrics.record_transition(
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
            if t.new is Phase.SCHEDULED and t.reason == Reason.CPU_FALLBACK and spec.get("queue"):
                self.metrics.queue_fallback(str(spec["queue"]))  # its queue could not give it a GPU in time

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

        with bind_job(job_id_of(job)):  # the task's lines (and its crash) carry the job
            self.spawn(f"gpu-efficiency-{key[1]}", query())

    # --- watch events
    def job_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        self._listed(event_type)
        meta = body.get("metadata") or {}
        key: JobKey = (meta.get("namespace", ""), meta.get("name", ""))
        if event_type == "DELETED":
            held = self.store.job(key)
            # Only that GpuJob: kopf orders events per uid, so an earlier GpuJob's DELETED may come after the
            # ADDED of its successor under the same name, which keeps its cache entry, timers and mirror.
            if self.store.drop_job(key, meta.get("uid")):
                if held is not None:
                    self.metrics.forget(job_id_of(held))
                self.reconciler.forget(key)
                if self.mirror is not None:
                    self.mirror.forget(key)
            self.queues.job_changed(body)
            if self.credentials is not None:  # its Secret goes with it (owner reference); its users here
                self.spawn(f"revoke-credentials-{key[1]}", self.credentials.revoke(body))
            return
        if self.store.holds_job(body):
            # The echo of our own status write: that state has been decided on already (decide() is a fixed
            # point, or the pass set a timer), so another pass would only cost CPU.
            return
        if self.store.job(key) is None:
            self._resync_metrics(body)
        self.store.put_job(body)
        self.queues.job_changed(body)
        self.spawn_reconcile(key)

    def job_gone(self, body: dict[str, Any]) -> None:
        """A GpuJob the API no longer has (a 404 on its status write, or the cache audit): as if DELETED came."""
        self.job_event("DELETED", body)

    def pod_gone(self, body: dict[str, Any]) -> None:
        self.pod_event("DELETED", body)

    def queue_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        self.queues.queue_event(event_type, body)

    def _listed(self, event_type: str | None) -> None:
        """kopf sends what a (re)list found as events of type None; a relist follows a watch gap, whose deletions
        no event will ever tell: the cache audit checks soon (once the listing is over)."""
        if event_type is None and self.audit is not None:
            self.audit.soon()

    def pod_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        self._listed(event_type)
        if event_type != "DELETED" and self.store.holds_pod(body):
            return  # our own create, or filed by the start-up list: nothing new for the job
        uid = self.store.drop_pod(body) if event_type == "DELETED" else self.store.put_pod(body)
        if event_type == "DELETED" and uid:
            self.reconciler.quota_freed((body.get("metadata") or {}).get("namespace", ""))
        key = self.store.key_of_uid(uid) if uid else None
        if key is not None:
            self.spawn_reconcile(key)

    def _resync_metrics(self, body: dict[str, Any]) -> None:
        """A job first seen with a phase already (an operator restart): seed the live gauges, count nothing."""
        meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
        if not status.get("phase"):
            return
        since = parse_time(status.get("startTime")) or parse_time(meta.get("creationTimestamp")) or utcnow()
        self.metrics.resync(
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
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task crashed", task=task.get_name(), error=repr(exc), exc_info=exc)


async def until_done(what: str, call: Callable[[], Awaitable[None]]) -> None:
    """`call()` until it succeeds, logging each failure and backing off up to STARTUP_RETRY_CAP_SECONDS."""
    delay = 0.5
    while True:
        try:
            await call()
        except Exception as exc:
            log.warning("start-up step failed, retrying", step=what, error=kube.message_of(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(STARTUP_RETRY_CAP_SECONDS, delay * 2)
        else:
            return
