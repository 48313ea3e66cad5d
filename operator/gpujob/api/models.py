"""Pydantic models of the GpuJob resource (spec and status).

Field names are camelCase on the wire (alias) and snake_case in Python. Defaults mirror crds/gpujob.yaml;
a unit test keeps the two in step.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from gpujob.api.constants import (
    DEFAULT_GPU_RESOURCE,
    DEFAULT_NON_RETRYABLE_EXIT_CODES,
    MAX_PARAMS_BYTES,
    JobType,
    Phase,
)

# A GPU extended resource: nvidia.com/gpu, nvidia.com/mig-1g.10gb, amd.com/gpu, ...
GPU_RESOURCE_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9._]*[a-z0-9])?$"
JOB_ID_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._:-]{0,126}[A-Za-z0-9])?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# spec.priority: an int32 of the same range as a PriorityClass's value (a queue's order, not the Pod's priority).
PRIORITY_MIN = -(2**31)
PRIORITY_MAX = 2**31 - 1
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN)]
Arg = Annotated[str, Field(max_length=4096)]
# Our own env names are reserved: a job may not override its identity or credentials.
RESERVED_ENV_PREFIX = "GPUJOB_"


class WireModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class RetryPolicy(WireModel):
    limit: int = Field(3, ge=0, le=100, description="Failed attempts retried before the job fails.")
    backoff_seconds: int = Field(10, ge=0, le=86400, description="Back-off before the first retry.")
    max_backoff_seconds: int = Field(600, ge=0, le=86400, description="Cap of the exponential back-off.")
    non_retryable_exit_codes: list[Annotated[int, Field(ge=0, le=255)]] = Field(
        default_factory=lambda: list(DEFAULT_NON_RETRYABLE_EXIT_CODES),
        description="Container exit codes that fail the job at once.",
    )

    def backoff(self, failures: int) -> float:
        """Seconds to wait before the attempt that follows `failures` failed attempts (1-based)."""
        if failures <= 0:
            return 0.0
        return float(min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (failures - 1)))


class ModelsVolume(WireModel):
    claim_name: str | None = Field(
        None, pattern=DNS_LABEL_PATTERN, description="PVC in the job's namespace; default from settings."
    )
    read_only: bool = Field(True, description="Mount the models volume read-only.")
    sub_path: str | None = Field(None, description="Mount only this sub-path of the claim.")

    @field_validator("sub_path")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith("/") or ".." in value.split("/")):
            raise ValueError("subPath must be a relative path inside the claim")
        return value


class EnvVar(WireModel):
    name: str = Field(min_length=1, max_length=256, pattern=ENV_NAME_PATTERN)
    value: str = Field("", max_length=32768)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.startswith(RESERVED_ENV_PREFIX):
            raise ValueError(f"env names starting with {RESERVED_ENV_PREFIX} are reserved for the operator")
        return value


class SecretReference(WireModel):
    """A Secret in the job's namespace, by name (as a Pod's imagePullSecrets entries)."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)


class Toleration(WireModel):
    key: str | None = Field(None, max_length=317)
    operator: str | None = Field(None, pattern="^(Exists|Equal)$")
    value: str | None = Field(None, max_length=63)
    effect: str | None = Field(None, pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$")
    toleration_seconds: int | None = None


class Resources(WireModel):
    requests: dict[str, Quantity | int] = Field(default_factory=dict, max_length=16)
    limits: dict[str, Quantity | int] = Field(default_factory=dict, max_length=16)


class Fallback(WireModel):
    """CPU fallback (docs/queues.md): a GPU job not admitted by its queue, or whose Pod stays unschedulable, this
    long runs its next attempt on CPU, with these resources instead of GPUs. Only for task types that can run on
    CPU (gpujob.api.fallback.RUNS_ON_CPU; a `custom` job that sets spec.fallback says its command can)."""

    cpu_after_seconds: int = Field(
        ge=1,
        le=7 * 86400,
        description="Seconds a GPU job waits (not admitted by its queue, or its Pod unschedulable) before its next "
        "attempt runs on CPU.",
    )
    resources: Resources = Field(
        default_factory=Resources,
        description="CPU/memory requests and limits of the CPU attempts (no GPUs: resource names of GPUs are refused).",
    )

    @field_validator("resources")
    @classmethod
    def _no_gpus(cls, value: Resources) -> Resources:
        for key in [*value.requests, *value.limits]:
            if "/" in key:  # extended resources: nvidia.com/gpu, MIG slices, amd.com/gpu, ...
                raise ValueError(f"the CPU attempt asks for no extended resources ({key}): only cpu, memory, ...")
        return value


MAX_PARAMS_DEPTH = 32  # JSON nesting of spec.params (serializers give up near 256; no task needs more than a few)


def nesting_depth(value: Any) -> int:
    """How deep JSON containers nest in `value` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


class CredentialsRequest(WireModel):
    """Which per-job credentials the job's Pod gets (issue 15): unset = the type's default, true for the built-in
    types and false for `custom`, whose image is the user's own."""

    redis: bool | None = Field(
        None, description="A Redis user that may publish only this job's progress events (GPUJOB_REDIS_URL)."
    )
    s3: bool | None = Field(
        None, description="S3 keys that may write only under this job's artifact prefix and read its inputs."
    )


class GpuJobSpec(WireModel):
    type: JobType
    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN, description="Defaults to metadata.name.")
    params: dict[str, Any] = Field(default_factory=dict)
    image: str | None = Field(None, min_length=1, max_length=1024, description="Defaults to the worker image.")
    image_pull_policy: str | None = Field(None, pattern="^(Always|IfNotPresent|Never)$")
    image_pull_secrets: list[SecretReference] = Field(
        default_factory=list, max_length=16, description="Added to the operator's default pull secrets."
    )
    command: list[Arg] | None = Field(None, max_length=64, description="Defaults to the worker entrypoint.")
    args: list[Arg] = Field(default_factory=list, max_length=256)
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    gpus: int = Field(1, ge=0, le=64)
    gpu_resource: str = Field(DEFAULT_GPU_RESOURCE, max_length=253, pattern=GPU_RESOURCE_PATTERN)
    gpu_product: str | None = Field(None, min_length=1, max_length=63)
    resources: Resources = Field(default_factory=Resources)
    priority_class_name: str | None = Field(None, max_length=253)
    queue: str | None = Field(
        None, max_length=63, pattern=DNS_LABEL_PATTERN, description="GpuQueue whose quota admits the job."
    )
    priority: int = Field(
        0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="Order in its queue: higher first (then arrival)."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict, max_length=32)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    timeout_seconds: int | None = Field(None, ge=1, description="activeDeadlineSeconds of each attempt.")
    pending_timeout_seconds: int = Field(600, ge=1)
    retries: RetryPolicy = Field(default_factory=RetryPolicy)
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    suspend: bool = False
    cancel: bool = Field(False, description="Stop the job for good: Pod deleted, phase Cancelled.")
    models: ModelsVolume = Field(default_factory=ModelsVolume)
    fallback: Fallback | None = Field(None, description="Run on CPU after waiting this long for a GPU.")
    credentials: CredentialsRequest = Field(default_factory=CredentialsRequest)

    @field_validator("params")
    @classmethod
    def _params_shallow(cls, value: dict[str, Any]) -> dict[str, Any]:
        if (depth := nesting_depth(value)) > MAX_PARAMS_DEPTH:
            raise ValueError(f"params are nested {depth} levels deep, over the limit of {MAX_PARAMS_DEPTH}")
        return value

    @field_validator("resources")
    @classmethod
    def _no_gpu_in_resources(cls, value: Resources) -> Resources:
        for key in [*value.requests, *value.limits]:
            if re.fullmatch(r"nvidia\.com/.*|amd\.com/gpu", key):
                raise ValueError(f"set GPUs with spec.gpus/spec.gpuResource, not resources ({key})")
        return value

    def wants_credentials(self) -> tuple[bool, bool]:
        """(redis, s3): does the job's Pod get these per-job credentials; `custom` only when it asks."""
        builtin = self.type is not JobType.CUSTOM
        redis, s3 = self.credentials.redis, self.credentials.s3
        return (builtin if redis is None else redis, builtin if s3 is None else s3)

    def params_json(self) -> str:
        """spec.params as the worker receives it (GPUJOB_JOB_PARAMS): compact JSON, keys sorted."""
        return json.dumps(self.params, separators=(",", ":"), sort_keys=True)

    def params_error(self) -> str | None:
        """Why spec.params cannot be handed to the worker (None when it can): over MAX_PARAMS_BYTES as compact
        JSON (one env string; Linux refuses a container whose env string is over 128 KiB) or not encodable."""
        try:
            size = len(self.params_json().encode())
        except (ValueError, TypeError, RecursionError) as exc:
            return f"spec.params cannot be encoded as JSON: {type(exc).__name__}"
        if size > MAX_PARAMS_BYTES:
            return (
                f"spec.params is {size} bytes as compact JSON, over the limit of {MAX_PARAMS_BYTES} bytes "
                "(it is passed to the worker in one environment variable); pass large inputs by reference "
                "(e.g. an object key or a file on the models volume)"
            )
        return None


class Progress(WireModel):
    percent: float = Field(0.0, ge=0, le=100)
    message: str = Field("", max_length=4096)


class Condition(WireModel):
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


class Artifact(WireModel):
    key: str = Field(min_length=1, max_length=1024)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[a-f0-9]{64}$")


class Admission(WireModel):
    """The queue's admission of the job: written (with the attempt, by the reconciler) before the job's Pod is
    created, so the queues' usage can be rebuilt from the statuses alone."""

    queue: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    admitted_at: str
    resources: dict[str, Quantity | int] = Field(default_factory=dict, max_length=16)


class Preempting(WireModel):
    """The queue manager's mark on an admitted job it evicts to make room: the operator stops its Pod gracefully
    (the worker checkpoints), then puts the job back in its queue (phase Queued, reason Preempted)."""

    by: str = Field(max_length=317, description="The job it makes room for (namespace/name).")
    since: str


class QueuePosition(WireModel):
    position: int = Field(
        0,
        ge=0,
        description="1-based place in its queue while it waits (0: in no queue); exact for the first "
        "GPUJOB_QUEUE_EXACT_POSITIONS, an upper bound (K*2^m) behind them.",
    )


class FallbackStatus(WireModel):
    """The job runs on CPU (spec.fallback): set when it was moved, kept for its later attempts."""

    device: str = Field("cpu", description="Where its attempts run now.")
    since: str = Field(description="When it was moved to CPU.")
    reason: str = Field(max_length=128, description="What it waited for: QuotaExceeded, Unschedulable, ...")
    attempt: int = Field(0, ge=0, description="Its first attempt on CPU (0 until that attempt starts).")


class GpuJobStatus(WireModel):
    """What the operator writes; unknown keys are tolerated (kopf keeps its own bookkeeping here)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    phase: Phase | None = None
    conditions: list[Condition] = Field(default_factory=list)
    attempts: int = 0
    failures: int = 0  # attempts that failed by the job's own fault (count against retries.limit)
    pod_name: str | None = None
    node_name: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    next_attempt_time: str | None = None
    progress: Progress | None = None
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None
    observed_generation: int | None = None
    artifacts: list[Artifact] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    admission: Admission | None = None
    queue: QueuePosition | None = None
    preempting: Preempting | None = None
    preemptions: int = 0  # times the job was preempted (never counted as failures)
    fallback: FallbackStatus | None = None  # on CPU (spec.fallback)
