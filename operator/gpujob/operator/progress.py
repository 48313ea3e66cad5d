"""Both directions of progress between the operator and Redis.

- Outbound: phase transitions become progress events, handed to a queue so a reconcile never waits on
  Redis; one forwarder task publishes them in order and retries through Redis outages.
- Inbound: the worker's progress events (Pub/Sub) are mirrored into `GpuJob.status.progress`,
  rate-limited per job (at most one write per interval, the latest value always written last).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio

from gpujob.api.constants import Phase, Reason
from gpujob.api.events import FALLBACK, ProgressEvent
from gpujob.api.models import GpuJobStatus, Progress
from gpujob.api.naming import job_id_of
from gpujob.events import AsyncPublisher, make_event
from gpujob.logging import get_logger
from gpujob.operator.cache import JobKey, Store
from gpujob.operator.status import Transition

log = get_logger("gpujob.progress")

MAX_BACKOFF = 30.0
EVENT_SOURCE = "operator"  # marks our own events, so the mirror never echoes them into status


def transition_events(job: dict[str, Any], transitions: list[Transition], status: GpuJobStatus) -> list[ProgressEvent]:
    """The events of one status write: one per phase transition, in order (pure). None for a duplicate of
    another GpuJob's jobId (DuplicateJobId): the channel, state and stream of that jobId are the other job's."""
    if status.reason == Reason.DUPLICATE_JOB_ID:
        return []
    job_id = job_id_of(job)
    percent = status.progress.percent if status.progress else 0.0
    events = []
    queue = (job.get("spec") or {}).get("queue") or None
    for t in transitions:
        artifacts = [a.wire() for a in status.artifacts] if t.new is Phase.SUCCEEDED and status.artifacts else None
        # Waiting for its queue: where it stands (later moves come from the queue manager, rate-limited).
        waits = t.new is Phase.QUEUED and queue is not None and status.queue is not None and status.queue.position > 0
        if t.new is Phase.SCHEDULED and t.reason == Reason.CPU_FALLBACK and status.fallback is not None:
            # spec.fallback: the job waited too long for a GPU; this attempt runs on CPU (README, the events)
            waited = status.fallback.reason
            fields = {"attempt": t.attempt, "reason": t.reason, "device": "cpu", "waitedFor": waited}
            events.append(make_event(job_id, FALLBACK, percent, t.message, source=EVENT_SOURCE, **fields))
        events.append(
            make_event(
                job_id,
                t.new.event_status,
                100.0 if t.new is Phase.SUCCEEDED else percent,
                t.message,
                phase=t.new.value,
                attempt=t.attempt,
                reason=t.reason,
                artifacts=artifacts,
                source=EVENT_SOURCE,
                queue=queue if waits else None,
                position=status.queue.position if waits and status.queue is not None else None,
            )
        )
    return events


@dataclass
class EventForwarder:
    """Ordered, non-blocking hand-off of events to Redis; a bounded buffer rides out Redis outages."""

    publisher: AsyncPublisher
    maxsize: int = 100_000
    dropped: int = 0
    _queue: deque[ProgressEvent] = field(default_factory=deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    def submit(self, events: list[ProgressEvent]) -> None:
        for event in events:
            if len(self._queue) >= self.maxsize:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(event)
        self._ready.set()

    async def sink(self, job: dict[str, Any], transitions: list[Transition], status: GpuJobStatus) -> None:
        self.submit(transition_events(job, transitions, status))

    async def run(self) -> None:
        delay = 0.5
        while True:
            await self._ready.wait()
            while self._queue:
                try:
                    await self.publisher.publish(self._queue[0])
                except (redis.RedisError, OSError) as exc:
                    queued = len(self._queue)
                    log.warning("publishing events failed, retrying", error=str(exc), queued=queued, retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(MAX_BACKOFF, delay * 2)
                    continue
                self._queue.popleft()
                delay = 0.5
            self._ready.clear()


ProgressWriter = Callable[[JobKey, Progress], Awaitable[None]]


@dataclass
class ProgressMirror:
    """Subscribes to every job's progress channel and mirrors the worker's progress into status."""

    client: redis.asyncio.Redis
    channel_prefix: str
    store: Store
    write: ProgressWriter
    interval: float = 2.0
    on_progress: Callable[[str, str, float], None] | None = None  # (job_id, type, percent) -> metrics
    paused: Callable[[], bool] | None = None  # HA: a paused replica writes nothing (the active one mirrors)
    _last_write: dict[JobKey, float] = field(default_factory=dict)
    _pending: dict[JobKey, Progress] = field(default_factory=dict)
    _flushers: dict[JobKey, asyncio.Task[None]] = field(default_factory=dict)

    async def run(self) -> None:
        """Until cancelled, whatever is published: messages are read as bytes (anyone can PUBLISH anything on
        these channels), and one that is not a progress event is dropped, never the subscription."""
        delay = 0.5
        client = bytes_twin(self.client)
        try:
            while True:
                try:
                    async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                        await pubsub.psubscribe(f"{self.channel_prefix}*")
                        delay = 0.5
                        async for message in pubsub.listen():
                            if message and message.get("type") == "pmessage":
                                self.handle(message["data"])
                except (redis.RedisError, OSError) as exc:
                    log.warning("progress subscription lost, reconnecting", error=str(exc), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(MAX_BACKOFF, delay * 2)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    def handle(self, raw: str | bytes) -> None:
        try:
            event = ProgressEvent.model_validate_json(raw)
        except ValueError:  # not UTF-8, not JSON, not an event (pydantic's ValidationError is a ValueError)
            return
        if self.paused is not None and self.paused():
            return
        key = self.store.key_of_job_id(event.jobId)
        job = self.store.job(key) if key else None
        if key is None or job is None or event.source == EVENT_SOURCE:
            return
        status = job.get("status") or {}
        if status.get("phase") in {p.value for p in Phase if p.terminal} or event.phase != Phase.RUNNING.value:
            return  # only progress inside a running attempt; the operator's own phase events are not echoed
        if self.on_progress is not None:
            self.on_progress(event.jobId, str((job.get("spec") or {}).get("type", "")), event.progress)
        progress = Progress(percent=event.progress, message=event.message[:256])
        if Progress.model_validate(status.get("progress") or {}) == progress:
            return
        self._pending[key] = progress
        if key not in self._flushers:
            task = asyncio.get_running_loop().create_task(self._flush(key))
            self._flushers[key] = task

    async def _flush(self, key: JobKey) -> None:
        try:
            wait = self._last_write.get(key, 0.0) + self.interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            progress = self._pending.pop(key, None)
            if progress is not None:
                self._last_write[key] = time.monotonic()
                with contextlib.suppress(Exception):  # best effort: the next progress event writes again
                    await self.write(key, progress)
        finally:
            self._flushers.pop(key, None)
            if key in self._pending:  # arrived while writing
                self._flushers[key] = asyncio.get_running_loop().create_task(self._flush(key))

    def forget(self, key: JobKey) -> None:
        self._last_write.pop(key, None)
        self._pending.pop(key, None)
        task = self._flushers.pop(key, None)
        if task is not None:
            task.cancel()


def bytes_twin(client: redis.asyncio.Redis) -> redis.asyncio.Redis:
    """A client to the same server with the same options that replies bytes instead of decoding them."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    return redis.asyncio.Redis(
        connection_pool=redis.asyncio.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )
