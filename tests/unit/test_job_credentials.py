"""Per-job credentials in a job's life (issue 15): the pure parts of wiring them in (the Pod's mount, which jobs get
them, when they expire, their Secret, names that carry the expiry, the worker reading its files)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gpujob.api.models import GpuJobSpec
from gpujob.api.naming import credentials_secret_name
from gpujob.credentials import redis_acl, s3
from gpujob.credentials.common import JobRef as CredentialJob
from gpujob.operator.builders import CREDENTIALS_MOUNT_PATH, JobRef, PodDefaults, build_pod
from gpujob.operator.credentials import ended, expires_at, secret_body
from gpujob.settings import Settings
from gpujob.worker.credential_files import read_credential_files, with_credential_files

REF = JobRef("team-a", "job-a", "11111111-aaaa-4000-8000-000000000001")
DEFAULTS = PodDefaults(worker_image="w:1", worker_command=("gpujob", "worker"), worker_secret=None)


def spec(**fields: object) -> GpuJobSpec:
    return GpuJobSpec.model_validate({"type": "train_lora", **fields})


def test_the_pod_mounts_its_own_secret_as_files_and_gets_no_shared_secret() -> None:
    pod = build_pod(REF, spec(), 1, DEFAULTS, "job-a-11111-credentials")
    container = pod["spec"]["containers"][0]
    assert "envFrom" not in container
    volume = next(v for v in pod["spec"]["volumes"] if "secret" in v)
    assert volume["secret"] == {"secretName": "job-a-11111-credentials", "defaultMode": 0o400}
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert mount == {"name": volume["name"], "mountPath": CREDENTIALS_MOUNT_PATH, "readOnly": True}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GPUJOB_CREDENTIALS_DIR"] == CREDENTIALS_MOUNT_PATH
    assert not any(e["name"] in {"GPUJOB_REDIS_URL", "GPUJOB_S3_SECRET_KEY"} for e in container["env"])
    # The files are the Pod's group's (fsGroup) only: a kubelet makes 0400 into 0440 with that group.
    assert pod["spec"]["securityContext"]["fsGroup"] == DEFAULTS.run_as_user


def test_without_credentials_the_pod_has_no_secret_volume_and_the_legacy_secret_only_when_configured() -> None:
    bare = build_pod(REF, spec(), 1, DEFAULTS)
    assert not any("secret" in v for v in bare["spec"]["volumes"])
    assert "envFrom" not in bare["spec"]["containers"][0]
    legacy = build_pod(REF, spec(), 1, PodDefaults(worker_image="w:1", worker_command=("w",)))
    assert legacy["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "gpujob-worker", "optional": True}}]


@pytest.mark.parametrize(
    ("fields", "wanted"),
    [
        ({"type": "train_lora"}, (True, True)),
        ({"type": "render_video", "credentials": {"redis": False}}, (False, True)),
        ({"type": "custom"}, (False, False)),
        ({"type": "custom", "credentials": {"s3": True}}, (False, True)),
        ({"type": "custom", "credentials": {"redis": True, "s3": True}}, (True, True)),
    ],
)
def test_custom_images_get_credentials_only_when_they_ask(fields: dict[str, object], wanted: tuple[bool, bool]) -> None:
    assert GpuJobSpec.model_validate(fields).wants_credentials() == wanted


def test_credentials_expire_after_the_pending_timeout_the_run_and_the_margin() -> None:
    now = datetime(2026, 11, 30, tzinfo=UTC)
    settings = Settings(credentials_margin_seconds=60, credentials_lifetime_seconds=3600)
    start = int(now.timestamp())
    assert expires_at(spec(timeoutSeconds=100, pendingTimeoutSeconds=10), now, settings) == start + 10 + 100 + 60
    assert expires_at(spec(pendingTimeoutSeconds=10), now, settings) == start + 10 + 3600 + 60


def test_the_secret_is_owned_by_the_job_and_holds_one_key_per_setting() -> None:
    body = secret_body(REF, "job-a", {"GPUJOB_REDIS_URL": "redis://u:p@h:1/0"}, 1234)
    assert body["metadata"]["name"] == credentials_secret_name("job-a", REF.uid) == "job-a-11111-credentials"
    assert body["metadata"]["ownerReferences"] == [REF.owner_reference()]
    assert body["metadata"]["annotations"]["gpujob.dev/credentials-expire"] == "1234"
    assert base64.b64decode(body["data"]["GPUJOB_REDIS_URL"]).decode() == "redis://u:p@h:1/0"
    assert len(credentials_secret_name("x" * 253, REF.uid)) <= 63


def test_user_names_carry_the_expiry_and_parse_back() -> None:
    job = CredentialJob("ns", "n", REF.uid, "j")
    assert redis_acl.parse(redis_acl.username(job, 1700000000)) == ("ns", "n", REF.uid, 1700000000)
    assert redis_acl.parse(redis_acl.username(job)) == ("ns", "n", REF.uid, None)
    assert redis_acl.parse("gpujob-job:probe-host") is None and redis_acl.parse("default") is None
    name = s3.user_name(job, 1700000000)
    assert len(name) <= 64 and s3.parse(name) == (REF.uid, 1700000000)
    assert s3.parse(s3.user_name(job)) == (REF.uid, None) and s3.parse("gpujob-job-nope") is None


@pytest.mark.parametrize(
    ("job", "gone"),
    [
        ({"status": {"phase": "Running"}}, False),
        ({"status": {"phase": "Succeeded"}}, True),
        ({"status": {"phase": "Cancelled"}}, True),
        ({"status": {"phase": "Suspended"}}, False),
        ({"metadata": {"deletionTimestamp": "2026-11-30T00:00:00Z"}, "status": {"phase": "Running"}}, True),
        ({}, False),
    ],
)
def test_ended_jobs_are_finished_or_being_deleted(job: dict[str, object], gone: bool) -> None:
    assert ended(job) is gone


def test_the_worker_reads_its_credentials_from_the_files_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUJOB_S3_ACCESS_KEY", "shared-key")
    monkeypatch.setenv("GPUJOB_REDIS_URL", "redis://shared@h:1/0")
    (tmp_path / "GPUJOB_S3_ACCESS_KEY").write_text("job-key\n")
    (tmp_path / "GPUJOB_S3_SECURE").write_text("true")
    (tmp_path / "GPUJOB_TERMINATION_MESSAGE_PATH").write_text("/elsewhere")  # not a credential: ignored
    assert read_credential_files(tmp_path) == {"s3_access_key": "job-key", "s3_secure": "true"}
    settings = with_credential_files(Settings(credentials_dir=str(tmp_path)))
    assert settings.s3_access_key is not None and settings.s3_access_key.get_secret_value() == "job-key"
    assert settings.s3_secure is True
    assert settings.termination_message_path == "/dev/termination-log"
    # Outside the operator (no GPUJOB_CREDENTIALS_DIR) the environment alone, as before.
    plain = with_credential_files(Settings())
    assert plain.s3_access_key is not None and plain.s3_access_key.get_secret_value() == "shared-key"
