"""All settings, read once from environment variables prefixed GPUJOB_ (pydantic-settings)."""

from __future__ import annotations

import socket
from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPUJOB_", extra="ignore")

    # --- Kubernetes / operator
    namespace: str = Field("default", description="Namespace of GpuJobs created from the stream.")
    worker_image: str = Field("ghcr.io/gpujob-dev/gpujob-worker:0.1.0", description="Default job image.")
    worker_command: list[str] = Field(default_factory=lambda: ["gpujob", "worker"])
    image_pull_policy: str = "IfNotPresent"
    models_pvc: str = Field("gpujob-models", description="Default PVC mounted at /opt/models.")
    worker_secret: str = Field(
        "gpujob-worker",
        description="Secret in the job's namespace whose keys become the Pod's env (optional).",
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
    pod_run_as_user: int = Field(10001, description="uid/gid job Pods run as (the worker image's user).")
    worker_service_account: str | None = Field(None, description="serviceAccountName of job Pods (no token).")
    status_progress_interval: float = Field(2.0, description="Min seconds between progress writes to status.")
    peering: str | None = Field(None, description="kopf peering object name (HA); None = standalone.")

    # --- Redis
    redis_url: SecretStr | None = Field(None, description="redis:// or rediss:// URL; unset = no bridge.")
    redis_ssl_ca_certs: str | None = Field(None, description="CA bundle for rediss:// (private CA).")
    bridge: bool = Field(True, description="Run the stream intake in the operator when Redis is configured.")
    bridge_namespaces: list[str] = Field(
        default_factory=list,
        description='Namespaces a stream request may name: [] = only GPUJOB_NAMESPACE, ["*"] = any.',
    )
    request_stream: str = "gpujobs:requests"
    dead_letter_stream: str = "gpujobs:requests:dead"
    consumer_group: str = "gpujob-operator"
    consumer_name: str = Field(default_factory=socket.gethostname)
    progress_channel_prefix: str = "gpujobs:progress:"
    events_stream: str = "gpujobs:events"
    events_maxlen: int = 100_000
    state_key_prefix: str = "gpujobs:state:"
    seq_key_prefix: str = "gpujobs:seq:"
    state_ttl_seconds: int = 7 * 24 * 3600
    read_batch: int = 64
    read_block_ms: int = 2000
    max_deliveries: int = 5
    claim_idle_ms: int = 60_000
    concurrency: int = 16

    # --- S3 / MinIO
    s3_endpoint: str = "localhost:9000"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_bucket: str = "gpujob"
    s3_secure: bool = False
    s3_region: str | None = None

    # --- Worker (inside the Pod)
    models_dir: str = "/opt/models"
    job_id: str | None = None
    job_type: str | None = None
    job_params: str = "{}"
    attempt: int = 1
    termination_message_path: str = "/dev/termination-log"
    checkpoint_every_seconds: float = 60.0

    # --- Observability
    metrics_port: int = 8080
    prometheus_url: str | None = None
    log_format: str = Field("auto", pattern="^(auto|json|console)$")
    log_level: str = "INFO"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
