"""A ResourceQuota that refuses a job's Pod (issue 12 item 13): the job waits, nothing counted (pure part)."""

from __future__ import annotations

from datetime import timedelta

from gpujob.api.constants import ConditionType, Phase, Reason
from gpujob.operator.status import wait_for_quota
from tests.unit.test_status import T0, cond, job, pod, step

REFUSAL = 'pods "j-1" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1, used: ' + (
    "requests.nvidia.com/gpu=4, limited: requests.nvidia.com/gpu=4"
)


def test_a_new_job_over_quota_waits_queued_with_the_api_servers_message_then_starts() -> None:
    body = job()
    d = step(body, [])
    assert d.create_attempt == 1
    waiting = wait_for_quota(d, REFUSAL, T0, 1)
    body["status"] = waiting.status.wire()
    assert waiting.create_attempt is None and waiting.status.attempts == 0 and waiting.status.failures == 0
    assert (waiting.status.phase, waiting.status.reason) == (Phase.QUEUED, Reason.QUOTA_EXCEEDED)
    assert REFUSAL in (waiting.status.message or "") and waiting.status.pod_name is None
    assert cond(waiting, ConditionType.SCHEDULED) == ("False", Reason.QUOTA_EXCEEDED)
    assert [(t.old, t.new) for t in waiting.transitions] == [(None, Phase.QUEUED)]  # Scheduled never happened
    again = step(body, [], T0 + timedelta(seconds=1))  # the caller's timer: try again
    assert again.create_attempt == 1 and again.status.phase is Phase.SCHEDULED


def test_a_retry_over_quota_keeps_its_counted_failures() -> None:
    body = job({"retries": {"limit": 3, "backoffSeconds": 1}})
    step(body, [])
    step(body, [pod(1, "Failed", exit_code=1)])
    d = step(body, [pod(1, "Failed", exit_code=1)], T0 + timedelta(seconds=2))
    assert d.create_attempt == 2
    waiting = wait_for_quota(d, REFUSAL, T0 + timedelta(seconds=2), 1)
    assert (waiting.status.attempts, waiting.status.failures) == (1, 1)
    assert [(t.old, t.new, t.reason) for t in waiting.transitions] == [
        (Phase.RETRYING, Phase.QUEUED, Reason.QUOTA_EXCEEDED)
    ]


def test_a_pod_taken_away_then_refused_by_quota_is_still_not_counted() -> None:
    body = job({"retries": {"limit": 0}})
    step(body, [])
    step(body, [pod(1, "Running", node_name="n")])
    d = step(body, [pod(1, "Failed", reason="Evicted", message="node drained", node_name="n")])
    assert d.create_attempt == 2 and d.delete_pods == ["j-1"]
    waiting = wait_for_quota(d, REFUSAL, T0, 1)
    body["status"] = waiting.status.wire()
    assert (waiting.status.attempts, waiting.status.failures, waiting.status.phase) == (1, 0, Phase.QUEUED)
    assert step(body, []).create_attempt == 2  # the old Pod is gone: attempt 2 once the quota allows
