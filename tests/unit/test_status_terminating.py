"""A Pod stuck terminating (issue 12 item 6): the job says so, waits for it to be gone, then moves on."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from gpujob.api.constants import ConditionType, Label, Phase, Reason
from gpujob.operator.conventions import iso
from gpujob.operator.podview import pod_view
from gpujob.operator.status import Decision
from tests.unit.test_status import T0, job, pod, step


def _condition(d: Decision, ctype: ConditionType) -> tuple[str, str, str] | None:
    found = [c for c in d.status.conditions if c.type == ctype]
    return (found[0].status, found[0].reason, found[0].message) if found else None


def test_pod_view_reads_the_deletion_deadline_and_finalizers() -> None:
    view = pod_view(
        {
            "metadata": {
                "name": "j-1",
                "labels": {Label.ATTEMPT: "1"},
                "deletionTimestamp": iso(T0),
                "finalizers": ["example.com/keep"],
            },
            "status": {"phase": "Running"},
        }
    )
    assert view.deleting and view.deletion_deadline == T0 and view.finalizers == ("example.com/keep",)
    assert not view.overdue(T0 - timedelta(seconds=1)) and view.overdue(T0)


def test_a_pod_held_by_a_finalizer_past_its_grace_period_surfaces_then_the_job_moves_on() -> None:
    body = job({"retries": {"limit": 0}})
    step(body, [])
    step(body, [pod(1, "Running", node_name="gpu-1")])
    deleting = pod(
        1,
        "Running",
        node_name="gpu-1",
        deleting=True,
        deletion_deadline=T0 + timedelta(seconds=30),
        finalizers=("example.com/keep",),
    )
    d = step(body, [deleting], T0 + timedelta(seconds=10))  # within the grace period: nothing to say yet
    assert _condition(d, ConditionType.POD_TERMINATING) is None and d.create_attempt is None
    assert d.requeue_after == 20 and d.status.phase is Phase.RUNNING

    d = step(body, [deleting], T0 + timedelta(seconds=95))
    held = _condition(d, ConditionType.POD_TERMINATING)
    assert held is not None and held[:2] == ("True", Reason.POD_TERMINATING)
    assert "example.com/keep" in held[2] and iso(T0 + timedelta(seconds=30)) in held[2] and "65s" in held[2]
    assert (d.status.phase, d.status.reason) == (Phase.RUNNING, Reason.POD_TERMINATING)
    assert d.create_attempt is None and d.delete_pods == []  # waits: never two Pods of one job

    again = step(body, [deleting], T0 + timedelta(seconds=300))  # nothing new: nothing to write
    assert again.status == d.status

    gone = step(body, [], T0 + timedelta(seconds=301))
    assert gone.create_attempt == 2 and gone.status.failures == 0
    assert _condition(gone, ConditionType.POD_TERMINATING)[:2] == ("False", Reason.POD_GONE)


def test_a_pod_whose_node_never_confirms_is_node_lost_with_what_frees_it() -> None:
    body = job()
    step(body, [])
    step(body, [pod(1, "Running", node_name="gpu-7")])
    stuck = pod(1, "Running", node_name="gpu-7", deleting=True, deletion_deadline=T0)
    d = step(body, [stuck], T0 + timedelta(minutes=10))
    held = _condition(d, ConditionType.POD_TERMINATING)
    assert held is not None and held[:2] == ("True", Reason.NODE_LOST)
    assert "gpu-7" in held[2] and "out-of-service" in held[2] and "force delete" in held[2]
    assert d.create_attempt is None


def test_a_stuck_pod_of_a_failed_attempt_holds_the_retry_and_keeps_its_failure_reason() -> None:
    body = job({"retries": {"limit": 2, "backoffSeconds": 1}})
    step(body, [])
    failed = pod(1, "Failed", exit_code=1)
    step(body, [failed])
    stuck = replace(pod(1, "Running"), deleting=True, deletion_deadline=T0)
    d = step(body, [stuck], T0 + timedelta(seconds=60))
    assert d.status.phase is Phase.RETRYING and d.status.reason == Reason.ERROR and d.create_attempt is None
    assert _condition(d, ConditionType.POD_TERMINATING)[:2] == ("True", Reason.POD_TERMINATING)


def test_a_lost_node_pod_marked_by_the_taint_manager_is_not_waited_for() -> None:
    body = job()
    step(body, [])
    step(body, [pod(1, "Running", node_name="gpu-1")])
    lost = pod(
        1, "Running", node_name="gpu-1", deleting=True, deletion_deadline=T0, disruption="DeletionByTaintManager"
    )
    d = step(body, [lost], T0 + timedelta(minutes=5))
    assert d.create_attempt == 2 and _condition(d, ConditionType.POD_TERMINATING) is None
