"""The reconciler's error policy: a job whose reconcile keeps failing is retried with capped back-off for as
long as it fails, never abandoned until some later event happens to touch it."""

from __future__ import annotations

import asyncio

from gpujob.kube import ApiException
from gpujob.operator.builders import PodDefaults
from gpujob.operator.cache import JobKey, Store
from gpujob.operator.reconciler import MAX_ERROR_DELAY, Reconciler
from tests.support.logs import JsonLogs

KEY: JobKey = ("default", "stuck")


class FailingFor(Reconciler):
    """A reconcile that fails the first `failures` times (the API answering 500s, say), then succeeds."""

    failures = 12
    calls = 0

    async def _reconcile(self, key: JobKey) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"API down (call {self.calls})")


async def test_a_failing_job_is_retried_past_any_count_and_recovers() -> None:
    errors: list[str] = []
    reconciler = FailingFor(Store(), PodDefaults("img", ("gpujob", "worker")), on_error=errors.append)
    delays: list[float] = []
    original = reconciler.trigger_soon

    def record(key: JobKey, delay: float) -> None:
        delays.append(delay)
        original(key, 0.0)  # the policy's delay is recorded; the test does not wait it out

    reconciler.trigger_soon = record  # type: ignore[method-assign]
    await reconciler.trigger(KEY)
    for _ in range(200):
        if reconciler.calls > reconciler.failures:
            break
        await asyncio.sleep(0.01)
    await reconciler.close()
    assert reconciler.calls == reconciler.failures + 1, "retried until it succeeded, past the old cap of 8"
    assert len(errors) == reconciler.failures and reconciler.failing() == 0
    assert delays == sorted(delays) and delays[0] == 1.0 and max(delays) <= MAX_ERROR_DELAY
    assert delays[-1] == min(MAX_ERROR_DELAY, 2.0 ** (reconciler.failures - 1))


async def test_each_retry_is_logged_as_a_record_naming_the_job(json_logs: JsonLogs) -> None:
    """What `kubectl logs` shows and the chaos suite counts: one `reconcile failed, retrying` record per failure,
    with the job, the error, the retry's number in a row and its delay."""
    reconciler = FailingFor(Store(), PodDefaults("img", ("gpujob", "worker")))
    reconciler.failures = 3
    reconciler.trigger_soon = lambda key, delay: None  # type: ignore[method-assign]  # the test triggers itself
    for _ in range(4):
        await reconciler.trigger(KEY)
    retries = json_logs.records("reconcile failed, retrying")
    assert [(r["retry"], r["retry_in"]) for r in retries] == [(1, 1.0), (2, 2.0), (3, 4.0)]
    assert all(r["job"] == "default/stuck" and r["job_id"] == "stuck" and r["level"] == "warning" for r in retries)
    assert retries[0]["error"] == "RuntimeError('API down (call 1)')"
    assert "traceback" in retries[0]["exception"].lower()  # not a transient API answer: the traceback is kept


class Forbidden(Reconciler):
    """The API server refuses once: RBAC not ready yet after a kube-apiserver restart (seen under chaos)."""

    calls = 0

    async def _reconcile(self, key: JobKey) -> None:
        self.calls += 1
        if self.calls == 1:
            exc = ApiException(status=403, reason="Forbidden")
            exc.body = b'{"message": "pods is forbidden: User \\"system:serviceaccount:x:y\\" cannot create"}'
            raise exc


async def test_an_api_answer_is_logged_without_a_traceback(json_logs: JsonLogs) -> None:
    """An API server's refusal is all in the record's error: no traceback (the chaos suite fails on any)."""
    reconciler = Forbidden(Store(), PodDefaults("img", ("gpujob", "worker")))
    reconciler.trigger_soon = lambda key, delay: None  # type: ignore[method-assign]
    await reconciler.trigger(KEY)
    [retry] = json_logs.records("reconcile failed, retrying")
    assert retry["error"].startswith("API 403 Forbidden: pods is forbidden")
    assert "exception" not in retry
