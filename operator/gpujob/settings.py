"""All settings, read once from environment variables prefixed GPUJOB_ (pydantic-settings).

Grouped by concern, one class each (`OperatorSettings`, `StreamSettings`, `S3Settings`, `WorkerSettings`,
`ObservabilitySettings`); `Settings` is all of them at once, with flat attributes (`settings.read_batch`) and one
environment variable per field (`GPUJOB_READ_BATCH`). Every field has a description: docs/settings.md is generated
from them (`python -m hack.settings_doc > docs/settings.md`; a test checks it is current).
"""

from __future__ import annotations

import socket
from functools import lru_cache
from typing import Final

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpujob.api.models import Toleration

ENV_PREFIX: Final = "GPUJOB_"
_CONFIG: Final = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")


class OperatorSettings(BaseSettings):
    """The operator: job Pods it builds, how it writes status, HA."""

    model_config = _CONFIG

    namespace: str = Field("default", description="Namespace of GpuJobs created from the stream.")
    worker_image: str = Field("ghcr.io/gpujob-dev/gpujob-worker:0.1.0", description="Default job image.")
    worker_command: list[str] = Field(
        default_factory=lambda: ["gpujob", "worker"], description="Default job command (a JSON list)."
    )
    image_pull_policy: str = Field("IfNotPresent", description="imagePullPolicy of job Pods.")
    models_pvc: str = Field("gpujob-models", description="Default PVC mounted at /opt/models.")
    worker_secret: str = Field(
        "gpujob-worker",
        description="Secret in the job's namespace whose keys become the Pod's env (optional); only when per-job "
        "credentials are off (GPUJOB_CREDENTIALS_MODE).",
    )
    credentials_mode: str = Field(
        "auto",
        pattern="^(auto|on|off)$",
        description="Per-job credentials: each attempt gets a Redis user and S3 keys of its own job only, in a "
        "Secret mounted as files, revoked when the job ends (README threat model). on: required (start-up fails "
        "without the admin rights); auto: on when the operator has S3 keys and may make users with them and "
        "on Redis (when configured), else off; off: job Pods get GPUJOB_WORKER_SECRET as env (shared credentials).",
    )
    credentials_margin_seconds: int = Field(
        600, ge=0, description="Per-job credentials expire this long after pendingTimeoutSeconds + timeoutSeconds."
    )
    credentials_lifetime_seconds: int = Field(
        86_400, ge=60, description="Per-job credentials' lifetime (before the margin) for jobs without timeoutSeconds."
    )
    credentials_sweep_interval: float = Field(
        60.0, gt=0, description="Seconds between sweeps that delete expired per-job users and those of ended jobs."
    )
    worker_env_passthrough: list[str] = Field(
        default_factory=lambda: [
            "GPUJOB_S3_ENDPOINT",
            "GPUJOB_S3_BUCKET",
            "GPUJOB_S3_SECURE",
            "GPUJOB_S3_REGION",
        ],
        description="Non-secret operator settings copied into job Pods as plain env.",
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list,
        description="Secrets (names, a JSON list) for pulling job images, in each job namespace; a GpuJob's "
        "spec.imagePullSecrets are added.",
    )
    job_node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Default nodeSelector of job Pods (a JSON object); a GpuJob's spec.nodeSelector wins per key.",
    )
    job_tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Default tolerations of job Pods (a JSON list), added to a GpuJob's spec.tolerations.",
    )
    job_priority_class_name: str | None = Field(
        None, description="Default priorityClassName of job Pods; a GpuJob's spec.priorityClassName wins."
    )
    pod_run_as_user: int = Field(10001, description="uid/gid job Pods run as (the worker image's user).")
    worker_service_account: str | None = Field(None, description="serviceAccountName of job Pods (no token).")
    status_progress_interval: float = Field(2.0, description="Min seconds between progress writes to status.")
    queue_exact_positions: int = Field(
        100,
        ge=1,
        description="Waiting jobs per queue whose exact position is written and published; behind them, an upper "
        "bound (K*2^m) that changes only when a bucket is crossed (docs/queues.md).",
    )
    queue_event_interval: float = Field(
        2.0, ge=0, description="Min seconds between two queue-position events of one job (the latest sent last)."
    )
    cache_audit_seconds: float = Field(
        300.0,
        description="Seconds between checks of the operator's cache against a list of its GpuJobs and Pods (what a "
        "watch resumed after a gap missed is dropped); a watch that lists again also calls for a check, 5 s after "
        "its listing; 0 = never.",
    )
    peering: str | None = Field(None, description="kopf peering object name (HA); unset = standalone.")


class StreamSettings(BaseSettings):
    """Redis: the request stream and its bridge, progress Pub/Sub, the events stream and per-job state."""

    model_config = _CONFIG

    redis_url: SecretStr | None = Field(None, description="redis:// or rediss:// URL; unset = no bridge, no events.")
    redis_ssl_ca_certs: str | None = Field(None, description="CA bundle for rediss:// (private CA).")
    bridge: bool = Field(True, description="Run the stream intake in the operator when Redis is configured.")
    bridge_namespaces: list[str] = Field(
        default_factory=list,
        description='Namespaces a stream request may name: [] = only GPUJOB_NAMESPACE, ["*"] = any.',
    )
    request_stream: str = Field("gpujobs:requests", description="Stream the backend XADDs requests to.")
    dead_letter_stream: str = Field(
        "gpujobs:requests:dead", description="Stream of requests that can never work, each with its reason."
    )
    consumer_group: str = Field("gpujob-operator", description="Consumer group of the operators on the stream.")
    consumer_name: str = Field(
        default_factory=socket.gethostname, description="This operator's consumer name (default: the host name)."
    )
    progress_channel_prefix: str = Field(
        "gpujobs:progress:", description="Pub/Sub channel prefix of progress events (the jobId follows)."
    )
    events_stream: str = Field("gpujobs:events", description="Stream every progress event is also appended to.")
    events_maxlen: int = Field(
        100_000, description="Approximate length the events and dead-letter streams are trimmed to."
    )
    state_key_prefix: str = Field(
        "gpujobs:state:", description="Key prefix of each job's last event (the jobId follows)."
    )
    seq_key_prefix: str = Field(
        "gpujobs:seq:", description="Key prefix of each job's event sequence number (the jobId follows)."
    )
    state_ttl_seconds: int = Field(7 * 24 * 3600, description="Seconds a job's state and sequence keys live.")
    read_batch: int = Field(64, description="Most stream entries the intake reads at once.")
    read_block_ms: int = Field(
        2000,
        description="Unused by the intake today (its read script cannot block; it polls while idle); still parsed.",
    )
    max_deliveries: int = Field(5, description="Deliveries of one entry that failed before it is dead-lettered.")
    claim_idle_ms: int = Field(
        60_000, description="Milliseconds an entry stays pending with another consumer before it is claimed."
    )
    concurrency: int = Field(16, description="Stream entries the intake handles at once.")


class S3Settings(BaseSettings):
    """S3 / MinIO: where workers put artifacts and checkpoints."""

    model_config = _CONFIG

    s3_endpoint: str = Field("localhost:9000", description="host:port of the S3 API (copied into job Pods).")
    s3_access_key: SecretStr | None = Field(None, description="Access key (secret; from the worker Secret).")
    s3_secret_key: SecretStr | None = Field(None, description="Secret key (secret; from the worker Secret).")
    s3_bucket: str = Field("gpujob", description="Bucket of artifacts and checkpoints.")
    s3_secure: bool = Field(False, description="Use HTTPS to reach the S3 endpoint.")
    s3_region: str | None = Field(None, description="Region of the bucket; unset = the server's default.")


class WorkerSettings(BaseSettings):
    """The worker inside a job Pod (set by the operator on the Pod, not by hand)."""

    model_config = _CONFIG

    models_dir: str = Field("/opt/models", description="Where the models PVC is mounted in the Pod.")
    job_id: str | None = Field(None, description="The job's jobId.")
    job_type: str | None = Field(None, description="The job's type (train_lora, train_voice, render_video).")
    job_params: str = Field("{}", description="The job's params, as JSON.")
    attempt: int = Field(1, description="The attempt this Pod runs (1 for the first).")
    termination_message_path: str = Field(
        "/dev/termination-log", description="Where the worker writes its result for the operator."
    )
    checkpoint_every_seconds: float = Field(60.0, description="Min seconds between checkpoints.")
    credentials_dir: str | None = Field(
        None,
        description="Directory of the job's credential files (the operator mounts its per-job Secret there): each "
        "file named GPUJOB_REDIS_URL, GPUJOB_S3_ACCESS_KEY, ... sets that setting, over the environment.",
    )


class ObservabilitySettings(BaseSettings):
    """HTTP (/metrics, /healthz, /readyz), Prometheus and logs."""

    model_config = _CONFIG

    metrics_port: int = Field(8080, description="Port of the HTTP server: /metrics, /healthz, /readyz.")
    prometheus_url: str | None = Field(
        None, description="Prometheus to read DCGM GPU metrics from (a finished job's efficiency); unset = none."
    )
    log_format: str = Field(
        "auto", pattern="^(auto|json|console)$", description="json, console, or auto (json unless a terminal)."
    )
    log_level: str = Field("INFO", description="Level of the root logger (DEBUG, INFO, WARNING, ...).")


# Bases in reverse: pydantic lists the fields of the last base first, so fields keep the order of GROUPS.
class Settings(ObservabilitySettings, WorkerSettings, S3Settings, StreamSettings, OperatorSettings):
    """Every setting, flat: one object for the operator, the bridge and the worker."""

    model_config = _CONFIG


# The groups by title, in the order the docs list them.
GROUPS: Final[dict[str, type[BaseSettings]]] = {
    "Operator": OperatorSettings,
    "Redis and the stream": StreamSettings,
    "S3 / MinIO": S3Settings,
    "Worker (in the job Pod)": WorkerSettings,
    "HTTP, Prometheus and logs": ObservabilitySettings,
}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
