"""Per-job S3 users (issue 15 item 3) against the real SeaweedFS: the job's keys write its artifacts and
checkpoints through the worker's own store and read its input; the SERVER refuses everything else."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from minio import Minio
from minio.error import S3Error
from pydantic import SecretStr

from gpujob.credentials.common import JobRef
from gpujob.credentials.s3 import IamError, S3JobCredentials, policy, user_name
from gpujob.sandbox.s3_server import S3Server
from gpujob.settings import Settings
from gpujob.worker.artifacts import ArtifactStore

REGION = "us-east-1"  # a job's keys may not read the bucket's location, so its client is told the region
BODY_A = {
    "metadata": {"namespace": "team-a", "name": "job-a", "uid": "11111111-aaaa-4000-8000-000000000001"},
    "spec": {"jobId": "job-a", "type": "train_lora", "params": {"dataset": {"s3Key": "datasets/a.jsonl"}}},
}
JOB_A = JobRef.from_body(BODY_A)
JOB_B = JobRef("team-b", "job-b", "22222222-bbbb-4000-8000-000000000002", "job-b", "train_voice")


@pytest.fixture
def admin_settings(s3_server: S3Server, s3_bucket: str) -> Settings:
    return Settings(
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_server.access_key),
        s3_secret_key=SecretStr(s3_server.secret_key),
        s3_bucket=s3_bucket,
        s3_region=REGION,
    )


@pytest.fixture
def creds(admin_settings: Settings, s3_client: Minio, s3_bucket: str) -> Iterator[S3JobCredentials]:
    s3_client.make_bucket(s3_bucket)
    for key in ("datasets/a.jsonl", "datasets/b.jsonl", "voices/job-b/voice.pt", "loras/job-b/adapter.bin"):
        s3_client.put_object(s3_bucket, key, io.BytesIO(b"data"), 4)
    made = S3JobCredentials(admin_settings)
    yield made
    made.sweep([])


def job_client(settings: Settings, keys: tuple[str, str]) -> Minio:
    return Minio(settings.s3_endpoint, access_key=keys[0], secret_key=keys[1], secure=False, region=REGION)


def refused(call: Callable[[], Any], code: str = "AccessDenied") -> None:
    with pytest.raises(S3Error) as info:
        call()
    assert info.value.code == code, info.value


def test_policy_names_the_prefix_the_list_condition_and_the_inputs() -> None:
    assert JOB_A.artifact_prefix == "loras/job-a/" and JOB_A.input_keys == ("datasets/a.jsonl",)
    statements = policy("b", JOB_A)["Statement"]
    assert statements[0]["Resource"] == ["arn:aws:s3:::b/loras/job-a/*"]
    assert statements[1]["Condition"] == {"StringLike": {"s3:prefix": ["loras/job-a/*"]}}
    assert statements[2]["Resource"] == ["arn:aws:s3:::b/datasets/a.jsonl"]
    with pytest.raises(ValueError, match="another job"):
        policy("b", JobRef("n", "x", "u", "x", "train_lora", ("loras/job-b/adapter.bin",)))
    with pytest.raises(ValueError, match="not allowed"):
        policy("b", JobRef("n", "x", "u", "x", "train_lora", ("datasets/*",)))


def test_job_keys_reach_only_the_jobs_prefix_and_inputs(
    creds: S3JobCredentials, admin_settings: Settings, s3_bucket: str, tmp_path: Path
) -> None:
    keys = creds.create(JOB_A)
    job_settings = admin_settings.model_copy(
        update={"s3_access_key": SecretStr(keys[0]), "s3_secret_key": SecretStr(keys[1])}
    )
    store = ArtifactStore.from_settings(job_settings)
    adapter = tmp_path / "adapter.bin"
    adapter.write_bytes(b"x" * 1024)

    # What the worker does, through its own store: artifacts, checkpoints (list, write, delete), its input.
    assert store.upload(adapter, "loras/job-a/adapter.bin").size == 1024
    store.put_bytes("loras/job-a/checkpoints/run1/step-000000000001.pt", b"ckpt")
    store.put_bytes("loras/job-a/checkpoints/run1/step-000000000002.pt", b"ckpt")
    store.remove("loras/job-a/checkpoints/run1/step-000000000001.pt")
    assert store.list_keys("loras/job-a/checkpoints/") == ["loras/job-a/checkpoints/run1/step-000000000002.pt"]
    assert store.get_bytes("datasets/a.jsonl") == b"data"
    c = job_client(job_settings, keys)
    big = 6 << 20  # multipart: create, parts, complete
    c.put_object(s3_bucket, "loras/job-a/big.bin", io.BytesIO(b"y" * big), big, part_size=5 << 20)

    # Refused by the server: writes outside the prefix, another job's artifacts, other inputs, listings.
    refused(lambda: c.put_object(s3_bucket, "loras/job-b/adapter.bin", io.BytesIO(b"z"), 1))
    refused(lambda: c.put_object(s3_bucket, "loras/job-a", io.BytesIO(b"z"), 1))  # the prefix without its slash
    refused(lambda: c.put_object(s3_bucket, "loras/job-ab/x", io.BytesIO(b"z"), 1))  # a jobId that extends ours
    refused(lambda: c.put_object(s3_bucket, "datasets/a.jsonl", io.BytesIO(b"z"), 1))  # its input is read-only
    refused(lambda: c.put_object(s3_bucket, "voices/job-a/x", io.BytesIO(b"z"), 1))  # not its type's prefix
    refused(lambda: c.put_object(s3_bucket, "loras/job-b/big.bin", io.BytesIO(b"y" * big), big, part_size=5 << 20))
    refused(lambda: c.get_object(s3_bucket, "loras/job-b/adapter.bin").read())
    refused(lambda: c.get_object(s3_bucket, "voices/job-b/voice.pt").read())
    refused(lambda: c.stat_object(s3_bucket, "voices/job-b/voice.pt"))
    refused(lambda: c.get_object(s3_bucket, "datasets/b.jsonl").read())
    refused(lambda: c.remove_object(s3_bucket, "loras/job-b/adapter.bin"))
    refused(lambda: list(c.list_objects(s3_bucket, recursive=True)))
    refused(lambda: list(c.list_objects(s3_bucket, prefix="loras/job-b/", recursive=True)))
    refused(lambda: list(c.list_objects(s3_bucket, prefix="loras/", recursive=True)))
    refused(lambda: c.make_bucket("another-bucket"))
    assert c.list_buckets() == []  # answered, but filtered to nothing: not even its own bucket is listed
    # Its keys cannot manage IAM either (the operator's keys can).
    with pytest.raises(IamError):
        S3JobCredentials(job_settings).create(JOB_B)

    # Revoked: refused everywhere, at once.
    assert creds.revoke(JOB_A) is True
    assert creds.revoke(JOB_A) is False
    refused(lambda: c.get_object(s3_bucket, "loras/job-a/adapter.bin").read(), "InvalidAccessKeyId")
    refused(lambda: c.put_object(s3_bucket, "loras/job-a/after", io.BytesIO(b"z"), 1), "InvalidAccessKeyId")
    refused(lambda: c.get_object(s3_bucket, "datasets/a.jsonl").read(), "InvalidAccessKeyId")


def test_create_again_replaces_the_key_and_sweep_removes_leftovers(
    creds: S3JobCredentials, admin_settings: Settings, s3_bucket: str
) -> None:
    first = creds.create(JOB_A)
    second = creds.create(JOB_A)
    creds.create(JOB_B)
    refused(lambda: job_client(admin_settings, first).get_object(s3_bucket, "datasets/a.jsonl"), "InvalidAccessKeyId")
    assert job_client(admin_settings, second).get_object(s3_bucket, "datasets/a.jsonl").read() == b"data"
    assert sorted(creds.users()) == sorted([user_name(JOB_A), user_name(JOB_B)])
    assert creds.sweep([JOB_A]) == [user_name(JOB_B)]
    assert creds.users() == [user_name(JOB_A)]
