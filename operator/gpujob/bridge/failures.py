"""What a failure while handling one entry means for it: retried later (Transient), retried briefly then rejected
(Forbidden), or rejected for good (InvalidEntry); and a bounded metrics label for each reason."""

from __future__ import annotations

from gpujob import kube
from gpujob.api.request import InvalidEntry
from gpujob.kube import ApiException


class Transient(Exception):
    """Try again later (the entry stays pending)."""


class Forbidden(Exception):
    """A 403 on the request's GpuJob: retried in place a few times, then the request is rejected."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def api_failure(exc: Exception, job_id: str) -> Exception:
    """What a failed API call means for the request (kube.verdict decides; the reason quotes the API server)."""
    if isinstance(exc, InvalidEntry):
        return exc
    match kube.verdict(exc):
        case kube.Verdict.TRANSIENT | kube.Verdict.CONFLICT:
            return Transient(f"API server answered {status_of(exc)} for {job_id!r}")
        case kube.Verdict.FORBIDDEN:
            return Forbidden(f"rejected by the API server (403): {kube.message_of(exc)}")
        case kube.Verdict.NOT_FOUND | kube.Verdict.REJECTED:
            return InvalidEntry(f"rejected by the API server ({status_of(exc)}): {kube.message_of(exc)}")
        case None:  # not an API answer: the request could not even be sent (a body that does not serialize)
            if isinstance(exc, ValueError | TypeError | RecursionError):
                return InvalidEntry(f"request cannot be sent to the API server: {exc!r}"[:500])
            return exc
    raise AssertionError("unreachable")


def status_of(exc: Exception) -> str:
    return str(exc.status) if isinstance(exc, ApiException) else repr(exc)


def reason_kind(reason: str) -> str:
    """A bounded label for metrics: the reason's first words, not its details."""
    for kind in ("handling failed", "invalid request", "rejected by the API server", "missing field", "not JSON",
                 "not valid UTF-8", "unknown action", "must be a JSON object", "over the",
                 "nests JSON too deep", "cannot be sent", "unreadable"):  # fmt: skip
        if kind in reason:
            return kind.replace(" ", "_")
    return "other"
