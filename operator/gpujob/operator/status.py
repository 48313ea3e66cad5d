"""Pure status logic: (GpuJob, its Pods, now) -> the one next state and the actions that lead there.

Like the core Job controller, one pass reads the observed state, decides ONE outcome in a fixed order
(cancel -> finished -> suspend -> current attempt's Pod -> next attempt), and returns the desired status;
the caller acts and writes status only if it changed. No I/O, no clock: `now` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from gpujob.api.constants import ConditionType, Phase, PodPhase, Reason
from gpujob.api.models import Admission, FallbackStatus, GpuJobSpec, GpuJobStatus, Progress, QueuePosition
from gpujob.api.naming import job_id_of
from gpujob.api.params import params_error
from gpujob.operator import fallback, policy
from gpujob.operator.conventions import iso, parse_time, set_condition, truncate
from gpujob.operator.podview import (
    ALIVE_POD_PHASES,
    WAITING_REASONS,
    PodView,
    failure_reason,
    rejected_by_node,
    storage_limit_exceeded,
    taken_away,
    worker_result,
)


@dataclass(frozen=True)
class Transition:
    old: Phase | None
    new: Phase
    reason: str | None
    message: str
    attempt: int


@dataclass(frozen=True)
class QueueGate:
    """The queue manager's word on a job that names a queue, while GpuQueues exist (with none at all, or for a job
    without spec.queue, there is no gate: the job is admitted at once, as before queues). `reason` is the last
    plan's Waiting reason (QuotaExceeded, QueueNotFound, NamespaceNotAllowed); None before the first plan.
    `admission`: the plan admitted the job; the pass that starts its attempt writes it into the status, in the same
    write as the attempt, before the Pod is created (`Decision.admits`)."""

    reason: str | None = None
    position: int = 0
    message: str = ""
    admission: Admission | None = None


# The queue's Waiting reasons, as status reasons (admission.Waiting spells the same values).
_WAITING: dict[str, Reason] = {
    r.value: r for r in (Reason.QUOTA_EXCEEDED, Reason.QUEUE_NOT_FOUND, Reason.NAMESPACE_NOT_ALLOWED)
}


@dataclass
class Decision:
    status: GpuJobStatus
    create_attempt: int | None = None  # create the Pod of this attempt
    delete_pods: list[str] = field(default_factory=list)
    requeue_after: float | None = None  # reconcile again after this many seconds
    delete_job: bool = False  # ttlSecondsAfterFinished elapsed
    transitions: list[Transition] = field(default_factory=list)
    previous: GpuJobStatus | None = None  # the status this pass started from (what Events are derived against)
    # The admission is written by this pass: its status must be stored before the Pod is created (a restarted
    # operator counts only what the statuses say), and carries the attempt's podName already.
    admits: bool = False


@dataclass
class _Builder:
    """Mutable working copy of the status while deciding; records phase transitions."""

    status: GpuJobStatus
    now: datetime
    generation: int | None
    transitions: list[Transition] = field(default_factory=list)
    gate: QueueGate | None = None
    awaiting_admission: bool = False  # this pass left the job Queued for its queue's admission

    def cond(self, ctype: ConditionType, on: bool, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions, ctype, on, reason, message, self.now, self.generation
        )

    def phase(self, new: Phase, reason: str | None = None, message: str = "") -> None:
        old = self.status.phase
        if old != new:
            self.transitions.append(Transition(old, new, reason, truncate(message), self.status.attempts))
        self.status.phase = new
        self.status.reason = reason
        self.status.message = truncate(message) if message else None


def _finish(b: _Builder, phase: Phase, reason: str, message: str) -> None:
    b.phase(phase, reason, message)
    b.status.completion_time = b.status.completion_time or iso(b.now)
    b.status.next_attempt_time = None
    b.cond(ConditionType.RUNNING, False, reason, message)
    if phase is Phase.SUCCEEDED:
        b.cond(ConditionType.COMPLETE, True, reason, message)
    elif phase is Phase.FAILED:
        b.cond(ConditionType.FAILED, True, reason, message)


def _start_attempt(
    b: _Builder,
    d: Decision,
    spec: GpuJobSpec,
    reason: str,
    message: str,
    pods: list[PodView],
) -> bool:
    """Start the next attempt, unless a Pod of this job is still alive (even while terminating): never two
    Pods of one job at once. Alive Pods are deleted; their deletion events bring us back here. A Pod on a lost
    node (taken by the taint manager) is not waited for: its node, and with it the Pod's process, is gone.
    A spec the worker cannot be given (params too large for its env) fails the job instead: its Pod could
    never start. A job its queue has not admitted waits Queued (the queue manager's admission brings it back)."""
    alive = [p for p in pods if p.phase in ALIVE_POD_PHASES and not p.lost]
    if alive:
        d.delete_pods += [p.name for p in alive if not p.deleting and p.name not in d.delete_pods]
        return False
    if (invalid := spec.params_error()) is not None:
        _finish(b, Phase.FAILED, Reason.INVALID_SPEC, invalid)
        _ttl(spec, b.status, b.now, d)
        return False
    if (invalid := params_error(spec.type, spec.params)) is not None:  # a typo never reserves a GPU
        _finish(b, Phase.FAILED, Reason.INVALID_PARAMS, f"invalid params for {spec.type.value}: {invalid}")
        _ttl(spec, b.status, b.now, d)
        return False
    admitted = b.gate.admission if b.gate is not None else None
    if admitted is not None and spec.queue and b.status.admission is None and b.status.fallback is None:
        b.status.admission = admitted.model_copy()  # admitted by the last plan: this pass writes it
        d.admits = True
    if b.gate is not None and spec.queue and b.status.admission is None and b.status.fallback is None:
        _wait_for_admission(b, spec.queue, b.gate)
        since = fallback.not_admitted_since(b.status)
        verdict = fallback.after_waiting(spec, since, b.now)
        if not verdict.move:
            if verdict.due is not None:
                _requeue(d, (verdict.due - b.now).total_seconds())
            return False
        waited = (b.now - since).total_seconds() if since is not None else 0.0
        _move_to_cpu(b, spec, b.status.reason or Reason.QUOTA_EXCEEDED, f"not admitted by queue {spec.queue!r}", waited)
    if spec.queue and b.status.admission is not None:
        b.status.queue = None
        b.cond(ConditionType.ADMITTED, True, Reason.ADMITTED, f"admitted by queue {b.status.admission.queue!r}")
    if b.status.fallback is not None and b.status.fallback.attempt == 0:  # the first attempt on CPU
        b.status.fallback.attempt = b.status.attempts + 1
        reason = Reason.CPU_FALLBACK
        message = f"attempt {b.status.attempts + 1} runs on CPU ({b.status.fallback.reason}: waited for a GPU)"
    b.status.attempts += 1
    b.status.pod_name = None
    b.status.node_name = None
    b.status.exit_code = None
    b.status.next_attempt_time = None
    d.create_attempt = b.status.attempts
    b.phase(Phase.SCHEDULED, reason, message)
    b.cond(ConditionType.SCHEDULED, False, Reason.POD_CREATED, f"attempt {b.status.attempts}: Pod created")
    return True


def _requeue(d: Decision, seconds: float) -> None:
    d.requeue_after = seconds if d.requeue_after is None else min(d.requeue_after, seconds)


def _move_to_cpu(b: _Builder, spec: GpuJobSpec, waited_for: str, what: str, seconds: float) -> None:
    """spec.fallback: its next attempt (and the later ones) runs on CPU. It leaves its queue: no admission, no
    position, no GPU quota counted (the queue manager leaves out jobs on CPU)."""
    b.awaiting_admission = False
    b.status.fallback = FallbackStatus(since=iso(b.now), reason=waited_for)
    b.status.admission = None
    b.status.queue = None
    after = spec.fallback.cpu_after_seconds if spec.fallback is not None else 0
    message = f"{what} for {seconds:.0f}s ({waited_for}; cpuAfterSeconds={after}): its next attempt runs on CPU"
    b.cond(ConditionType.FALLBACK, True, Reason.CPU_FALLBACK, message)
    if spec.queue:
        b.cond(ConditionType.ADMITTED, False, Reason.CPU_FALLBACK, "runs on CPU, outside its queue's GPU quota")


def _wait_for_admission(b: _Builder, queue: str, gate: QueueGate) -> None:
    """No Pod: phase Queued with the queue's reason and the job's position (Created until the first plan)."""
    b.awaiting_admission = True
    b.status.next_attempt_time = None
    b.status.pod_name = None
    reason = _WAITING.get(gate.reason or "")
    if reason is None:
        b.phase(Phase.QUEUED, Reason.CREATED, f"waiting for admission by queue {queue!r}")
        return
    message = gate.message or f"waiting for admission by queue {queue!r}"
    b.phase(Phase.QUEUED, reason, message)
    b.cond(ConditionType.ADMITTED, False, reason, message)
    b.status.queue = QueuePosition(position=gate.position)


def _preempt(b: _Builder, d: Decision, pods: list[PodView]) -> None:
    """Evicted by its queue: stop the Pod gracefully (the worker checkpoints on SIGTERM); once no Pod of the job
    is alive, hand the admission back and wait in the queue again. Not a failure: the next attempt resumes."""
    mark = b.status.preempting
    by = mark.by if mark is not None else "another job"
    alive = [p for p in pods if p.phase in ALIVE_POD_PHASES and not p.lost]
    if alive:
        d.delete_pods += [p.name for p in alive if not p.deleting and p.name not in d.delete_pods]
        b.cond(ConditionType.ADMITTED, False, Reason.PREEMPTED, f"preempted by {by}: stopping the Pod")
        return
    b.status.preempting = None
    b.status.admission = None
    b.status.preemptions += 1
    b.status.next_attempt_time = None
    message = f"preempted by {by}; waits for its queue again"
    b.phase(Phase.QUEUED, Reason.PREEMPTED, message)
    b.cond(ConditionType.RUNNING, False, Reason.PREEMPTED, message)
    b.cond(ConditionType.ADMITTED, False, Reason.PREEMPTED, message)


def _attempt_failed(b: _Builder, d: Decision, spec: GpuJobSpec, pod: PodView, reason: str, msg: str) -> None:
    """The job's own failure: count it, then fail for good or schedule the next attempt after the back-off."""
    b.status.failures += 1
    b.status.exit_code = pod.exit_code
    retries = spec.retries
    if pod.exit_code is not None and pod.exit_code in retries.non_retryable_exit_codes:
        _finish(
            b,
            Phase.FAILED,
            Reason.NON_RETRYABLE_EXIT_CODE,
            f"exit code {pod.exit_code} is non-retryable; {msg}",
        )
    elif reason == Reason.DEADLINE_EXCEEDED:
        _finish(b, Phase.FAILED, reason, msg)
    elif b.status.failures > retries.limit:
        _finish(
            b,
            Phase.FAILED,
            reason,
            f"{msg}; retry limit {retries.limit} reached after {b.status.attempts} attempts",
        )
    else:
        delay, due = policy.next_attempt(spec.retries, b.status.failures, b.now)
        b.status.next_attempt_time = iso(due)
        b.phase(Phase.RETRYING, reason, f"{msg}; attempt {b.status.attempts + 1} in {delay:g}s")
        b.cond(ConditionType.RUNNING, False, reason, msg)
        d.requeue_after = (due - b.now).total_seconds()


def decide(
    body: dict[str, Any],
    pods: list[PodView],
    now: datetime,
    *,
    spec: GpuJobSpec | None = None,
    gate: QueueGate | None = None,
    duplicate_of: str | None = None,
) -> Decision:
    """The next status of a GpuJob and what to do to get there. `pods` are this job's Pods (any attempt).
    `gate`: the queue's word while queues are in use (None: admitted at once, as a job without spec.queue).
    `duplicate_of`: "namespace/name" of an older GpuJob with the same jobId (a jobId names one job cluster-wide:
    this one fails, DuplicateJobId, and its Pods go)."""
    meta = body.get("metadata") or {}
    generation = meta.get("generation")
    current = GpuJobStatus.model_validate(body.get("status") or {})
    b = _Builder(current.model_copy(deep=True), now, generation, gate=gate)
    b.status.observed_generation = generation
    d = Decision(status=b.status, previous=current)

    if spec is None:
        try:
            spec = GpuJobSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            if not (b.status.phase and b.status.phase.terminal):
                _finish(b, Phase.FAILED, Reason.INVALID_SPEC, f"invalid spec: {exc}".replace("\n", " "))
            d.transitions = b.transitions
            return d

    # Pods of newer attempts than status knows (status write lost after a create) are adopted.
    newest = max((p.attempt for p in pods), default=0)
    adopted = newest > b.status.attempts
    if adopted:
        b.status.attempts = newest
    by_attempt = {p.attempt: p for p in pods}
    pod = by_attempt.get(b.status.attempts)
    stale = [p.name for p in pods if p.attempt != b.status.attempts and p.active]

    if b.status.phase is None:
        b.phase(Phase.QUEUED, Reason.CREATED, "GpuJob accepted")
    if b.status.progress is None and not (b.status.phase and b.status.phase.terminal):
        b.status.progress = Progress()  # 0 % from the start: `kubectl get gj` shows it before the worker reports
    phase = b.status.phase or Phase.QUEUED
    if (refused := fallback.unsupported(spec)) is not None and not phase.terminal:
        b.cond(ConditionType.FALLBACK, False, Reason.CPU_FALLBACK_UNSUPPORTED, refused)

    if phase.terminal:
        d.delete_pods = [p.name for p in pods if p.active]
        _ttl(spec, b.status, now, d)
    elif duplicate_of is not None:
        d.delete_pods = [p.name for p in pods if p.active]
        _finish(
            b,
            Phase.FAILED,
            Reason.DUPLICATE_JOB_ID,
            f"jobId {job_id_of(body)!r} is already GpuJob {duplicate_of}'s: a jobId names one job in the cluster "
            "(its progress channel, events and artifacts are per jobId); use another jobId",
        )
        _ttl(spec, b.status, now, d)
    elif spec.cancel:
        d.delete_pods = [p.name for p in pods if p.active]
        _finish(b, Phase.CANCELLED, Reason.CANCELLED, "cancelled on request")
        b.cond(ConditionType.SCHEDULED, False, Reason.CANCELLED, "cancelled")
        _ttl(spec, b.status, now, d)
    elif spec.suspend:
        d.delete_pods = [p.name for p in pods if p.active]
        b.status.next_attempt_time = None
        b.phase(Phase.SUSPENDED, Reason.SUSPENDED, "spec.suspend is true")
        if spec.queue and b.status.admission is not None:  # a suspended job holds no quota: admitted again later
            b.status.admission = None
            b.cond(ConditionType.ADMITTED, False, Reason.SUSPENDED, "suspended: the queue's quota is released")
        b.cond(ConditionType.SUSPENDED, True, Reason.SUSPENDED, "spec.suspend is true")
        b.cond(ConditionType.RUNNING, False, Reason.SUSPENDED, "suspended")
    elif b.status.preempting is not None and not (pod is not None and pod.phase == PodPhase.SUCCEEDED):
        _preempt(b, d, pods)
    elif adopted and pod is not None:
        # A Pod newer than the status we read: our own status write was lost (or we read a stale copy).
        # Follow the Pod; never treat it as the failed attempt's.
        b.status.next_attempt_time = None
        _observe_pod(b, d, spec, pod, now, pods)
    elif b.status.phase is Phase.SUSPENDED:
        # Resumed when its Pod is created, or when it waits for its queue's admission (phase Queued).
        if _start_attempt(b, d, spec, Reason.RESUMED, "resumed", pods) or b.awaiting_admission:
            b.cond(ConditionType.SUSPENDED, False, Reason.RESUMED, "spec.suspend is false")
    elif b.status.phase is Phase.RETRYING:
        due = parse_time(b.status.next_attempt_time) or now
        if pod is not None and pod.active:
            d.delete_pods.append(pod.name)
        elif pod is not None and pod.deleting and not pod.lost:
            pass  # wait until the failed attempt's Pod is gone: never two Pods of one job at once
        elif due <= now:
            _start_attempt(
                b, d, spec, Reason.POD_CREATED, f"retrying after {b.status.failures} failed attempt(s)", pods
            )
        else:
            d.requeue_after = (due - now).total_seconds()
    elif b.status.attempts == 0:
        _start_attempt(b, d, spec, Reason.POD_CREATED, "Pod created", pods)
    elif b.status.phase is Phase.QUEUED and b.status.reason == Reason.QUOTA_EXCEEDED:
        # The API server's ResourceQuota refused the last try (wait_for_quota): try again (the queue's gate, if
        # any, still applies in _start_attempt).
        _start_attempt(b, d, spec, Reason.POD_CREATED, f"attempt {b.status.attempts + 1}: Pod created", pods)
    elif b.status.phase is Phase.QUEUED and spec.queue:
        # Back in its queue (preempted, or resumed): the next attempt once admitted again; its old Pod is over.
        _start_attempt(b, d, spec, Reason.POD_CREATED, f"admitted again; attempt {b.status.attempts + 1}", pods)
    elif pod is None and _admitted_pod_pending(spec, b.status):
        # The admission and the attempt were written, the Pod not created yet (an operator stopped in between, or
        # its create failed): create that attempt's Pod, no new attempt.
        d.create_attempt = b.status.attempts
    elif pod is None:
        # The Pod of the current attempt vanished from outside (node loss, preemption, kubectl delete):
        # start over without charging the job for it.
        _start_attempt(
            b, d, spec, Reason.POD_DELETED, f"Pod of attempt {b.status.attempts} was deleted; new attempt", pods
        )
    else:
        _observe_pod(b, d, spec, pod, now, pods)
    d.delete_pods += [name for name in stale if name not in d.delete_pods]
    if not (b.status.phase and b.status.phase.terminal):
        _stuck_terminating(b, d, pods, now)
    if b.status.phase is Phase.SUCCEEDED:
        b.status.progress = Progress(percent=100.0, message=(b.status.progress.message if b.status.progress else ""))
    d.transitions = b.transitions
    return d


def _admitted_pod_pending(spec: GpuJobSpec, status: GpuJobStatus) -> bool:
    """A queued job's attempt whose status was written before its Pod (Decision.admits) and whose Pod has never
    been seen bound: Scheduled, podName set, condition Scheduled False with reason PodCreated. (An unbound Pod
    deleted from outside looks the same: it is made again under the same attempt, also not a failure.)"""
    if not (spec.queue and status.admission is not None and status.phase is Phase.SCHEDULED and status.pod_name):
        return False
    held = next((c for c in status.conditions if c.type == ConditionType.SCHEDULED), None)
    return held is not None and held.status == "False" and held.reason == Reason.POD_CREATED


def _observe_pod(b: _Builder, d: Decision, spec: GpuJobSpec, pod: PodView, now: datetime, pods: list[PodView]) -> None:
    b.status.pod_name = pod.name
    b.status.node_name = pod.node_name or b.status.node_name
    if pod.lost:  # its node is gone: a new attempt now, not the job's failure
        where = f" on lost node {pod.node_name}" if pod.node_name else ""
        _start_attempt(b, d, spec, Reason.EVICTED, f"attempt {pod.attempt} evicted{where} ({pod.disruption})", pods)
        return
    if pod.deleting and pod.phase not in {PodPhase.SUCCEEDED, PodPhase.FAILED}:
        return  # being deleted from outside: the next attempt starts once it is gone
    if pod.phase == PodPhase.PENDING:
        if pod.node_name:
            b.cond(ConditionType.SCHEDULED, True, Reason.POD_PENDING, f"bound to {pod.node_name}")
        reason: Reason | None = WAITING_REASONS.get(pod.reason or "", Reason.UNSCHEDULABLE if pod.reason else None)
        if reason is not None:
            # Stuck, not on its way: Pending with the Pod's reason and the scheduler's (or kubelet's) message.
            b.cond(ConditionType.SCHEDULED, bool(pod.node_name), reason, pod.message or reason)
            b.phase(Phase.PENDING, reason, pod.message or "")
        elif b.status.phase is not Phase.SCHEDULED:
            b.phase(Phase.SCHEDULED, Reason.POD_PENDING, f"attempt {pod.attempt} pending")
        since = pod.created or now
        if reason == Reason.UNSCHEDULABLE and b.status.fallback is None:
            verdict = fallback.after_waiting(spec, since, now)
            if verdict.move:  # not a failure: the Pod goes, the next attempt (on CPU) follows once it is gone
                d.delete_pods.append(pod.name)
                what = f"attempt {pod.attempt}'s Pod unschedulable"
                _move_to_cpu(b, spec, Reason.UNSCHEDULABLE, what, (now - since).total_seconds())
                return
            if verdict.due is not None:
                _requeue(d, (verdict.due - now).total_seconds())
        deadline = since + timedelta(seconds=spec.pending_timeout_seconds)
        if now >= deadline:
            d.delete_pods.append(pod.name)
            why: str = reason or Reason.PENDING_TIMEOUT
            msg = f"Pod pending longer than pendingTimeoutSeconds={spec.pending_timeout_seconds}"
            _attempt_failed(b, d, spec, pod, why, f"{msg} ({pod.message or why})")
        else:
            _requeue(d, (deadline - now).total_seconds())
    elif pod.phase == PodPhase.RUNNING and pod.worker_finished and not pod.disruption:
        # The worker is done but the Pod runs on: a sidecar container outlives it. The worker's exit code is
        # the attempt's outcome; the Pod (and with it the sidecar) is deleted.
        d.delete_pods.append(pod.name)
        if pod.exit_code == 0:
            _succeed(b, d, spec, pod, now)
        else:
            failure, message = failure_reason(pod)
            _attempt_failed(b, d, spec, pod, failure, message)
            if b.status.phase is Phase.FAILED:
                _ttl(spec, b.status, now, d)
    elif pod.phase == PodPhase.RUNNING:
        b.status.start_time = b.status.start_time or iso(pod.started_at or now)
        b.cond(ConditionType.SCHEDULED, True, Reason.POD_RUNNING, f"running on {pod.node_name}")
        b.cond(ConditionType.RUNNING, True, Reason.POD_RUNNING, f"attempt {pod.attempt} running")
        b.phase(Phase.RUNNING, Reason.POD_RUNNING, f"attempt {pod.attempt} running on {pod.node_name}")
    elif pod.phase in {PodPhase.SUCCEEDED, PodPhase.FAILED} and (taken := taken_away(pod)) is not None:
        if not pod.deleting:
            d.delete_pods.append(pod.name)
        if rejected_by_node(pod):
            # The kubelet's reason and message are kept: the status says which node refused and why.
            restart = Reason.NODE_REJECTED
            where = f" by node {pod.node_name}" if pod.node_name else ""
            text = f"attempt {pod.attempt} rejected{where} ({taken}): {pod.message or ''}".rstrip(": ")
            b.cond(ConditionType.RUNNING, False, restart, text)
        else:
            restart = Reason.POD_DELETED if taken == "deleted" else Reason.EVICTED
            text = f"attempt {pod.attempt} {taken}: {pod.message or ''}".rstrip(": ")
        _start_attempt(b, d, spec, restart, text, pods)
    elif pod.phase == PodPhase.SUCCEEDED:
        _succeed(b, d, spec, pod, now)
    elif pod.phase == PodPhase.FAILED:
        if pod.exit_code == 0 and not storage_limit_exceeded(pod):
            # the worker succeeded; another container of its Pod (a sidecar) failed
            _succeed(b, d, spec, pod, now)
            return
        failure, message = failure_reason(pod)
        _attempt_failed(b, d, spec, pod, failure, message)
        if b.status.phase is Phase.FAILED:
            _ttl(spec, b.status, now, d)


# Phases whose reason the stuck Pod is: its attempt is the current one (Retrying, Suspended, Queued keep theirs).
_ATTEMPT_PHASES = frozenset({Phase.SCHEDULED, Phase.PENDING, Phase.RUNNING})


def _stuck_terminating(b: _Builder, d: Decision, pods: list[PodView], now: datetime) -> None:
    """A Pod of the job still Pending/Running past its deletion's grace period: the next attempt waits for it to
    be gone (never two Pods of one job), and the status says why. Condition PodTerminating: True with reason
    PodTerminating (finalizers hold it) or NodeLost (bound to a node whose kubelet never confirms its end; a real
    cluster frees it by a force delete or the node.kubernetes.io/out-of-service taint), since when; False with
    PodGone once it is gone. A Pod whose grace period runs on is looked at again when it ends."""
    overdue = sorted((p for p in pods if p.overdue(now)), key=lambda p: (p.deletion_deadline or now, p.name))
    if not overdue:
        held = next((c for c in b.status.conditions if c.type == ConditionType.POD_TERMINATING), None)
        if held is not None and held.status == "True":
            b.cond(ConditionType.POD_TERMINATING, False, Reason.POD_GONE, "the terminating Pod is gone")
        due = [p.deletion_deadline for p in pods if p.deleting and p.phase in ALIVE_POD_PHASES and not p.lost]
        if due := [t for t in due if t is not None]:
            wait = (min(due) - now).total_seconds()
            d.requeue_after = wait if d.requeue_after is None else min(d.requeue_after, wait)
        return
    pod = overdue[0]
    since = iso(pod.deletion_deadline or now)
    late = int((now - (pod.deletion_deadline or now)).total_seconds())
    if pod.finalizers:
        reason, why = Reason.POD_TERMINATING, f"held by finalizers {', '.join(pod.finalizers)}"
    elif pod.node_name:
        reason = Reason.NODE_LOST
        why = (
            f"node {pod.node_name} has not confirmed its end (a lost node: force delete the Pod, or taint the node "
            "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute)"
        )
    else:
        reason, why = Reason.POD_TERMINATING, "its end is not confirmed"
    message = (
        f"Pod {pod.name} is still {pod.phase} past its deletion's grace period (since {since}, {late}s when "
        f"seen): {why}; the next attempt waits until it is gone"
    )
    held = next((c for c in b.status.conditions if c.type == ConditionType.POD_TERMINATING), None)
    if held is not None and held.status == "True" and held.reason == reason and pod.name in held.message:
        message = held.message  # said once, with the time it was first seen late: no write on every pass
    b.cond(ConditionType.POD_TERMINATING, True, reason, message)
    if b.status.phase in _ATTEMPT_PHASES and pod.attempt == b.status.attempts:
        b.phase(b.status.phase, reason, message)


def _succeed(b: _Builder, d: Decision, spec: GpuJobSpec, pod: PodView, now: datetime) -> None:
    b.status.start_time = b.status.start_time or iso(pod.started_at or now)
    b.status.exit_code = pod.exit_code if pod.exit_code is not None else 0
    b.status.artifacts, b.status.metrics = worker_result(pod.result)
    _finish(b, Phase.SUCCEEDED, Reason.SUCCEEDED, f"attempt {pod.attempt} succeeded")
    _ttl(spec, b.status, now, d)


def _ttl(spec: GpuJobSpec, status: GpuJobStatus, now: datetime, d: Decision) -> None:
    done = parse_time(status.completion_time)
    if spec.ttl_seconds_after_finished is None or done is None:
        return
    expiry = done + timedelta(seconds=spec.ttl_seconds_after_finished)
    if now >= expiry:
        d.delete_job = True
    else:
        d.requeue_after = (expiry - now).total_seconds()


def status_patch(old: dict[str, Any], new: GpuJobStatus) -> dict[str, Any]:
    """A JSON merge-patch turning the stored status into `new` ({} when nothing changed).
    Keys the operator does not own (kopf's bookkeeping, progress written by the mirror) are left alone."""
    wanted = new.wire()
    patch: dict[str, Any] = {}
    for key in GpuJobStatus.model_fields:
        alias = GpuJobStatus.model_fields[key].alias or key
        if wanted.get(alias) != old.get(alias) and not (alias not in wanted and old.get(alias) in (None, [], {})):
            patch[alias] = wanted.get(alias)
    return patch


def without_worker_output(status: GpuJobStatus) -> GpuJobStatus:
    """`status` less what the worker's termination message put there (artifacts, metrics): what is written when
    the API server refused the full status, so that worker output can never keep a job from its phase."""
    return status.model_copy(update={"artifacts": [], "metrics": {}}, deep=True)


def wait_for_quota(d: Decision, message: str, now: datetime, generation: int | None) -> Decision:
    """`d` decided to create a Pod and the API server's ResourceQuota refused it (403 `exceeded quota`): the
    attempt never started. As the Job controller does, the job waits and is retried with back-off (the caller's
    timer): phase Queued, reason QuotaExceeded, the API server's message; nothing counted. Whatever else the pass
    observed (an earlier Pod's end) stays."""
    attempt = d.create_attempt or 0
    status = d.status.model_copy(deep=True)
    # The transitions into Scheduled of the attempt that never started did not happen.
    dropped = [t for t in d.transitions if t.new is Phase.SCHEDULED and t.attempt == attempt]
    status.phase = dropped[0].old if dropped else status.phase
    status.attempts = max(0, attempt - 1) if attempt else status.attempts
    status.pod_name = None
    status.next_attempt_time = None
    b = _Builder(status, now, generation)
    text = f"Pod of attempt {attempt} refused: {message}" if attempt else message
    b.phase(Phase.QUEUED, Reason.QUOTA_EXCEEDED, text)
    b.cond(ConditionType.SCHEDULED, False, Reason.QUOTA_EXCEEDED, text)
    kept = [t for t in d.transitions if t not in dropped]
    return Decision(status=b.status, transitions=kept + b.transitions, previous=d.previous)


def fail_now(body: dict[str, Any], reason: str, message: str, now: datetime) -> Decision:
    """Fail a job outright (e.g. the API server refuses its Pod): terminal, with the reason."""
    status = GpuJobStatus.model_validate(body.get("status") or {})
    b = _Builder(status.model_copy(deep=True), now, (body.get("metadata") or {}).get("generation"))
    b.status.observed_generation = b.generation
    _finish(b, Phase.FAILED, reason, message)
    return Decision(status=b.status, transitions=b.transitions, previous=status)
