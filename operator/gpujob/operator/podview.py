"""What the status logic reads of a Pod: a small `PodView` (kept for every job in the operator's cache) and the
reading of how it ended: taken away from outside (not the job's fault) or the job's own failure, with a reason."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from gpujob.api.constants import (
    CONTAINER_NAME,
    INT64_MAX,
    MAX_ARTIFACTS,
    MAX_METRIC_NAME_CHARS,
    MAX_METRICS,
    MAX_RESULT_CHARS,
    ExitCode,
    Label,
    PodPhase,
    Reason,
)
from gpujob.api.models import Artifact
from gpujob.operator.conventions import parse_time, utf8

# Pod/container reasons that mean "not this job's fault": the Pod was taken away from outside.
ALIVE_POD_PHASES = frozenset({PodPhase.PENDING, PodPhase.RUNNING, PodPhase.UNKNOWN})  # a process may still be running
EXTERNAL_POD_REASONS = frozenset({"Evicted", "Preempting", "Preempted", "Shutdown", "NodeShutdown", "Terminated"})
# The kubelet evicts a Pod that exceeds its own local storage limits (a container's ephemeral-storage limit, the sum
# of its containers' limits, an emptyDir sizeLimit) with reason Evicted and one of these messages, and no
# DisruptionTarget condition: the job wrote more than it asked for, so it is the job's failure (counted, backed
# off), unlike an eviction for the node's own pressure. (kubelet eviction manager: emptyDirMessageFmt,
# podEphemeralStorageMessageFmt, containerEphemeralStorageMessageFmt.)
_STORAGE_LIMIT_MESSAGE = re.compile(
    r"Usage of EmptyDir volume .* exceeds the limit"
    r"|Pod ephemeral local storage usage exceeds the total limit"
    r"|exceeded its local ephemeral storage limit",
    re.IGNORECASE,
)
# The kubelet refuses to admit a Pod the scheduler placed (phase Failed before any container ran): with
# UnexpectedAdmissionError when a device plugin fails to allocate (e.g. it restarted) and OutOf<resource>
# (OutOfnvidia.com/gpu, OutOfcpu, ...) when its own count of the node's resources disagrees with the scheduler's.
# The node's doing, not the job's: a new attempt, not counted.
_NODE_REJECTION = re.compile(r"UnexpectedAdmissionError|OutOf\S+")
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
    disrupted_at: datetime | None = None  # that condition's lastTransitionTime
    # metadata.deletionTimestamp: when a Pod being deleted should be gone (the request's time plus its grace
    # period); and the finalizers that may hold it past that.
    deletion_deadline: datetime | None = None
    finalizers: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.phase in ALIVE_POD_PHASES and not self.deleting

    @property
    def worker_finished(self) -> bool:
        """The worker's container has terminated (its exit code is known), whatever other containers do."""
        return self.exit_code is not None

    def overdue(self, now: datetime) -> bool:
        """Being deleted, still Pending/Running past its deletion's grace period: a finalizer holds it, or no
        kubelet confirms its end (a lost node without the taint manager's mark, a kubelet that is down)."""
        return (
            self.deleting
            and self.phase in ALIVE_POD_PHASES
            and not self.lost
            and self.deletion_deadline is not None
            and self.deletion_deadline <= now
        )

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
    # The worker's container by name: an injected sidecar (a service mesh proxy, a log shipper) has statuses of
    # its own in the same list, in any order (the kubelet sorts them by name).
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") != CONTAINER_NAME:
            continue
        state = cs.get("state") or {}
        if "terminated" in state:
            term = state["terminated"]
            exit_code, result = term.get("exitCode"), term.get("message")
            if isinstance(result, str) and len(result) > MAX_RESULT_CHARS:
                result = result[:MAX_RESULT_CHARS]  # no longer JSON: read as text (see worker_result)
            reason = reason or term.get("reason")
            message = message or (None if result else term.get("message"))
            started, finished = parse_time(term.get("startedAt")), parse_time(term.get("finishedAt"))
        elif "waiting" in state and state["waiting"].get("reason") in WAITING_REASONS:
            reason, message = state["waiting"]["reason"], state["waiting"].get("message")
        elif "running" in state:
            started = parse_time(state["running"].get("startedAt"))
    disruption: dict[str, Any] = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == DISRUPTION_CONDITION and c.get("status") == "True"
        ),
        {},
    )
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
        deletion_deadline=parse_time(meta.get("deletionTimestamp")),
        finalizers=tuple(str(f) for f in meta.get("finalizers") or ()),
        node_name=spec.get("nodeName"),
        started_at=started or parse_time(status.get("startTime")),
        finished_at=finished,
        exit_code=exit_code,
        reason=reason,
        message=message,
        result=result,
        resource_version=meta.get("resourceVersion"),
        disruption=disruption.get("reason") or DISRUPTION_CONDITION if disruption else None,
        disrupted_at=parse_time(disruption.get("lastTransitionTime")) if disruption else None,
    )


# Worker exit codes with a reason of their own (the rest are `Error`).
_EXIT_REASONS: dict[int, Reason] = {
    ExitCode.OUT_OF_MEMORY: Reason.OUT_OF_MEMORY,
    ExitCode.GPU_UNAVAILABLE: Reason.GPU_UNAVAILABLE,
}


def storage_limit_exceeded(pod: PodView) -> bool:
    """Evicted by the kubelet for going over the job's own ephemeral-storage or emptyDir sizeLimit."""
    return pod.reason == "Evicted" and bool(pod.message) and bool(_STORAGE_LIMIT_MESSAGE.search(pod.message or ""))


def rejected_by_node(pod: PodView) -> bool:
    """Refused by the kubelet's admission (UnexpectedAdmissionError, OutOf<resource>): the node's doing."""
    return bool(pod.reason) and bool(_NODE_REJECTION.fullmatch(pod.reason or ""))


def taken_away(pod: PodView) -> str | None:
    """Why a Pod that ended (Failed, or Succeeded though stopped) ended from outside (not the job's doing: the
    next attempt starts at once, uncounted), or None when the job failed or succeeded by itself."""
    if pod.phase == PodPhase.SUCCEEDED:
        stopped = stopped_by_disruption(pod)
        return f"{pod.disruption} (its worker exited 0 when stopped: the work is not done)" if stopped else None
    if storage_limit_exceeded(pod):
        return None
    if rejected_by_node(pod):
        return pod.reason
    if pod.reason in EXTERNAL_POD_REASONS:
        return pod.reason
    if pod.disruption:
        return pod.disruption
    if pod.reason in {Reason.OOM_KILLED, Reason.DEADLINE_EXCEEDED}:
        return None
    if pod.deleting and pod.exit_code in KILLED_BY_DELETION:
        return "deleted"  # kubectl delete pod: the kubelet reports the killed container's Failed phase first
    return None


def stopped_by_disruption(pod: PodView) -> bool:
    """A Succeeded Pod that a disruption stopped: its worker exited 0 on SIGTERM (a custom image may), at or after
    the DisruptionTarget mark (a drain, a preemption, a taint eviction). A real kubelet reports such a Pod
    Succeeded, not Failed, when every container exits 0; it is not the job's success (nothing says the work was
    done). A worker that finished before the mark (a Pod evicted after it completed) did succeed. Both times have
    whole seconds: the same second reads as stopped (a rerun loses nothing; a false success loses the output)."""
    if not pod.disruption or pod.phase != PodPhase.SUCCEEDED:
        return False
    return pod.finished_at is None or pod.disrupted_at is None or pod.finished_at >= pod.disrupted_at


def _result_object(text: str | None) -> dict[str, Any]:
    """The worker's termination message as a JSON object; {} for anything else (text, a list, nesting too deep
    for the parser, a message cut at MAX_RESULT_CHARS)."""
    if not text or not text.lstrip().startswith("{"):
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _metric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None  # JSON has no NaN/Infinity: the API server refuses them


def worker_result(text: str | None) -> tuple[list[Artifact], dict[str, float]]:
    """Artifacts and metrics from the worker's termination message. Untrusted input (any process in the
    container can write it): each entry is validated on its own and invalid ones are dropped, strings are made
    valid UTF-8, and the counts are bounded as the CRD's status schema is, so the status write always passes."""
    data = _result_object(text)
    artifacts: list[Artifact] = []
    raw_artifacts = data.get("artifacts")
    for raw in raw_artifacts if isinstance(raw_artifacts, list) else []:
        if len(artifacts) >= MAX_ARTIFACTS:
            break
        if not isinstance(raw, dict):
            continue
        try:
            artifact = Artifact.model_validate(raw)
        except ValidationError:
            continue
        if artifact.size > INT64_MAX:  # status.artifacts[].size is format int64
            continue
        artifact.key = utf8(artifact.key)
        artifacts.append(artifact)
    metrics: dict[str, float] = {}
    raw_metrics = data.get("metrics")
    for name, value in (raw_metrics if isinstance(raw_metrics, dict) else {}).items():
        if len(metrics) >= MAX_METRICS:
            break
        number = _metric(value)
        if number is not None and 0 < len(name) <= MAX_METRIC_NAME_CHARS:
            metrics[utf8(name)] = number
    return artifacts, metrics


def failure_reason(pod: PodView) -> tuple[str, str]:
    if storage_limit_exceeded(pod):
        return Reason.EPHEMERAL_STORAGE_EXCEEDED, utf8(f"attempt {pod.attempt} evicted by the kubelet: {pod.message}")
    if pod.reason == Reason.DEADLINE_EXCEEDED:
        return Reason.DEADLINE_EXCEEDED, pod.message or "attempt exceeded timeoutSeconds"
    if pod.reason == Reason.OOM_KILLED:
        return Reason.OOM_KILLED, f"attempt {pod.attempt} was OOM-killed (exit code {pod.exit_code})"
    text = f"attempt {pod.attempt} failed with exit code {pod.exit_code}"
    reason = _EXIT_REASONS.get(pod.exit_code, Reason.ERROR) if pod.exit_code is not None else Reason.ERROR
    if pod.result and not pod.result.lstrip().startswith("{"):
        text += f": {pod.result.strip()}"
    elif error := _result_object(pod.result).get("error"):
        text += f": {error}"
    return reason, utf8(text)
