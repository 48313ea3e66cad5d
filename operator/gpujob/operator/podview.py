"""What the status logic reads of a Pod: a small `PodView` (kept for every job in the operator's cache) and the
reading of how it ended: taken away from outside (not the job's fault) or the job's own failure, with a reason."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gpujob.api.constants import ExitCode, Label, PodPhase, Reason
from gpujob.operator.conventions import parse_time

# Pod/container reasons that mean "not this job's fault": the Pod was taken away from outside.
ALIVE_POD_PHASES = frozenset({PodPhase.PENDING, PodPhase.RUNNING, PodPhase.UNKNOWN})  # a process may still be running
EXTERNAL_POD_REASONS = frozenset({"Evicted", "Preempting", "Preempted", "Shutdown", "NodeShutdown", "Terminated"})
# The control plane marks a Pod it takes away (scheduler preemption, taint eviction, the Eviction API, Pod GC,
# the kubelet's node-pressure eviction and node shutdown) with this condition; its status.reason may be unset.
DISRUPTION_CONDITION = "DisruptionTarget"
# The taint manager's reason: the Pod's node has been NotReady/unreachable past the Pod's toleration (its kubelet
# is gone). Such a Pod keeps its last phase (Running) with a deletionTimestamp until the node comes back or is
# deleted: nobody is left to report its end. Like the Job controller's podReplacementPolicy TerminatingOrFailed,
# it counts as gone, so the next attempt need not wait for a node that may never return.
LOST_NODE_DISRUPTION = "DeletionByTaintManager"
# A container stopped by its Pod's deletion ends on SIGTERM (the worker saves a checkpoint and exits 143) or on
# the SIGKILL after the grace period (137); a Pod deleted before its container ran has no exit code.
KILLED_BY_DELETION = frozenset({None, 128 + 15, 128 + 9})
WAITING_REASONS = {
    "ImagePullBackOff": Reason.IMAGE_PULL_BACKOFF,
    "ErrImagePull": Reason.ERR_IMAGE_PULL,
    "InvalidImageName": Reason.ERR_IMAGE_PULL,
    "CreateContainerConfigError": Reason.CREATE_CONTAINER_CONFIG_ERROR,
    "CreateContainerError": Reason.CREATE_CONTAINER_CONFIG_ERROR,
}


@dataclass(frozen=True)
class PodView:
    """What the status logic needs of a Pod (small: kept for every job in the operator's cache)."""

    name: str
    attempt: int
    phase: str = PodPhase.PENDING
    created: datetime | None = None
    deleting: bool = False
    node_name: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    reason: str | None = None  # the most specific reason: terminated/waiting container reason, pod reason
    message: str | None = None
    result: str | None = None  # the worker's termination message (JSON)
    resource_version: str | None = None
    disruption: str | None = None  # reason of a DisruptionTarget=True condition: taken away from outside

    @property
    def active(self) -> bool:
        return self.phase in ALIVE_POD_PHASES and not self.deleting

    @property
    def lost(self) -> bool:
        """Being deleted by the taint manager because its node is lost: counted as gone (see
        LOST_NODE_DISRUPTION), though its phase is still Pending/Running."""
        return self.deleting and self.disruption == LOST_NODE_DISRUPTION and self.phase in ALIVE_POD_PHASES


def pod_view(pod: dict[str, Any]) -> PodView:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    spec = pod.get("spec") or {}
    attempt = int((meta.get("labels") or {}).get(Label.ATTEMPT, "0") or 0)
    reason, message = status.get("reason"), status.get("message")
    exit_code = result = None
    started = finished = None
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "terminated" in state:
            term = state["terminated"]
            exit_code, result = term.get("exitCode"), term.get("message")
            reason = reason or term.get("reason")
            message = message or (None if result else term.get("message"))
            started, finished = parse_time(term.get("startedAt")), parse_time(term.get("finishedAt"))
        elif "waiting" in state and state["waiting"].get("reason") in WAITING_REASONS:
            reason, message = state["waiting"]["reason"], state["waiting"].get("message")
        elif "running" in state:
            started = parse_time(state["running"].get("startedAt"))
    if status.get("phase", PodPhase.PENDING) == PodPhase.PENDING and not reason:
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                reason, message = cond.get("reason") or Reason.UNSCHEDULABLE, cond.get("message")
    return PodView(
        name=meta.get("name", ""),
        attempt=attempt,
        phase=status.get("phase") or PodPhase.PENDING,
        created=parse_time(meta.get("creationTimestamp")),
        deleting=bool(meta.get("deletionTimestamp")),
        node_name=spec.get("nodeName"),
        started_at=started or parse_time(status.get("startTime")),
        finished_at=finished,
        exit_code=exit_code,
        reason=reason,
        message=message,
        result=result,
        resource_version=meta.get("resourceVersion"),
        disruption=next(
            (
                c.get("reason") or DISRUPTION_CONDITION
                for c in status.get("conditions") or []
                if c.get("type") == DISRUPTION_CONDITION and c.get("status") == "True"
            ),
            None,
        ),
    )


# Worker exit codes with a reason of their own (the rest are `Error`).
_EXIT_REASONS: dict[int, Reason] = {
    ExitCode.OUT_OF_MEMORY: Reason.OUT_OF_MEMORY,
    ExitCode.GPU_UNAVAILABLE: Reason.GPU_UNAVAILABLE,
}


def taken_away(pod: PodView) -> str | None:
    """Why a Failed Pod ended from outside (not the job's failure: the next attempt starts at once, uncounted),
    or None when the job failed by itself."""
    if pod.reason in EXTERNAL_POD_REASONS:
        return pod.reason
    if pod.disruption:
        return pod.disruption
    if pod.reason in {Reason.OOM_KILLED, Reason.DEADLINE_EXCEEDED}:
        return None
    if pod.deleting and pod.exit_code in KILLED_BY_DELETION:
        return "deleted"  # kubectl delete pod: the kubelet reports the killed container's Failed phase first
    return None


def failure_reason(pod: PodView) -> tuple[str, str]:
    if pod.reason == Reason.DEADLINE_EXCEEDED:
        return Reason.DEADLINE_EXCEEDED, pod.message or "attempt exceeded timeoutSeconds"
    if pod.reason == Reason.OOM_KILLED:
        return Reason.OOM_KILLED, f"attempt {pod.attempt} was OOM-killed (exit code {pod.exit_code})"
    text = f"attempt {pod.attempt} failed with exit code {pod.exit_code}"
    reason = _EXIT_REASONS.get(pod.exit_code, Reason.ERROR) if pod.exit_code is not None else Reason.ERROR
    if pod.result and not pod.result.lstrip().startswith("{"):
        text += f": {pod.result.strip()}"
    else:
        try:
            error = json.loads(pod.result or "{}").get("error")
        except (ValueError, AttributeError):
            error = None
        if error:
            text += f": {error}"
    return reason, text
