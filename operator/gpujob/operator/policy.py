"""Retry policy: when the next attempt of a failed job may start (the GpuJob's `retries`: exponential back-off,
capped). Pure; the decision of whether to retry at all is in status.decide()."""

from __future__ import annotations

from datetime import datetime, timedelta

from gpujob.api.models import RetryPolicy


def next_attempt(retries: RetryPolicy, failures: int, now: datetime) -> tuple[float, datetime]:
    """(the back-off in seconds, the time the next attempt is due), after `failures` counted failures. Status
    times have whole seconds: the due time is rounded up, so a retry never starts early."""
    delay = retries.backoff(failures)
    due = now + timedelta(seconds=delay)
    if due.microsecond:
        due = due.replace(microsecond=0) + timedelta(seconds=1)
    return delay, due
