"""One vocabulary: names, labels, phases, condition types and reasons. No string literals elsewhere."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

GROUP: Final = "gpujob.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "GpuJob"
PLURAL: Final = "gpujobs"
SINGULAR: Final = "gpujob"
SHORT_NAME: Final = "gj"
CRD_NAME: Final = f"{PLURAL}.{GROUP}"
MANAGER: Final = "gpujob-operator"
CONTAINER_NAME: Final = "worker"
MODELS_MOUNT_PATH: Final = "/opt/models"
MODELS_VOLUME_NAME: Final = "models"
TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"
GPU_PRODUCT_LABEL: Final = "nvidia.com/gpu.product"
DEFAULT_GPU_RESOURCE: Final = "nvidia.com/gpu"
GPU_TAINT_KEY: Final = "nvidia.com/gpu"


class Label(StrEnum):
    """Labels on every job Pod (docs/architecture.md: fixed names)."""

    JOB_ID = f"{GROUP}/job-id"
    JOB_NAME = f"{GROUP}/job-name"
    TYPE = f"{GROUP}/type"
    ATTEMPT = f"{GROUP}/attempt"
    MANAGED_BY = "app.kubernetes.io/managed-by"


class Annotation(StrEnum):
    """Annotations the operator writes on Pods."""

    REQUEST_ID = f"{GROUP}/request-id"


class JobType(StrEnum):
    TRAIN_LORA = "train_lora"
    TRAIN_VOICE = "train_voice"
    RENDER_VIDEO = "render_video"
    CUSTOM = "custom"


# Artifact prefix per job type (docs/architecture.md); custom jobs write under jobs/<jobId>/.
ARTIFACT_PREFIX: Final[dict[JobType, str]] = {
    JobType.TRAIN_LORA: "loras",
    JobType.TRAIN_VOICE: "voices",
    JobType.RENDER_VIDEO: "videos",
    JobType.CUSTOM: "jobs",
}


class Phase(StrEnum):
    """GpuJob.status.phase. The event `status` field is the lower-case phase."""

    QUEUED = "Queued"  # accepted, no Pod yet (or waiting for the next attempt's Pod)
    SCHEDULED = "Scheduled"  # Pod created, on its way to running (being bound, pulling, starting)
    PENDING = "Pending"  # Pod created but stuck: cannot be scheduled, image pull errors (status.reason says which)
    RUNNING = "Running"
    RETRYING = "Retrying"  # an attempt failed; the next one starts after the back-off
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_PHASES

    @property
    def event_status(self) -> str:
        return self.value.lower()


TERMINAL_PHASES: Final = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})


class PodPhase(StrEnum):
    """A Pod's status.phase, as the kubelet reports it."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"


class ConditionType(StrEnum):
    SCHEDULED = "Scheduled"  # a Pod for the current attempt exists and is bound to a node
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    COMPLETE = "Complete"
    FAILED = "Failed"
    ADMITTED = "Admitted"  # the job's queue admitted it (only for a job with spec.queue while GpuQueues exist)
    # A Pod of the job outlived its deletion's grace period (a finalizer, or a node that never confirms): the
    # next attempt waits for it to be gone.
    POD_TERMINATING = "PodTerminating"
    # spec.fallback: True once the job runs on CPU (reason CpuFallback); False with CpuFallbackUnsupported when it
    # asks for fallback but its task type cannot run on CPU.
    FALLBACK = "Fallback"


class Reason(StrEnum):
    """Machine-readable reasons on conditions and status.reason (crds/gpujob.yaml's status.reason description names
    every one the operator sets: tests/test_crd.py keeps them in step)."""

    CREATED = "Created"
    POD_CREATED = "PodCreated"
    POD_PENDING = "PodPending"
    POD_RUNNING = "PodRunning"
    SUCCEEDED = "Succeeded"
    ERROR = "Error"  # the container exited non-zero
    NON_RETRYABLE_EXIT_CODE = "NonRetryableExitCode"
    # Not set by the operator (a job out of retries fails with its last attempt's reason); kept as a metrics label.
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    OOM_KILLED = "OOMKilled"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_BACKOFF = "ImagePullBackOff"
    ERR_IMAGE_PULL = "ErrImagePull"
    CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
    PENDING_TIMEOUT = "PendingTimeout"  # pendingTimeoutSeconds passed and the Pod gave no reason of its own
    POD_DELETED = "PodDeleted"  # deleted or evicted from outside: not the job's own failure
    EVICTED = "Evicted"
    # A Pod stuck terminating (condition PodTerminating): held by finalizers, or its node's kubelet never
    # confirms its end (NodeLost); PodGone once it is.
    POD_TERMINATING = "PodTerminating"
    NODE_LOST = "NodeLost"
    POD_GONE = "PodGone"
    # Another (older) GpuJob, in any namespace, has the same jobId: a jobId names one job cluster-wide.
    DUPLICATE_JOB_ID = "DuplicateJobId"
    NODE_REJECTED = "NodeRejected"  # the kubelet refused to admit the Pod (UnexpectedAdmissionError, OutOf<resource>)
    # Evicted for exceeding the job's own ephemeral-storage limit or an emptyDir sizeLimit: the job's failure.
    EPHEMERAL_STORAGE_EXCEEDED = "EphemeralStorageExceeded"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    CANCELLED = "Cancelled"
    INVALID_SPEC = "InvalidSpec"
    INVALID_PARAMS = "InvalidParams"  # spec.params do not fit the built-in type's params model (gpujob.api.params)
    OUT_OF_MEMORY = "OutOfMemory"  # the worker ran out of GPU memory (exit code ExitCode.OUT_OF_MEMORY)
    GPU_UNAVAILABLE = "GpuUnavailable"  # GPUs were requested but CUDA is not usable in the Pod
    # Queues (docs/queues.md): why a job that names a queue has no Pod yet (phase Queued), and its admission.
    QUOTA_EXCEEDED = "QuotaExceeded"
    QUEUE_NOT_FOUND = "QueueNotFound"
    NAMESPACE_NOT_ALLOWED = "NamespaceNotAllowed"
    ADMITTED = "Admitted"
    PREEMPTED = "Preempted"  # evicted by its queue for a higher-priority job (or to reclaim lent quota)
    # spec.fallback: its next attempt runs on CPU (it waited cpuAfterSeconds for a GPU); or it never will, its type
    # cannot run on CPU (gpujob.api.fallback.RUNS_ON_CPU).
    CPU_FALLBACK = "CpuFallback"
    CPU_FALLBACK_UNSUPPORTED = "CpuFallbackUnsupported"


# Reasons of status.reason/conditions the operator never sets (kept for other vocabularies, e.g. metrics labels).
UNSET_REASONS: Final = frozenset({Reason.BACKOFF_LIMIT_EXCEEDED})


class EventReason(StrEnum):
    """Reasons of the Kubernetes Events the operator posts about a GpuJob (`kubectl describe gj`, `kubectl get
    events`); the status reason of the moment is in each Event's note."""

    ATTEMPT_STARTED = "AttemptStarted"  # an attempt's Pod was created
    SCHEDULED = "Scheduled"  # the attempt's Pod was bound to a node
    WAITING = "Waiting"  # the attempt's Pod is stuck Pending (Unschedulable, ImagePullBackOff, ...)
    RUNNING = "Running"
    RETRYING = "Retrying"  # an attempt failed; the next one starts after the back-off
    FAILED = "Failed"
    SUCCEEDED = "Succeeded"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    CANCELLED = "Cancelled"
    SPEC_CHANGED = "SpecChanged"  # the spec changed under a live attempt: it applies to the next attempt
    QUEUED = "Queued"  # the job's queue has not admitted it (the note says why: QuotaExceeded, QueueNotFound, ...)
    ADMITTED = "Admitted"  # the job's queue admitted it: its Pod follows
    PREEMPTED = "Preempted"  # its queue evicted it for another job: the Pod stops gracefully, the job waits again
    FALLBACK = "Fallback"  # it waited spec.fallback.cpuAfterSeconds for a GPU: its next attempt runs on CPU


class ExitCode:
    """Exit codes of `gpujob worker` (documented in the README)."""

    OK: Final = 0
    TRANSIENT: Final = 75  # EX_TEMPFAIL: retry may help (S3/Redis down, preempted)
    BAD_INPUT: Final = 64  # EX_USAGE: the job's params can never work: do not retry
    TASK_FAILED: Final = 70  # EX_SOFTWARE: the task raised; retried within the limit
    GPU_UNAVAILABLE: Final = 69  # EX_UNAVAILABLE: GPUs requested, CUDA unusable (driver, runtime class)
    OUT_OF_MEMORY: Final = 71  # EX_OSERR: CUDA out of memory even at micro-batch 1
    INTERRUPTED: Final = 143  # SIGTERM: resume on the next attempt from the newest checkpoint


# GPUJOB_JOB_PARAMS (spec.params as compact JSON, UTF-8 bytes) is one environment variable of the job container:
# Linux refuses any single argument or env string over MAX_ARG_STRLEN (128 KiB) and the container cannot start.
# Half of that is the bound, at intake (the bridge) and in the operator (a GpuJob applied with bigger params is
# Failed with reason InvalidSpec before any Pod is created).
MAX_PARAMS_BYTES: Final = 64 * 1024

# What the worker's termination message (untrusted: any container may write it) may put into GpuJob.status,
# bounded as the CRD's status schema is (crds/gpujob.yaml): more would fail every status write.
MAX_ARTIFACTS: Final = 1000  # status.artifacts maxItems
MAX_METRICS: Final = 64  # status.metrics maxProperties
MAX_METRIC_NAME_CHARS: Final = 256  # not bounded by the schema; a name longer than this is dropped
MAX_RESULT_CHARS: Final = 64 * 1024  # the kubelet keeps 4 KiB of it; anything longer is not parsed
INT64_MAX: Final = 2**63 - 1  # artifacts[].size is format int64

# The Pod's terminationGracePeriodSeconds: the worker's budget between SIGTERM and its own forced exit.
POD_TERMINATION_GRACE_SECONDS: Final = 60
DEFAULT_NON_RETRYABLE_EXIT_CODES: Final = (ExitCode.BAD_INPUT,)
