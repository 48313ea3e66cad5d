"""decide() and queues (docs/queues.md): a job that names a queue gets its Pod only once admitted
(status.admission); without a gate (no GpuQueue at all, or no spec.queue) nothing changes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from gpujob.api.constants import ConditionType, Phase, Reason
from gpujob.operator.conventions import iso
from gpujob.operator.status import Decision, QueueGate, decide
from tests.unit.test_status import T0, cond, job, pod

ADMISSION = {"queue": "team-a", "admittedAt": iso(T0), "resources": {"nvidia.com/gpu": 1}}
FULL = QueueGate("QuotaExceeded", 2, "position 2 in queue 'team-a'")


def step(body: dict[str, Any], pods: list[Any], gate: QueueGate | None, now: Any = T0) -> Decision:
    d = decide(body, pods, now, gate=gate)
    body["status"] = d.status.wire()
    return d


def test_a_job_its_queue_has_not_admitted_waits_queued_with_the_reason_and_position() -> None:
    body = job({"queue": "team-a"})
    d = step(body, [], FULL)
    assert d.create_attempt is None and d.delete_pods == []
    assert d.status.phase is Phase.QUEUED and d.status.reason == Reason.QUOTA_EXCEEDED
    assert d.status.message == "position 2 in queue 'team-a'"
    assert cond(d, ConditionType.ADMITTED) == ("False", Reason.QUOTA_EXCEEDED)
    assert d.status.queue is not None and d.status.queue.position == 2
    assert d.status.attempts == 0
    assert body["status"]["queue"] == {"position": 2}


def test_the_position_follows_the_gate_and_a_missing_queue_says_so() -> None:
    body = job({"queue": "nope"})
    step(body, [], FULL)
    d = step(body, [], QueueGate("QueueNotFound", 0, "GpuQueue 'nope' does not exist"))
    assert d.status.reason == Reason.QUEUE_NOT_FOUND and cond(d, ConditionType.ADMITTED)[1] == Reason.QUEUE_NOT_FOUND
    assert d.status.queue is not None and d.status.queue.position == 0
    d = step(body, [], QueueGate("NamespaceNotAllowed", 0, "no"))
    assert d.status.reason == Reason.NAMESPACE_NOT_ALLOWED and d.create_attempt is None


def test_before_the_first_plan_the_job_waits_as_created() -> None:
    d = step(job({"queue": "team-a"}), [], QueueGate())
    assert d.create_attempt is None and d.status.phase is Phase.QUEUED and d.status.reason == Reason.CREATED
    assert not [c for c in d.status.conditions if c.type == ConditionType.ADMITTED]


def test_once_admitted_the_pod_is_created_and_the_condition_turns_true() -> None:
    body = job({"queue": "team-a"})
    step(body, [], FULL)
    body["status"]["admission"] = ADMISSION
    d = step(body, [], FULL, T0 + timedelta(seconds=5))  # a stale plan: the admission in the status wins
    assert d.create_attempt == 1 and d.status.phase is Phase.SCHEDULED
    assert cond(d, ConditionType.ADMITTED) == ("True", Reason.ADMITTED)
    assert d.status.queue is None and "queue" not in body["status"]
    assert [t.new for t in d.transitions] == [Phase.SCHEDULED]


def test_no_gate_or_no_queue_means_admitted_at_once_as_before() -> None:
    for body, gate in ((job({"queue": "team-a"}), None), (job(), FULL)):
        d = step(body, [], gate)
        assert d.create_attempt == 1 and d.status.phase is Phase.SCHEDULED
        assert not [c for c in d.status.conditions if c.type == ConditionType.ADMITTED]
        assert d.status.admission is None and d.status.queue is None


def test_an_admitted_job_keeps_its_admission_through_retries() -> None:
    body = job({"queue": "team-a", "retries": {"limit": 1, "backoffSeconds": 1}})
    body["status"] = {"admission": ADMISSION}
    step(body, [], FULL)
    d = step(body, [pod(1, "Failed", exit_code=1)], FULL)
    assert d.status.phase is Phase.RETRYING and d.status.admission is not None
    d = step(body, [pod(1, "Failed", exit_code=1, deleting=True)], FULL, T0 + timedelta(seconds=2))
    d = step(body, [], FULL, T0 + timedelta(seconds=2))
    assert d.create_attempt == 2


def test_suspending_releases_the_admission() -> None:
    body = job({"queue": "team-a"})
    body["status"] = {"admission": ADMISSION}
    step(body, [], FULL)
    body["spec"]["suspend"] = True
    d = step(body, [pod(1, "Running")], FULL)
    assert d.status.phase is Phase.SUSPENDED and d.status.admission is None and "admission" not in body["status"]
    assert cond(d, ConditionType.ADMITTED) == ("False", Reason.SUSPENDED)
    body["spec"]["suspend"] = False
    d = step(body, [], FULL)
    assert d.create_attempt is None and d.status.phase is Phase.QUEUED and d.status.reason == Reason.QUOTA_EXCEEDED
    assert cond(d, ConditionType.SUSPENDED) == ("False", Reason.RESUMED)


def test_a_preempted_job_stops_its_pod_then_waits_again_and_is_not_failed() -> None:
    body = job({"queue": "team-a", "retries": {"limit": 0}})
    body["status"] = {"admission": ADMISSION}
    step(body, [], FULL)
    step(body, [pod(1, "Running", node_name="n1")], FULL)
    body["status"]["preempting"] = {"by": "ml/urgent", "since": iso(T0)}
    d = step(body, [pod(1, "Running", node_name="n1")], FULL)
    assert d.delete_pods == ["j-1"] and d.status.phase is Phase.RUNNING, "the Pod first stops, gracefully"
    assert cond(d, ConditionType.ADMITTED) == ("False", Reason.PREEMPTED) and d.status.admission is not None
    d = step(body, [pod(1, "Running", node_name="n1", deleting=True)], FULL)
    assert d.delete_pods == [] and d.status.preemptions == 0
    d = step(body, [pod(1, "Failed", exit_code=143)], FULL)  # the worker checkpointed and exited on SIGTERM
    assert d.status.phase is Phase.QUEUED and d.status.reason == Reason.PREEMPTED and "ml/urgent" in d.status.message
    assert d.status.preemptions == 1 and d.status.failures == 0 and d.create_attempt is None
    assert d.status.admission is None and d.status.preempting is None
    assert "admission" not in body["status"] and "preempting" not in body["status"]
    d = step(body, [pod(1, "Failed", exit_code=143)], FULL)  # waits for its queue, the old Pod is not a failure
    assert d.status.phase is Phase.QUEUED and d.status.reason == Reason.QUOTA_EXCEEDED and d.status.failures == 0
    body["status"]["admission"] = ADMISSION
    d = step(body, [pod(1, "Failed", exit_code=143)], FULL)
    assert d.create_attempt == 2 and d.status.phase is Phase.SCHEDULED and d.status.failures == 0
    assert d.status.preemptions == 1


def test_a_job_that_succeeded_while_being_preempted_succeeds() -> None:
    body = job({"queue": "team-a"})
    body["status"] = {
        "admission": ADMISSION,
        "attempts": 1,
        "phase": "Running",
        "preempting": {"by": "x", "since": iso(T0)},
    }
    d = step(body, [pod(1, "Succeeded", exit_code=0)], FULL)
    assert d.status.phase is Phase.SUCCEEDED and d.status.preemptions == 0


def test_queue_events_follow_the_admitted_condition_not_each_position() -> None:
    from gpujob.api.constants import EventReason
    from gpujob.operator.kevents import events_for

    def events(body: dict[str, Any], pods: list[Any], gate: QueueGate | None) -> list[tuple[str, str]]:
        d = decide(body, pods, T0, gate=gate)
        assert d.previous is not None
        out = events_for(d.previous, d, 1)
        body["status"] = d.status.wire()
        return [(e.reason, e.note) for e in out]

    body = job({"queue": "team-a"})
    assert events(body, [], FULL) == [(EventReason.QUEUED, "QuotaExceeded: position 2 in queue 'team-a'")]
    assert events(body, [], QueueGate("QuotaExceeded", 1, "position 1 in queue 'team-a'")) == []
    body["status"]["admission"] = ADMISSION
    assert [r for r, _ in events(body, [], FULL)] == [EventReason.ADMITTED, EventReason.ATTEMPT_STARTED]
    body["status"]["preempting"] = {"by": "ml/urgent", "since": iso(T0)}
    assert [r for r, _ in events(body, [pod(1, "Running", node_name="n")], FULL)] == [EventReason.PREEMPTED]
    assert events(body, [], FULL) == []  # stopped: the same condition, no new Event


def _admitting() -> QueueGate:
    from gpujob.api.models import Admission

    return QueueGate(admission=Admission.model_validate(ADMISSION))


def test_a_plan_s_admission_is_written_by_the_pass_that_starts_the_attempt_before_its_pod() -> None:
    """The queue manager writes nothing for an admission: the gate carries it, and the pass that starts the
    attempt writes it with the attempt (one write), the Pod after it (Decision.admits)."""
    body = job({"queue": "team-a"})
    step(body, [], FULL)
    d = step(body, [], _admitting())
    assert d.admits and d.create_attempt == 1 and d.status.phase is Phase.SCHEDULED
    assert body["status"]["admission"] == ADMISSION
    assert cond(d, ConditionType.ADMITTED) == ("True", Reason.ADMITTED)
    # An admission already in the status is the job's own: a later pass does not write it again.
    assert not decide(body, [], T0, gate=_admitting()).admits


def test_an_admitted_attempt_whose_pod_was_never_made_gets_that_pod_not_a_new_attempt() -> None:
    """The operator stopped between the status write (admission, attempt 1, podName) and the Pod's create: the
    next pass creates attempt 1's Pod; nothing is counted, no deletion is assumed."""
    body = job({"queue": "team-a"})
    step(body, [], _admitting())
    body["status"]["podName"] = "j-1"  # as the reconciler writes it with the admission
    d = step(body, [], _admitting(), T0 + timedelta(seconds=30))
    assert d.create_attempt == 1 and not d.admits and d.transitions == []
    assert d.status.attempts == 1 and d.status.failures == 0 and d.status.phase is Phase.SCHEDULED
    # Once the Pod was seen bound, its disappearance is a deletion from outside: a new attempt.
    bound = step(body, [pod(1, node_name="n1")], None)
    assert bound.create_attempt is None
    d = step(body, [], None, T0 + timedelta(seconds=60))
    assert d.create_attempt == 2 and d.status.reason == Reason.POD_DELETED
