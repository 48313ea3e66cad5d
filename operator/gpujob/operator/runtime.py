"""Everything one operator process runs beside kopf's watchers, built from settings and started once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio

from gpujob.api.constants import MANAGER, Label
from gpujob.api.models import Progress
from gpujob.bridge.events import EventPublisher, async_client
from gpujob.operator import k8s
from gpujob.operator.builders import PodDefaults
from gpujob.operator.cache import JobKey, Store
from gpujob.operator.progress import EventForwarder, ProgressMirror
from gpujob.operator.reconciler import Reconciler
from gpujob.settings import Settings

log = logging.getLogger("gpujob.runtime")

POD_SELECTOR = f"{Label.MANAGED_BY}={MANAGER}"


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
    await k8s.patch_gpujob(*key, {"status": {"progress": progress.wire()}}, status=True)


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
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reconciler = Reconciler(self.store, self.defaults)

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        task.add_done_callback(_log_crash)
        self._tasks.append(task)

    async def start(self) -> None:
        # Know every Pod before the first reconcile, so a Pod not yet seen is never taken for a deleted one.
        for pod in await k8s.list_pods(self.namespaces, POD_SELECTOR):
            self.store.put_pod(pod)
        if self.settings.redis_url is not None:
            self.redis = async_client(self.settings)
            self.forwarder = EventForwarder(EventPublisher(self.redis, self.settings))
            self.reconciler.sinks.append(self.forwarder.sink)
            self.spawn("events", self.forwarder.run())
            self.mirror = ProgressMirror(
                self.redis,
                self.settings.progress_channel_prefix,
                self.store,
                write_progress,
                interval=self.settings.status_progress_interval,
            )
            self.spawn("progress-mirror", self.mirror.run())

    async def stop(self) -> None:
        await self.reconciler.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.redis is not None:
            await self.redis.aclose()
        await k8s.close()

    # --- watch events
    def job_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key: JobKey = (meta.get("namespace", ""), meta.get("name", ""))
        if event_type == "DELETED":
            self.store.drop_job(key)
            self.reconciler.forget(key)
            if self.mirror is not None:
                self.mirror.forget(key)
            return
        self.store.put_job(body)
        self.spawn_reconcile(key)

    def pod_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid = self.store.drop_pod(body) if event_type == "DELETED" else self.store.put_pod(body)
        key = self.store.key_of_uid(uid) if uid else None
        if key is not None:
            self.spawn_reconcile(key)

    def spawn_reconcile(self, key: JobKey) -> None:
        self.reconciler.trigger_soon(key, 0.0)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s crashed: %r", task.get_name(), task.exception())
