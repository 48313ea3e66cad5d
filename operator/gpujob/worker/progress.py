"""Progress reporting that costs the training loop almost nothing.

`report()` only stores the latest value under a lock; a daemon thread publishes it through the shared
SyncEventPublisher (so `seq` stays ordered with the operator's own events) at most every `min_interval`
seconds, always the newest value, and the final one on `close()`. A slow or dead Redis therefore never
blocks a training step, and publish failures are logged and dropped: progress is best effort.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

import redis

from gpujob.api import Phase
from gpujob.events import SyncEventPublisher, make_event, sync_client
from gpujob.logging import get_logger
from gpujob.settings import Settings, get_settings
from gpujob.worker.credential_files import with_credential_files

# In-attempt updates carry the phase the attempt is in; the operator owns the other phases.
EVENT_STATUS = Phase.RUNNING.event_status
MIN_INTERVAL_SECONDS = 0.2  # at most ~5 events/s per job
CLOSE_TIMEOUT_SECONDS = 5.0


def _log() -> Any:
    # Not a module-level logger: this module is imported before `configure()` runs, and a logger bound
    # that early keeps structlog's default (stdout) output.
    return get_logger(__name__)


class ProgressReporter:
    def __init__(
        self,
        job_id: str,
        attempt: int,
        publisher: SyncEventPublisher | None,
        min_interval: float = MIN_INTERVAL_SECONDS,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.publisher = publisher
        self.min_interval = min_interval
        self.published = 0
        self.failures = 0
        self._cond = threading.Condition()
        self._pending: tuple[float, str] | None = None
        self._high = 0.0  # percent never goes backwards, even across a resumed attempt's first report
        self._closed = False
        # The thread's lines carry what the starter's carry (bind_job: job_id, attempt).
        run = contextvars.copy_context().run
        self._thread = threading.Thread(target=run, args=(self._run,), name="gpujob-progress", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings, job_id: str) -> ProgressReporter:
        publisher = None
        if settings.redis_url is not None:
            publisher = SyncEventPublisher(sync_client(settings), settings)
        return cls(job_id, settings.attempt, publisher)

    def report(self, percent: float, message: str = "") -> None:
        with self._cond:
            self._high = max(self._high, min(100.0, max(0.0, float(percent))))
            self._pending = (self._high, message)
            self._cond.notify()

    def close(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Publish what is pending, then stop the thread (bounded: a dead Redis can't hang the Pod)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        if self.publisher is not None:
            self.publisher.client.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                percent, message = self._pending
                self._pending = None
            self._publish(percent, message)
            with self._cond:  # rate limit, cut short by close() so the final value goes out at once
                self._cond.wait_for(lambda: self._closed, timeout=self.min_interval)

    def _publish(self, percent: float, message: str) -> None:
        _log().info("progress", job_id=self.job_id, percent=round(percent, 2), message=message)
        if self.publisher is None:
            return
        event = make_event(self.job_id, EVENT_STATUS, percent, message, phase=Phase.RUNNING.value, attempt=self.attempt)
        try:
            self.publisher.publish(event)
            self.published += 1
        except (redis.RedisError, OSError) as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 50 == 0:
                _log().warning("progress publish failed; dropped", error=str(exc), failures=self.failures)


_current: ProgressReporter | None = None
_current_lock = threading.Lock()


def set_current(reporter: ProgressReporter | None) -> None:
    global _current
    with _current_lock:
        _current = reporter


def report_progress(percent: float, message: str = "") -> None:
    """Publish progress for the job this process runs (GPUJOB_JOB_ID); usable from any task code.

    Inside `gpujob worker` it goes to the runtime's reporter; elsewhere a reporter is made from settings.
    """
    global _current
    with _current_lock:
        if _current is None:
            settings = with_credential_files(get_settings())
            _current = ProgressReporter.from_settings(settings, settings.job_id or "unknown")
        reporter = _current
    reporter.report(percent, message)
