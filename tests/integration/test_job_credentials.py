"""Per-job credentials in a job's life (issue 15), with the real operator on both API backends, a real redis-server
with ACLs (the operator logs in as the README's least-privileged user) and the real S3 server (SeaweedFS): each
attempt's Pod mounts a Secret of its own job's credentials as files; the worker's own code reads them, publishes its
progress and uploads its artifacts; the servers refuse them for another job, the request stream and, once the job
has ended, everywhere; a restarted operator sweeps what jobs that ended or went while it was down left behind."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from kubernetes import client
from minio import Minio
from minio.error import S3Error

from gpujob.api.constants import Phase
from gpujob.api.naming import credentials_secret_name
from gpujob.credentials.common import JobRef
from gpujob.events import SyncEventPublisher, make_event, sync_client
from gpujob.operator.builders import CREDENTIALS_MOUNT_PATH
from gpujob.sandbox.procs import wait_for
from gpujob.sandbox.s3_server import S3Server
from gpujob.settings import Settings
from gpujob.worker.artifacts import store_from_settings
from gpujob.worker.credential_files import with_credential_files
from tests.support.operator import Cluster, OperatorProcess

REGION = "us-east-1"
INPUT = "datasets/a.jsonl"


@pytest.fixture
def with_credentials(
    operator_factory: Callable[..., OperatorProcess],
    operator_redis_url: str,
    s3_env: dict[str, str],
    s3_client: Minio,
    s3_bucket: str,
) -> Callable[[], OperatorProcess]:
    """Starts an operator that makes per-job credentials (GPUJOB_CREDENTIALS_MODE=on: it must be able to)."""
    s3_client.make_bucket(s3_bucket)
    s3_client.put_object(s3_bucket, INPUT, io.BytesIO(b'{"text": "hi"}\n'), 15)
    env = {**s3_env, "GPUJOB_S3_REGION": REGION, "GPUJOB_REDIS_URL": operator_redis_url}
    env["GPUJOB_CREDENTIALS_MODE"] = "on"
    return lambda: operator_factory(env)


def secret_data(cluster: Cluster, job: str) -> dict[str, str] | None:
    body = cluster.job(job)
    if body is None:
        return None
    name = credentials_secret_name(job, body["metadata"]["uid"])
    try:
        secret = cluster.core.read_namespaced_secret(name, cluster.namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def worker_settings(data: dict[str, str], tmp_path: Path) -> Settings:
    """What the worker in the Pod runs with: the Secret's files in a directory, read by the worker's own code."""
    directory = tmp_path / f"credentials-{uuid.uuid4().hex[:6]}"
    directory.mkdir()
    for key, value in data.items():
        (directory / key).write_text(value)
    return with_credential_files(Settings(credentials_dir=str(directory)))


def job_spec(**fields: Any) -> dict[str, Any]:
    return {"type": "train_lora", "params": {"baseModel": "tiny-llama", "dataset": {"s3Key": INPUT}}, **fields}


def refused_by_redis(call: Callable[[], Any]) -> None:
    with pytest.raises((redis.exceptions.NoPermissionError, redis.exceptions.AuthenticationError)):
        call()


def refused_by_s3(call: Callable[[], Any], *codes: str) -> None:
    with pytest.raises(S3Error) as info:
        call()
    assert info.value.code in (codes or ("AccessDenied",)), info.value


def job_minio(s3_server: S3Server, data: dict[str, str]) -> Minio:
    access, secret = data["GPUJOB_S3_ACCESS_KEY"], data["GPUJOB_S3_SECRET_KEY"]
    return Minio(s3_server.endpoint, access_key=access, secret_key=secret, secure=False, region=REGION)


def test_a_job_pod_gets_its_own_credentials_as_files_and_they_die_with_the_job(
    with_credentials: Callable[[], OperatorProcess],
    cluster: Cluster,
    redis_client: redis.Redis,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    with_credentials()
    cluster.create_job("job-a", job_spec())
    cluster.create_job("job-b", job_spec())
    uid_a = cluster.job("job-a")["metadata"]["uid"]  # type: ignore[index]
    pod = cluster.core.api_client.sanitize_for_serialization(cluster.wait_pod("job-a", 1))
    container = pod["spec"]["containers"][0]

    # The Pod: its own Secret as read-only files, owned by the GpuJob; no envFrom (the shared Secret) at all.
    secret_name = credentials_secret_name("job-a", uid_a)
    volume = next(v for v in pod["spec"]["volumes"] if "secret" in v)
    assert volume["secret"] == {"secretName": secret_name, "defaultMode": 0o400}
    assert {"name": volume["name"], "mountPath": CREDENTIALS_MOUNT_PATH, "readOnly": True} in container["volumeMounts"]
    assert "envFrom" not in container
    assert {"name": "GPUJOB_CREDENTIALS_DIR", "value": CREDENTIALS_MOUNT_PATH} in container["env"]
    secret = cluster.core.read_namespaced_secret(secret_name, cluster.namespace)
    assert [(o.kind, o.uid) for o in secret.metadata.owner_references] == [("GpuJob", uid_a)]
    data_a = secret_data(cluster, "job-a")
    assert data_a is not None
    assert "operator-pw" not in json.dumps(data_a)  # the operator's own credentials never reach a job Pod
    assert data_a["GPUJOB_EVENTS_STREAM"] == "gpujobs:events:job-a"
    data_b = cluster.wait_until(lambda: secret_data(cluster, "job-b"), what="job-b's Secret")
    assert data_b["GPUJOB_S3_ACCESS_KEY"] != data_a["GPUJOB_S3_ACCESS_KEY"]

    # With them, through the worker's own code: its progress (relayed into gpujobs:events by the operator) ...
    settings = worker_settings(data_a, tmp_path)
    job = sync_client(settings)
    SyncEventPublisher(job, settings).publish(
        make_event("job-a", "running", 40, "epoch 2/5", phase="Running", attempt=1)
    )
    assert json.loads(redis_client.get("gpujobs:state:job-a") or "{}")["progress"] == 40

    def relayed() -> bool:
        events = [json.loads(f["event"]) for _, f in redis_client.xrange("gpujobs:events")]
        return any(e["jobId"] == "job-a" and e.get("message") == "epoch 2/5" for e in events)

    wait_for(relayed, 10, what="the worker's event relayed into gpujobs:events")
    # ... its artifacts and its input.
    store = store_from_settings(settings)
    store.ensure_bucket()
    adapter = tmp_path / "adapter.bin"
    adapter.write_bytes(b"weights")
    assert store.upload(adapter, "loras/job-a/adapter.bin").size == 7
    store.put_bytes("loras/job-a/checkpoints/run/state.pt", b"state")
    assert store.get_bytes(INPUT).startswith(b'{"text"')

    # Refused by the servers: another job's channel, state and stream, the request stream, the shared stream.
    refused_by_redis(lambda: SyncEventPublisher(job, settings).publish(make_event("job-b", "succeeded", 100)))
    refused_by_redis(lambda: job.publish("gpujobs:progress:job-b", "{}"))
    refused_by_redis(lambda: job.get("gpujobs:state:job-b"))
    refused_by_redis(lambda: job.xadd("gpujobs:requests", {"job": json.dumps({"jobId": "x", "type": "custom"})}))
    refused_by_redis(lambda: job.xadd("gpujobs:events", {"jobId": "job-b", "event": "{}"}))
    # Another job's prefix (write, read), and another type's prefix.
    minio_a = job_minio(s3_server, data_a)
    refused_by_s3(lambda: minio_a.put_object(s3_bucket, "loras/job-b/adapter.bin", io.BytesIO(b"x"), 1))
    refused_by_s3(lambda: minio_a.put_object(s3_bucket, "voices/job-a/voice.pt", io.BytesIO(b"x"), 1))
    job_minio(s3_server, data_b).put_object(s3_bucket, "loras/job-b/adapter.bin", io.BytesIO(b"b"), 1)
    refused_by_s3(lambda: minio_a.get_object(s3_bucket, "loras/job-b/adapter.bin"))

    # The job ends: its Secret is deleted and both servers refuse its credentials everywhere.
    cluster.run_pod("job-a", 1)
    cluster.wait_phase("job-a", Phase.SUCCEEDED)
    cluster.wait_until(lambda: secret_data(cluster, "job-a") is None, what="job-a's Secret deleted")
    fresh = sync_client(settings)
    refused_by_redis(fresh.ping)
    refused_by_redis(lambda: SyncEventPublisher(job, settings).publish(make_event("job-a", "running", 50)))
    refused_by_s3(
        lambda: minio_a.put_object(s3_bucket, "loras/job-a/late.bin", io.BytesIO(b"x"), 1), "InvalidAccessKeyId"
    )
    refused_by_s3(lambda: minio_a.get_object(s3_bucket, INPUT), "InvalidAccessKeyId")
    # A deleted job's go as well (its Secret with it, by owner reference).
    minio_b = job_minio(s3_server, data_b)
    cluster.delete_job("job-b")
    cluster.wait_until(lambda: not _redis_users(redis_client, "job-b"), what="job-b's Redis user deleted")
    cluster.wait_until(lambda: _s3_refused(minio_b, s3_bucket), what="job-b's S3 keys deleted")
    fresh.close()
    job.close()


def test_each_attempt_gets_new_credentials_and_the_previous_attempts_stop_working(
    with_credentials: Callable[[], OperatorProcess], cluster: Cluster, s3_server: S3Server, s3_bucket: str
) -> None:
    with_credentials()
    cluster.create_job("retried", job_spec(retries={"limit": 1, "backoffSeconds": 0}))
    cluster.wait_pod("retried", 1)
    first = cluster.wait_until(lambda: secret_data(cluster, "retried"), what="attempt 1's Secret")
    cluster.run_pod("retried", 1, exit_code=1)
    cluster.wait_pod("retried", 2)
    second = cluster.wait_until(
        lambda: (d := secret_data(cluster, "retried")) and d != first and d, what="attempt 2's Secret"
    )
    assert second["GPUJOB_S3_ACCESS_KEY"] != first["GPUJOB_S3_ACCESS_KEY"]
    job_minio(s3_server, second).put_object(s3_bucket, "loras/retried/a.bin", io.BytesIO(b"x"), 1)
    refused_by_s3(
        lambda: job_minio(s3_server, first).put_object(s3_bucket, "loras/retried/b.bin", io.BytesIO(b"x"), 1),
        "InvalidAccessKeyId",
    )
    refused_by_redis(lambda: redis.Redis.from_url(first["GPUJOB_REDIS_URL"]).ping())
    assert redis.Redis.from_url(second["GPUJOB_REDIS_URL"]).ping()


def test_custom_images_get_credentials_only_when_they_ask(
    with_credentials: Callable[[], OperatorProcess], cluster: Cluster
) -> None:
    with_credentials()
    cluster.create_job("plain", {"type": "custom", "image": "registry.test/own:1"})
    cluster.create_job("asks", {"type": "custom", "image": "registry.test/own:1", "credentials": {"s3": True}})
    plain = cluster.core.api_client.sanitize_for_serialization(cluster.wait_pod("plain", 1))
    assert not any("secret" in v for v in plain["spec"]["volumes"])
    assert "envFrom" not in plain["spec"]["containers"][0]
    cluster.wait_pod("asks", 1)
    data = secret_data(cluster, "asks")
    assert data is not None and "GPUJOB_S3_ACCESS_KEY" in data and "GPUJOB_REDIS_URL" not in data


def test_a_restarted_operator_sweeps_what_ended_and_gone_jobs_left_behind(
    with_credentials: Callable[[], OperatorProcess],
    cluster: Cluster,
    redis_client: redis.Redis,
    s3_server: S3Server,
    s3_bucket: str,
) -> None:
    operator = with_credentials()
    for name in ("gone", "live", "done"):
        cluster.create_job(name, job_spec())
        cluster.wait_until(lambda name=name: secret_data(cluster, name), what=f"{name}'s Secret")  # type: ignore[misc]
    gone = secret_data(cluster, "gone")
    assert gone is not None
    cluster.run_pod("done", 1)
    cluster.wait_phase("done", Phase.SUCCEEDED)
    cluster.wait_until(lambda: secret_data(cluster, "done") is None, what="the ended job's Secret deleted")
    done_uid = cluster.job("done")["metadata"]["uid"]  # type: ignore[index]
    operator.kill()
    # As if the operator had died between the job's end and its revocation: its user and Secret are back.
    future = int(time.time()) + 3600
    redis_client.execute_command(
        "ACL", "SETUSER", f"gpujob-job:{cluster.namespace}:done:{done_uid}:{future}", "on", ">pw", "+ping"
    )
    leftover = client.V1Secret(metadata=client.V1ObjectMeta(name=credentials_secret_name("done", done_uid)))
    cluster.core.create_namespaced_secret(cluster.namespace, leftover)
    # While no operator runs: a GpuJob deleted, and credentials it made that have expired (as if made long ago).
    cluster.delete_job("gone")
    expired = JobRef(cluster.namespace, "old", str(uuid.uuid4()), "old", "train_lora")
    username = f"gpujob-job:{expired.namespace}:{expired.name}:{expired.uid}:{int(time.time()) - 1}"
    redis_client.execute_command("ACL", "SETUSER", username, "on", ">pw", "+ping")
    assert _redis_users(redis_client, "gone") and _redis_users(redis_client, "old")

    operator.start()
    cluster.wait_until(lambda: not _redis_users(redis_client, "gone"), what="the gone job's Redis user swept")
    cluster.wait_until(lambda: not _redis_users(redis_client, "old"), what="the expired Redis user swept")
    cluster.wait_until(lambda: _s3_refused(job_minio(s3_server, gone), s3_bucket), what="gone job's S3 keys swept")
    cluster.wait_until(lambda: not _redis_users(redis_client, "done"), what="the ended job's Redis user swept")
    cluster.wait_until(lambda: secret_data(cluster, "done") is None, what="the ended job's Secret swept")
    # The live job keeps its credentials.
    live = secret_data(cluster, "live")
    assert live is not None and _redis_users(redis_client, "live")
    job_minio(s3_server, live).put_object(s3_bucket, "loras/live/a.bin", io.BytesIO(b"x"), 1)


def _redis_users(redis_client: redis.Redis, job: str) -> list[str]:
    return [n for n in redis_client.execute_command("ACL", "USERS") if n.startswith("gpujob-job:") and f":{job}:" in n]


def _s3_refused(minio: Minio, bucket: str) -> bool:
    try:
        minio.put_object(bucket, "loras/x/y", io.BytesIO(b"x"), 1)
    except S3Error as exc:
        return exc.code == "InvalidAccessKeyId"
    return False
