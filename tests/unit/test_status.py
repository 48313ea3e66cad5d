"""The pure status function: (GpuJob, its Pods, now) -> next status and actions. No server, no clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gpujob.api.constants import ConditionType, Label, Phase, Reason
from gpujob.api.models import GpuJobStatus
from gpujob.operator.conventions import iso, set_condition
from gpujob.operator.podview import PodView, pod_view
from gpujob.operator.status import Decision, decide, status_patch

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


LORA_PARAMS = {"baseModel": "tiny-llama", "dataset": {"text": ["hello"]}}  # valid: the Pod is created


def job(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "j", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": {"type": "train_lora", "params": LORA_PARAMS, **(spec or {})},
        "status": status or {},
    }


def pod(attempt: int, phase: str = "Pending", **extra: Any) -> PodView:
    return PodView(name=f"j-{attempt}", attempt=attempt, phase=phase, created=T0, **extra)


def step(body: dict[str, Any], pods: list[PodView], now: datetime = T0) -> Decision:
    """Decide, then apply the decided status to the body (as the status write would)."""
    d = decide(body, pods, now)
    body["status"] = d.status.wire()
    return d


def cond(d: Decision, ctype: ConditionType) -> tuple[str, str]:
    [c] = [c for c in d.status.conditions if c.type == ctype]
    return c.status, c.reason


def test_new_job_creates_attempt_1_and_emits_queued_then_scheduled() -> None:
    d = step(job(), [])
    assert d.create_attempt == 1
    assert d.status.phase is Phase.SCHEDULED and d.status.attempts == 1
    assert [t.new for t in d.transitions] == [Phase.QUEUED, Phase.SCHEDULED]
    assert d.status.observed_generation == 1


def test_pending_pod_requeues_at_pending_timeout_then_fails_attempt_with_reason() -> None:
    body = job({"pendingTimeoutSeconds": 60, "retries": {"limit": 0}})
    step(body, [])
    waiting = pod(1, reason="Unschedulable", message="0/1 nodes: insufficient nvidia.com/gpu")
    d = step(body, [waiting], T0 + timedelta(seconds=10))
    assert d.requeue_after == 50 and d.create_attempt is None
    assert cond(d, ConditionType.SCHEDULED) == ("False", Reason.UNSCHEDULABLE)
    d = step(body, [waiting], T0 + timedelta(seconds=61))
    assert d.status.phase is Phase.FAILED and d.status.reason == Reason.UNSCHEDULABLE
    assert d.delete_pods == ["j-1"]
    assert "pendingTimeoutSeconds=60" in (d.status.message or "")


def test_image_pull_backoff_is_named_and_bounded_by_pending_timeout() -> None:
    body = job({"pendingTimeoutSeconds": 30, "retries": {"limit": 1, "backoffSeconds": 5}})
    step(body, [])
    stuck = pod(1, reason="ImagePullBackOff", node_name="gpu-1")
    d = step(body, [stuck], T0 + timedelta(seconds=31))
    assert d.status.phase is Phase.RETRYING and d.status.reason == Reason.IMAGE_PULL_BACKOFF
    assert d.requeue_after == 5 and d.delete_pods == ["j-1"]


def test_running_then_succeeded_copies_artifacts_from_termination_message() -> None:
    body = job()
    step(body, [])
    d = step(body, [pod(1, "Running", node_name="gpu-1", started_at=T0)])
    assert d.status.phase is Phase.RUNNING and d.status.node_name == "gpu-1"
    assert d.status.start_time == iso(T0)
    assert cond(d, ConditionType.RUNNING) == ("True", Reason.POD_RUNNING)
    result = json.dumps(
        {
            "artifacts": [{"key": "loras/j/adapter.safetensors", "size": 10, "sha256": "ab" * 32}],
            "metrics": {"loss": 0.5},
        }
    )
    d = step(body, [pod(1, "Succeeded", node_name="gpu-1", exit_code=0, result=result)], T0 + timedelta(minutes=5))
    assert d.status.phase is Phase.SUCCEEDED
    assert [a.key for a in d.status.artifacts] == ["loras/j/adapter.safetensors"]
    assert d.status.metrics == {"loss": 0.5}
    assert d.status.progress is not None and d.status.progress.percent == 100
    assert cond(d, ConditionType.COMPLETE) == ("True", Reason.SUCCEEDED)
    assert d.status.completion_time == iso(T0 + timedelta(minutes=5))


def test_failure_retries_with_exponential_backoff_then_fails_with_reason() -> None:
    body = job({"retries": {"limit": 2, "backoffSeconds": 10, "maxBackoffSeconds": 15}})
    step(body, [])
    now = T0
    delays = []
    for attempt in (1, 2):
        d = step(body, [pod(attempt, "Failed", exit_code=1)], now)
        assert d.status.phase is Phase.RETRYING and d.status.reason == Reason.ERROR
        delays.append(d.requeue_after)
        too_early = step(body, [], now + timedelta(seconds=1))
        assert too_early.create_attempt is None
        now += timedelta(seconds=20)
        d = step(body, [], now)
        assert d.create_attempt == attempt + 1 and d.status.phase is Phase.SCHEDULED
    assert delays == [10, 15]  # 10 * 2**1 = 20 capped at 15
    d = step(body, [pod(3, "Failed", exit_code=1, result='{"error": "CUDA error"}')], now)
    assert d.status.phase is Phase.FAILED and d.status.reason == Reason.ERROR
    assert "CUDA error" in (d.status.message or "") and "retry limit 2" in (d.status.message or "")
    assert d.status.failures == 3 and d.status.attempts == 3 and d.status.exit_code == 1


def test_non_retryable_exit_code_fails_at_once() -> None:
    body = job({"retries": {"limit": 5, "nonRetryableExitCodes": [64, 3]}})
    step(body, [])
    d = step(body, [pod(1, "Failed", exit_code=3)])
    assert d.status.phase is Phase.FAILED and d.status.reason == Reason.NON_RETRYABLE_EXIT_CODE
    assert cond(d, ConditionType.FAILED) == ("True", Reason.NON_RETRYABLE_EXIT_CODE)


def test_oom_killed_is_a_named_retryable_failure() -> None:
    body = job()
    step(body, [])
    d = step(body, [pod(1, "Failed", exit_code=137, reason="OOMKilled")])
    assert d.status.phase is Phase.RETRYING and d.status.reason == Reason.OOM_KILLED


def test_deadline_exceeded_fails_the_job() -> None:
    body = job({"timeoutSeconds": 60})
    step(body, [])
    d = step(body, [pod(1, "Failed", reason="DeadlineExceeded", message="Pod was active too long")])
    assert d.status.phase is Phase.FAILED and d.status.reason == Reason.DEADLINE_EXCEEDED


def test_pod_deleted_from_outside_starts_new_attempt_without_counting_a_failure() -> None:
    body = job({"retries": {"limit": 0}})
    step(body, [])
    step(body, [pod(1, "Running", node_name="n")])
    d = step(body, [])
    assert d.create_attempt == 2 and d.status.failures == 0
    assert d.transitions[-1].reason == Reason.POD_DELETED


def test_evicted_pod_starts_new_attempt_without_counting_a_failure() -> None:
    body = job({"retries": {"limit": 0}})
    step(body, [])
    d = step(body, [pod(1, "Failed", reason="Evicted", message="node low on memory")])
    assert d.create_attempt == 2 and d.status.failures == 0 and d.status.phase is Phase.SCHEDULED


NODE_SIDE_REASONS = ["Evicted", "Preempting", "Preempted", "Shutdown", "NodeShutdown", "Terminated"]


@pytest.mark.parametrize("reason", NODE_SIDE_REASONS)
def test_pod_taken_away_on_the_node_side_is_not_the_jobs_failure(reason: str) -> None:
    """Even with no retries left and the worker's SIGTERM exit code: a new attempt at once, nothing counted."""
    body = job({"retries": {"limit": 0, "backoffSeconds": 60}})
    step(body, [])
    step(body, [pod(1, "Running", node_name="gpu-1")])
    taken = pod(1, "Failed", node_name="gpu-1", exit_code=143, reason=reason, message="taken away")
    d = step(body, [taken], T0 + timedelta(seconds=5))
    assert d.status.phase is Phase.SCHEDULED and d.create_attempt == 2, d.status
    assert (d.status.failures, d.status.attempts) == (0, 2)
    assert d.status.next_attempt_time is None and d.requeue_after is None
    assert d.delete_pods == ["j-1"]
    assert [(t.new, t.reason) for t in d.transitions] == [(Phase.SCHEDULED, Reason.EVICTED)]
    assert f"attempt 1 {reason}: taken away" in d.transitions[0].message
    assert not any(c.type == ConditionType.FAILED for c in d.status.conditions)


def _failed_pod(status: dict[str, Any], *, deleting: bool = False, exit_code: int = 143) -> PodView:
    """A Pod as the API server returns it after the kubelet killed its worker (SIGTERM: exit 143)."""
    meta: dict[str, Any] = {"name": "j-1", "labels": {Label.ATTEMPT: "1"}, "creationTimestamp": iso(T0)}
    if deleting:
        meta["deletionTimestamp"] = iso(T0 + timedelta(seconds=90))
    terminated = {"exitCode": exit_code, "reason": "Error", "message": '{"error": "stopped by SIGTERM"}'}
    return pod_view(
        {
            "metadata": meta,
            "spec": {"nodeName": "gpu-1"},
            "status": {
                "phase": "Failed",
                "containerStatuses": [{"name": "worker", "state": {"terminated": terminated}}],
                **status,
            },
        }
    )


@pytest.mark.parametrize(
    ("status", "deleting"),
    [
        # Graceful node shutdown (kubelet): reason Terminated, and the DisruptionTarget condition.
        (
            {
                "reason": "Terminated",
                "message": "Pod was terminated in response to imminent node shutdown.",
                "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}],
            },
            False,
        ),
        # Node shutdown as older kubelets report it: the reason alone.
        ({"reason": "Shutdown", "message": "Node is shutting, evicting pods"}, False),
        # Scheduler preemption: the victim gets DisruptionTarget and is deleted; no status.reason at all.
        (
            {"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]},
            True,
        ),
        # Taint-based eviction (NoExecute) of a node going away.
        ({"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}]}, True),
        # `kubectl delete pod`: the kubelet reports the SIGTERMed container's Failed phase before the Pod goes.
        ({}, True),
    ],
    ids=["node-shutdown", "shutdown-reason", "scheduler-preemption", "taint-eviction", "kubectl-delete"],
)
def test_real_pod_shapes_of_outside_takeaways_are_not_the_jobs_failure(status: dict[str, Any], deleting: bool) -> None:
    body = job({"retries": {"limit": 0}})
    step(body, [])
    step(body, [pod(1, "Running", node_name="gpu-1")])
    d = step(body, [_failed_pod(status, deleting=deleting)])
    assert d.status.phase is Phase.SCHEDULED and d.create_attempt == 2, d.status
    assert d.status.failures == 0
    assert d.delete_pods == ([] if deleting else ["j-1"])  # a Pod already being deleted is not deleted again


@pytest.mark.parametrize(
    ("status", "deleting", "exit_code", "reason"),
    [
        ({}, False, 143, Reason.ERROR),  # SIGTERM from inside the Pod, not a deletion: the job's own failure
        ({}, True, 1, Reason.ERROR),  # it failed by itself, and was deleted afterwards
        ({"conditions": [{"type": "DisruptionTarget", "status": "False"}]}, False, 1, Reason.ERROR),
        ({"reason": "DeadlineExceeded", "message": "too long"}, True, 137, Reason.DEADLINE_EXCEEDED),
    ],
    ids=["sigterm-no-deletion", "failed-then-deleted", "disruption-false", "deadline"],
)
def test_failures_of_the_job_itself_still_count(
    status: dict[str, Any], deleting: bool, exit_code: int, reason: Reason
) -> None:
    body = job({"retries": {"limit": 0}})
    step(body, [])
    step(body, [pod(1, "Running", node_name="gpu-1")])
    d = step(body, [_failed_pod(status, deleting=deleting, exit_code=exit_code)])
    assert d.status.phase is Phase.FAILED and d.status.failures == 1 and d.create_attempt is None
    assert d.status.reason == reason


def test_pod_being_deleted_is_awaited_before_the_next_attempt() -> None:
    body = job()
    step(body, [])
    step(body, [pod(1, "Running")])
    d = step(body, [pod(1, "Running", deleting=True)])
    assert d.create_attempt is None and d.status.phase is Phase.RUNNING


def test_suspend_deletes_pod_and_resume_starts_new_attempt() -> None:
    body = job()
    step(body, [])
    step(body, [pod(1, "Running")])
    body["spec"]["suspend"] = True
    d = step(body, [pod(1, "Running")])
    assert d.status.phase is Phase.SUSPENDED and d.delete_pods == ["j-1"]
    assert cond(d, ConditionType.SUSPENDED) == ("True", Reason.SUSPENDED)
    body["spec"]["suspend"] = False
    d = step(body, [])
    assert d.create_attempt == 2 and d.status.phase is Phase.SCHEDULED
    assert cond(d, ConditionType.SUSPENDED) == ("False", Reason.RESUMED)


def test_created_suspended_never_starts() -> None:
    d = step(job({"suspend": True}), [])
    assert d.create_attempt is None and d.status.phase is Phase.SUSPENDED


def test_cancel_deletes_pod_and_is_terminal() -> None:
    body = job()
    step(body, [])
    body["spec"]["cancel"] = True
    d = step(body, [pod(1, "Running")])
    assert d.status.phase is Phase.CANCELLED and d.delete_pods == ["j-1"]
    assert [t.new for t in d.transitions] == [Phase.CANCELLED]
    again = step(body, [])
    assert again.transitions == [] and again.create_attempt is None


def test_ttl_after_finished_requeues_then_deletes_job() -> None:
    body = job({"ttlSecondsAfterFinished": 30})
    step(body, [])
    d = step(body, [pod(1, "Succeeded", exit_code=0)])
    assert d.requeue_after == 30 and not d.delete_job
    d = step(body, [pod(1, "Succeeded", exit_code=0)], T0 + timedelta(seconds=30))
    assert d.delete_job


def test_invalid_spec_fails_with_reason() -> None:
    body = job({"gpus": 1000})
    d = step(body, [])
    assert d.status.phase is Phase.FAILED and d.status.reason == Reason.INVALID_SPEC
    assert "gpus" in (d.status.message or "") and d.create_attempt is None


def test_pod_of_newer_attempt_is_adopted_when_status_write_was_lost() -> None:
    body = job()
    d = step(body, [pod(1, "Running")])
    assert d.create_attempt is None and d.status.attempts == 1 and d.status.phase is Phase.RUNNING


def test_unchanged_world_gives_empty_patch() -> None:
    body = job()
    step(body, [])
    step(body, [pod(1, "Running")])
    d = decide(body, [pod(1, "Running")], T0 + timedelta(hours=1))
    assert status_patch(body["status"], d.status) == {}
    assert d.transitions == []


def test_status_patch_nulls_cleared_fields_and_keeps_foreign_keys() -> None:
    old = {"phase": "Retrying", "nextAttemptTime": iso(T0), "kopf": {"x": 1}, "attempts": 1}
    new = GpuJobStatus.model_validate({**old, "phase": "Scheduled", "nextAttemptTime": None, "attempts": 2})
    patch = status_patch(old, new)
    assert patch["nextAttemptTime"] is None and patch["phase"] == "Scheduled" and patch["attempts"] == 2
    assert "kopf" not in patch


def test_condition_transition_time_changes_only_when_status_flips() -> None:
    first = set_condition([], ConditionType.RUNNING, True, "PodRunning", "a", T0, 1)
    same = set_condition(first, ConditionType.RUNNING, True, "PodRunning", "b", T0 + timedelta(minutes=1), 1)
    flipped = set_condition(same, ConditionType.RUNNING, False, "Error", "c", T0 + timedelta(minutes=2), 1)
    assert first[0].last_transition_time == same[0].last_transition_time == iso(T0)
    assert same[0].message == "b"
    assert flipped[0].last_transition_time == iso(T0 + timedelta(minutes=2))


def test_pod_view_reads_container_state_and_scheduling() -> None:
    raw = {
        "metadata": {
            "name": "p",
            "labels": {Label.ATTEMPT: "2"},
            "creationTimestamp": "2026-01-01T12:00:00Z",
        },
        "spec": {"nodeName": "gpu-1"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "worker",
                    "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": '{"error":"x"}'}},
                }
            ],
        },
    }
    view = pod_view(raw)
    assert (view.attempt, view.phase, view.exit_code, view.reason, view.node_name) == (
        2,
        "Failed",
        137,
        "OOMKilled",
        "gpu-1",
    )
    pending = pod_view(
        {
            "metadata": {"name": "q"},
            "status": {
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
            },
        }
    )
    assert pending.reason == "Unschedulable"


def test_resume_waits_for_the_suspended_pod_to_be_gone() -> None:
    body = job()
    step(body, [])
    step(body, [pod(1, "Running")])
    body["spec"]["suspend"] = True
    step(body, [pod(1, "Running")])
    body["spec"]["suspend"] = False
    d = step(body, [pod(1, "Running", deleting=True)])  # still terminating: its process may hold the GPU
    assert d.create_attempt is None and d.status.phase is Phase.SUSPENDED
    d = step(body, [])
    assert d.create_attempt == 2


def test_stale_retrying_status_follows_the_newer_pod_instead_of_deleting_it() -> None:
    body = job({"retries": {"limit": 2, "backoffSeconds": 0}})
    step(body, [])
    stale = step(body, [pod(1, "Failed", exit_code=1)]).status.wire()  # phase Retrying, attempts 1
    body["status"] = stale
    # attempt 2's Pod exists, but the status write that said so was lost (a 409, a stale cache)
    d = decide(body, [pod(1, "Failed", exit_code=1), pod(2, "Pending")], T0)
    assert d.delete_pods == [] and d.create_attempt is None
    assert d.status.attempts == 2 and d.status.phase is Phase.SCHEDULED


def test_retry_is_never_early_though_status_times_have_whole_seconds() -> None:
    body = job({"retries": {"limit": 1, "backoffSeconds": 1}})
    step(body, [])
    now = T0 + timedelta(milliseconds=800)
    d = step(body, [pod(1, "Failed", exit_code=1)], now)
    assert d.status.next_attempt_time == iso(T0 + timedelta(seconds=2))
    assert d.requeue_after is not None and d.requeue_after >= 1.0
    assert step(body, [], now + timedelta(seconds=1)).create_attempt is None
    assert step(body, [], T0 + timedelta(seconds=2)).create_attempt == 2


def _lost(attempt: int, phase: str = "Running", reason: str = "DeletionByTaintManager") -> PodView:
    """A Pod on a lost node as the real control plane leaves it: the taint manager marked it DisruptionTarget and
    deleted it, and with no kubelet left it keeps its last phase (and a deletionTimestamp) indefinitely."""
    return pod_view(
        {
            "metadata": {"name": f"j-{attempt}", "labels": {Label.ATTEMPT: str(attempt)},
                         "deletionTimestamp": "2026-01-01T12:00:40Z", "creationTimestamp": "2026-01-01T12:00:00Z"},
            "spec": {"nodeName": "gpu-1"},
            "status": {
                "phase": phase,
                "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": reason}],
                "containerStatuses": [{"state": {"running": {"startedAt": "2026-01-01T12:00:01Z"}}}],
            },
        }
    )  # fmt: skip


@pytest.mark.parametrize("phase", ["Running", "Pending"])
def test_pod_on_a_lost_node_counts_as_gone_and_its_new_attempt_is_not_a_failure(phase: str) -> None:
    body = job({"retries": {"limit": 0}})
    step(body, [])
    step(body, [pod(1, "Running", node_name="gpu-1")])
    lost = _lost(1, phase)
    assert lost.lost and lost.deleting and lost.disruption == "DeletionByTaintManager"
    d = step(body, [lost], T0 + timedelta(seconds=40))
    assert d.create_attempt == 2 and d.status.attempts == 2 and d.status.failures == 0
    assert d.status.phase is Phase.SCHEDULED and d.status.reason == Reason.EVICTED
    assert "lost node gpu-1" in (d.status.message or "")
    assert d.delete_pods == []  # already being deleted; the node finishes it when it comes back
    # The lost Pod lingers beside the new attempt's: the new one is followed, the lost one left alone.
    d = step(body, [lost, pod(2, "Running", node_name="gpu-2")], T0 + timedelta(seconds=45))
    assert d.status.phase is Phase.RUNNING and d.status.pod_name == "j-2" and d.delete_pods == []
    assert d.create_attempt is None


def test_other_terminating_pods_are_still_awaited_before_the_next_attempt() -> None:
    """Only the taint manager's mark means the node is gone: an evicted or preempted Pod still has a kubelet that
    stops its process and reports its end, so the next attempt waits for that."""
    for reason in ["EvictionByEvictionAPI", "PreemptionByScheduler"]:
        body = job()
        step(body, [])
        step(body, [pod(1, "Running", node_name="gpu-1")])
        terminating = _lost(1, "Running", reason)
        assert not terminating.lost
        d = step(body, [terminating])
        assert d.create_attempt is None and d.status.phase is Phase.RUNNING


def test_a_lost_pod_of_a_failed_attempt_does_not_hold_the_retry() -> None:
    """The attempt failed (Pending past its timeout on a node whose kubelet died) and is Retrying; the taint
    manager took the Pod before the operator's delete did: the retry need not wait for the node."""
    body = job({"pendingTimeoutSeconds": 30, "retries": {"limit": 1, "backoffSeconds": 0}})
    step(body, [])
    step(body, [pod(1, "Pending", node_name="gpu-1")], T0 + timedelta(seconds=31))
    assert body["status"]["phase"] == Phase.RETRYING
    d = step(body, [_lost(1, "Pending")], T0 + timedelta(seconds=40))
    assert d.create_attempt == 2 and d.status.failures == 1
