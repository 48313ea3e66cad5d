"""Level-triggered reconcile of one GpuJob: observe (cache) -> decide (pure) -> act (API) -> write status once.

Every trigger (GpuJob event, Pod event, timer) funnels into `Reconciler.trigger(key)`. Passes of one job are
serialised by a per-job lock; different jobs run concurrently. Failures are retried with a capped
exponential back-off and a capped count: no loop here retries forever (the next watch event re-triggers).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gpujob import kube
from gpujob.api.constants import Reason
from gpujob.api.models import GpuJobSpec, GpuJobStatus
from gpujob.api.naming import job_id_of
from gpujob.kube import ApiException
from gpujob.logging import bind_job, get_logger
from gpujob.operator.builders import JobRef, PodDefaults, build_pod
from gpujob.operator.cache import JobKey, Store
from gpujob.operator.credentials import CredentialsRefused
from gpujob.operator.status import (
    Decision,
    QueueGate,
    Transition,
    decide,
    fail_now,
    status_patch,
    wait_for_quota,
    without_worker_output,
)

log = get_logger("gpujob.reconciler")

TransitionSink = Callable[[dict[str, Any], list[Transition], GpuJobStatus], Awaitable[None]]
# Told of every status write (the job as stored, the pass's decision); must not block (Kubernetes Events).
WriteObserver = Callable[[dict[str, Any], Decision], None]
ErrorSink = Callable[[str], None]
# The queue manager's word on a job (None: admitted at once); see gpujob.operator.queues.
GateSource = Callable[[JobKey, GpuJobSpec], QueueGate | None]
# Makes an attempt's per-job credentials and returns their Secret's name (None: none); see gpujob.operator.credentials.
CredentialIssuer = Callable[[dict[str, Any], GpuJobSpec, datetime], Awaitable[str | None]]

# A job is never abandoned: a failing reconcile is retried for as long as it fails, backing off exponentially up
# to this cap (the Job controller's rate-limited queue does the same, capped at 1000 s); each failure counts in
# gpujob_handler_errors_total{handler="reconcile"}.
MAX_ERROR_DELAY = 300.0
# A job whose Pod a ResourceQuota refuses waits (phase Queued, reason QuotaExceeded) and tries again after
# 1, 2, 4, ... seconds up to this cap, and at once when a Pod of ours in its namespace goes (quota freed).
MAX_QUOTA_DELAY = 60.0


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Reconciler:
    store: Store
    defaults: PodDefaults
    sinks: list[TransitionSink] = field(default_factory=list)
    on_error: ErrorSink | None = None
    observers: list[WriteObserver] = field(default_factory=list)
    clock: Callable[[], datetime] = utcnow
    gate_of: GateSource | None = None
    issue_credentials: CredentialIssuer | None = None
    # Told of a GpuJob found gone (a 404 on its status write or re-read): the cache may hold it after a watch gap.
    on_gone: Callable[[dict[str, Any]], None] | None = None
    _locks: dict[JobKey, asyncio.Lock] = field(default_factory=dict)
    _timers: dict[JobKey, asyncio.TimerHandle] = field(default_factory=dict)
    _errors: dict[JobKey, int] = field(default_factory=dict)
    _over_quota: dict[JobKey, int] = field(default_factory=dict)  # jobs a ResourceQuota refused: tries so far
    # True while this replica is paused by kopf's peering (gpujob.operator.pause): no pass runs, so no write,
    # whatever fires (a watch event, a pending-timeout, retry or TTL timer); resume() passes them again.
    paused: Callable[[], bool] | None = None
    _deferred: set[JobKey] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # --- triggers
    def trigger_soon(self, key: JobKey, delay: float) -> None:
        """Reconcile `key` after `delay` seconds; an earlier pending timer wins (requeue-after semantics)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        held = self._timers.get(key)
        if held is not None and not held.cancelled() and held.when() <= when:
            return
        if held is not None:
            held.cancel()
        # A fresh context: the caller's (a kopf handler's) holds kopf's cause, i.e. the whole watched body,
        # and a timer keeps its context alive until it fires (minutes for every pending job).
        self._timers[key] = loop.call_at(when, self._fire, key, context=contextvars.Context())

    def _fire(self, key: JobKey) -> None:
        self._timers.pop(key, None)
        task = asyncio.get_running_loop().create_task(self.trigger(key), context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def failing(self) -> int:
        """Jobs whose last reconcile failed (each is retried with back-off until it succeeds)."""
        return len(self._errors)

    def forget(self, key: JobKey) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._locks.pop(key, None)
        self._errors.pop(key, None)
        self._over_quota.pop(key, None)
        self._deferred.discard(key)

    def quota_freed(self, namespace: str) -> None:
        """A Pod of ours in `namespace` is gone: the jobs its ResourceQuota refused try again now."""
        for key in [k for k in self._over_quota if k[0] == namespace]:
            self.trigger_soon(key, 0.0)

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def resume(self, keys: list[JobKey]) -> None:
        """The pause is over: pass `keys` (every job the cache holds) and those deferred while paused again."""
        for key in {*keys, *self._deferred}:
            self.trigger_soon(key, 0.0)
        self._deferred.clear()

    async def trigger(self, key: JobKey) -> None:
        if self.paused is not None and self.paused():
            if key not in self._deferred:  # a paused replica writes nothing: its cache may be frozen and stale
                log.info("paused: pass deferred until resumed", job=f"{key[0]}/{key[1]}")
                self._deferred.add(key)
            return
        lock = self._locks.setdefault(key, asyncio.Lock())
        held = self.store.job(key)
        # Every line of the pass (ours, the API wrapper's) names the job: job=namespace/name, job_id.
        with bind_job(job_id_of(held) if held is not None else key[1], job=f"{key[0]}/{key[1]}"):
            async with lock:
                try:
                    await self._reconcile(key)
                except Exception as exc:  # retried below, never propagated into kopf's watcher
                    self._retry_after_error(key, exc)
                else:
                    self._errors.pop(key, None)

    def _retry_after_error(self, key: JobKey, exc: Exception) -> None:
        count = self._errors.get(key, 0) + 1
        self._errors[key] = count
        if self.on_error is not None:
            self.on_error("reconcile")
        conflict = isinstance(exc, ApiException) and exc.status == 409
        delay = 0.05 if conflict else min(MAX_ERROR_DELAY, 2.0 ** min(count - 1, 16))
        level = logging.DEBUG if conflict else logging.WARNING if count < 8 else logging.ERROR
        log.log(
            level,
            "reconcile failed, retrying",
            error=_short(exc),
            retry=count,
            retry_in=delay,
            # A traceback for our own errors only: an API answer (a 403 while a restarted API server's RBAC
            # catches up, say) is all in `error`.
            exc_info=not isinstance(exc, ApiException) and not kube.transient(exc),
        )
        self.trigger_soon(key, delay)

    # --- one pass
    async def _reconcile(self, key: JobKey) -> None:
        job = self.store.job(key)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return  # deleted: owner-reference GC removes the Pods
        meta = job["metadata"]
        ref = JobRef(namespace=key[0], name=key[1], uid=meta.get("uid", ""))
        now = self.clock()
        spec = _parse_spec(job)
        gate = self.gate_of(key, spec) if self.gate_of is not None and spec is not None else None
        if gate is not None and spec is not None and _first_plan_pending(job, spec, gate):
            return  # the queue's first plan tells us (admitted: one write fewer per job; else the wait)
        owner = self.store.key_of_job_id(job_id_of(job))  # the oldest GpuJob with this jobId, any namespace
        duplicate_of = f"{owner[0]}/{owner[1]}" if owner is not None and owner != key else None
        decision = decide(job, self.store.pods_of(ref.uid), now, spec=spec, gate=gate, duplicate_of=duplicate_of)
        vanished = (job.get("status") or {}).get("podName")
        if vanished and any(t.reason in (Reason.POD_DELETED, Reason.CPU_FALLBACK) for t in decision.transitions):
            # The cache says the current attempt's Pod is gone; ask the API before starting over.
            pod = await kube.get_pod(key[0], vanished)
            if pod is not None:
                self.store.put_pod(pod)
                decision = decide(
                    job, self.store.pods_of(ref.uid), now, spec=spec, gate=gate, duplicate_of=duplicate_of
                )
        for name in decision.delete_pods:
            await kube.delete_pod(key[0], name)
        if decision.create_attempt is not None and decision.create_attempt > 1:
            # A next attempt is made when a Pod went, and the cache may hold a job deleted while unwatched (GC
            # then deletes its Pods): make sure the owner exists before giving it a Pod GC would only delete.
            fresh = await kube.get_gpujob(*key)
            if fresh is None or fresh["metadata"].get("uid") != ref.uid:
                self._gone(key)
                return
        secret: str | None = None  # the attempt's own credentials (issue 15), made before its Pod
        if decision.create_attempt is not None and spec is not None and self.issue_credentials is not None:
            try:
                secret = await self.issue_credentials(job, spec, now)
            except CredentialsRefused as exc:
                decision = fail_now(job, Reason.INVALID_PARAMS, f"no credentials can be made: {exc}", now)
        if decision.create_attempt is not None and spec is not None:
            on_cpu = decision.status.fallback is not None  # spec.fallback: this attempt runs on CPU
            pod_body = build_pod(ref, spec, decision.create_attempt, self.defaults, secret, cpu=on_cpu)
            if decision.admits:
                # The queue's admission is durable before the Pod exists (a restarted operator counts only what
                # the statuses say): one write holds it and the attempt, podName included; a Pod not made after
                # it is made by the next pass (status.decide: the admitted attempt's Pod is pending).
                decision.status.pod_name = pod_body["metadata"]["name"]
                if not await self._write_status(key, job, decision):
                    return
                job = self.store.job(key) or job
            try:
                _, created = await kube.create_pod(key[0], pod_body)
            except ApiException as exc:
                if kube.exceeded_quota(exc):
                    # Not a failure: the job waits for its namespace's quota (status says so) and tries again.
                    tries = self._over_quota.get(key, 0) + 1
                    self._over_quota[key] = tries
                    quota = wait_for_quota(decision, kube.message_of(exc), now, meta.get("generation"))
                    await self._write_status(key, job, quota)
                    self.trigger_soon(key, min(MAX_QUOTA_DELAY, 2.0 ** min(tries - 1, 16)))
                    return
                if not kube.rejected_for_good(exc):
                    raise  # retried with back-off: transient, RBAC not ready
                # The API server will never accept this Pod (invalid, or forbidden by Pod Security).
                decision = fail_now(job, Reason.INVALID_SPEC, f"Pod rejected: {kube.message_of(exc)}", now)
            else:
                self._over_quota.pop(key, None)
                # Filed at once: the watch event may lag, and a missing Pod would look deleted.
                if created is not None:
                    self.store.put_pod(created)
                decision.status.pod_name = pod_body["metadata"]["name"]
        await self._write_status(key, job, decision)
        if decision.delete_job:
            # Only this GpuJob: one re-created under the same name since (another uid) is not ours to delete.
            await kube.delete_gpujob(*key, uid=ref.uid or None)
        elif decision.requeue_after is not None:
            self.trigger_soon(key, decision.requeue_after)

    def _gone(self, key: JobKey) -> None:
        held = self.store.job(key)
        if held is not None and self.on_gone is not None:
            log.info("job gone, dropped from the cache")
            self.on_gone(held)

    async def _write_status(self, key: JobKey, job: dict[str, Any], decision: Decision) -> bool:
        """Write the decided status (nothing when unchanged); False when the job is gone."""
        patch = status_patch(job.get("status") or {}, decision.status)
        if not patch:
            return True
        resource_version = job["metadata"].get("resourceVersion")
        try:
            stored = await kube.patch_gpujob_status(*key, patch, resource_version)
        except ApiException as exc:
            if exc.status == 409:  # someone wrote in between: decide again from the fresh object
                fresh = await kube.get_gpujob(*key)
                if fresh is not None:
                    self.store.put_job(fresh)
            if not kube.rejected_for_good(exc) or not (decision.status.artifacts or decision.status.metrics):
                raise
            # The API server refuses the status, and only the worker's output can be why (its termination
            # message is untrusted; status logic bounds it, this is the backstop): write the phase without it,
            # rather than retry a write that can never pass and leave the job in its old phase.
            log.error("status refused, written without the worker's artifacts and metrics", error=kube.message_of(exc))
            decision.status = without_worker_output(decision.status)
            patch = status_patch(job.get("status") or {}, decision.status)
            stored = await kube.patch_gpujob_status(*key, patch, resource_version)
        if stored is None:
            self._gone(key)
            return False
        self.store.put_job(stored)
        for observer in self.observers:
            try:
                observer(stored, decision)
            except Exception:  # best effort: the status write has happened
                log.exception("write observer failed")
        if decision.transitions:
            for sink in self.sinks:
                try:
                    await sink(stored, decision.transitions, decision.status)
                except Exception:  # events and metrics are best effort: the status write has happened
                    log.exception("after-write hook failed", hook=getattr(sink, "__name__", repr(sink)))
        return True


def _short(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        message = kube.message_of(exc)
        return f"API {exc.status} {exc.reason}" + (f": {message}" if message != exc.reason else "")
    return repr(exc)


def _first_plan_pending(job: dict[str, Any], spec: GpuJobSpec, gate: QueueGate) -> bool:
    """A new job of a queue that the queue manager has not planned yet: nothing to write before its plan, which
    reconciles it once admitted (then Queued and Scheduled come in one write) or told why it waits."""
    status = job.get("status") or {}
    return (
        gate.reason is None
        and gate.admission is None
        and not status.get("phase")
        and not status.get("admission")
        and not (spec.cancel or spec.suspend)
    )


def _parse_spec(job: dict[str, Any]) -> GpuJobSpec | None:
    try:
        return GpuJobSpec.model_validate(job.get("spec") or {})
    except ValueError:
        return None  # decide() reports it as InvalidSpec
