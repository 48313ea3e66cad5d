"""The pod builder: one Pod per attempt with the GPU, volume, identity and security settings of the spec."""

from __future__ import annotations

import hashlib
import json

import pytest

from gpujob.api.constants import GPU_PRODUCT_LABEL, MANAGER, Label
from gpujob.api.models import GpuJobSpec
from gpujob.api.naming import job_name, label_value, pod_name
from gpujob.operator.builders import JobRef, PodDefaults, build_pod
from gpujob.sandbox.podspec import Fit, fits

REF = JobRef(namespace="ml", name="lora-1", uid="0a1b2c3d-0000-4000-8000-000000000001")
DEFAULTS = PodDefaults(
    worker_image="registry.local/gpujob-worker:1",
    worker_command=("gpujob", "worker"),
    passthrough_env={"GPUJOB_S3_ENDPOINT": "minio:9000"},
)


def build(attempt: int = 1, **spec: object) -> dict:
    return build_pod(REF, GpuJobSpec.model_validate({"type": "train_lora", **spec}), attempt, DEFAULTS)


def container(pod: dict) -> dict:
    [only] = pod["spec"]["containers"]
    return only


def env_of(pod: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(pod)["env"]}


def test_gpu_limits_equal_requests_and_toleration_added() -> None:
    pod = build(gpus=2, resources={"limits": {"memory": "16Gi"}})
    res = container(pod)["resources"]
    assert res["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "2"}
    assert res["requests"] == {"nvidia.com/gpu": "2"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    "user",
    [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"},  # the GPU key, another effect
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"},  # one value only
    ],
    ids=["other-key", "other-key-any-effect", "gpu-key-noexecute", "gpu-key-one-value"],
)
def test_gpu_toleration_is_kept_beside_user_tolerations_that_dont_cover_it(user: dict[str, object]) -> None:
    assert build(gpus=1, tolerations=[user])["spec"]["tolerations"] == [user, GPU_TOLERATION]
    assert build(gpus=0, tolerations=[user])["spec"]["tolerations"] == [user]


@pytest.mark.parametrize(
    "user",
    [
        {"key": "nvidia.com/gpu", "operator": "Exists"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"operator": "Exists"},  # tolerates every taint
    ],
)
def test_no_second_gpu_toleration_when_a_user_one_covers_it(user: dict[str, object]) -> None:
    assert build(gpus=2, tolerations=[user])["spec"]["tolerations"] == [user]


def test_gpu_job_with_user_tolerations_fits_a_tainted_gpu_node() -> None:
    """The built Pod against the sandbox's scheduling check, on a GPU node tainted as clusters do."""
    taints = [GPU_TAINT, {"key": "dedicated", "value": "ml", "effect": "NoSchedule"}]
    labels = {GPU_PRODUCT_LABEL: "NVIDIA-A100"}
    user = [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    assert fits(build(gpus=1, tolerations=user), labels, 1, taints=taints).ok
    assert fits(build(gpus=1), labels, 1, taints=[GPU_TAINT]).ok
    refused = fits(build(gpus=1), labels, 1, taints=taints)
    assert refused == Fit(False, "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: ml}.")
    cpu_only = fits(build(gpus=0, tolerations=user), labels, 1, taints=taints)
    assert cpu_only == Fit(False, "0/1 nodes are available: 1 node(s) had untolerated taint {nvidia.com/gpu: present}.")


def test_cpu_only_job_has_no_gpu_limit_and_no_gpu_toleration() -> None:
    pod = build(gpus=0)
    assert "nvidia.com/gpu" not in json.dumps(container(pod)["resources"])
    assert "tolerations" not in pod["spec"]


def test_mig_resource_and_product_selector() -> None:
    pod = build(gpus=1, gpuResource="nvidia.com/mig-1g.10gb", gpuProduct="NVIDIA-A100-SXM4-80GB")
    assert container(pod)["resources"]["limits"] == {"nvidia.com/mig-1g.10gb": "1"}
    assert pod["spec"]["nodeSelector"] == {GPU_PRODUCT_LABEL: "NVIDIA-A100-SXM4-80GB"}


def test_models_volume_from_settings_read_only_by_default() -> None:
    pod = build()
    [models, shm] = pod["spec"]["volumes"]
    assert models["persistentVolumeClaim"] == {"claimName": "gpujob-models", "readOnly": True}
    assert shm["emptyDir"]["medium"] == "Memory"
    assert container(pod)["volumeMounts"][0] == {
        "name": "models",
        "mountPath": "/opt/models",
        "readOnly": True,
    }


def test_models_claim_and_subpath_from_spec() -> None:
    pod = build(models={"claimName": "team-a-models", "readOnly": False, "subPath": "llama"})
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "team-a-models",
        "readOnly": False,
    }
    assert container(pod)["volumeMounts"][0]["subPath"] == "llama"


def test_identity_labels_owner_and_restart_policy() -> None:
    pod = build(attempt=3, jobId="req:42")
    meta = pod["metadata"]
    # Expected values written out (not computed with the code under test): <job>-<uid's first 5 hex>-<attempt>;
    # a jobId that is no valid label value becomes a readable prefix plus the first 10 hex of its sha256.
    assert meta["name"] == "lora-1-0a1b2-3"
    assert meta["labels"] == {
        Label.JOB_ID: "req-42-" + hashlib.sha256(b"req:42").hexdigest()[:10],
        Label.JOB_NAME: "lora-1",
        Label.TYPE: "train_lora",
        Label.ATTEMPT: "3",
        Label.MANAGED_BY: MANAGER,
    }
    [owner] = meta["ownerReferences"]
    assert owner["uid"] == REF.uid and owner["controller"] is True and owner["kind"] == "GpuJob"
    assert pod["spec"]["restartPolicy"] == "Never"


def test_job_env_identity_and_params_json() -> None:
    env = env_of(
        build(
            attempt=2,
            jobId="j-7",
            params={"epochs": 3, "rank": 8},
            env=[{"name": "HF_HOME", "value": "/tmp"}],
        )
    )
    assert env["GPUJOB_JOB_ID"] == "j-7"
    assert env["GPUJOB_JOB_TYPE"] == "train_lora"
    assert json.loads(str(env["GPUJOB_JOB_PARAMS"])) == {"epochs": 3, "rank": 8}
    assert env["GPUJOB_ATTEMPT"] == "2"
    assert env["GPUJOB_S3_ENDPOINT"] == "minio:9000"
    assert env["HF_HOME"] == "/tmp"


def test_job_id_defaults_to_name() -> None:
    assert env_of(build())["GPUJOB_JOB_ID"] == "lora-1"


def test_image_and_command_default_to_worker_settings_and_can_be_overridden() -> None:
    assert container(build())["image"] == "registry.local/gpujob-worker:1"
    assert container(build())["command"] == ["gpujob", "worker"]
    custom = container(build(image="my/img:2", command=["python", "-m", "x"], args=["--fast"]))
    assert (custom["image"], custom["command"], custom["args"]) == (
        "my/img:2",
        ["python", "-m", "x"],
        ["--fast"],
    )


def test_restricted_security_and_no_service_account_token() -> None:
    pod = build()
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(pod)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert container(pod)["envFrom"] == [{"secretRef": {"name": "gpujob-worker", "optional": True}}]


def test_deadline_priority_and_user_tolerations() -> None:
    pod = build(
        timeoutSeconds=3600,
        priorityClassName="gpu-high",
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}],
    )
    assert pod["spec"]["activeDeadlineSeconds"] == 3600
    assert pod["spec"]["priorityClassName"] == "gpu-high"
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]


def test_pod_names_differ_per_attempt_and_per_job_incarnation() -> None:
    other = JobRef(namespace="ml", name="lora-1", uid="ffffffff-0000-4000-8000-000000000001")
    names = {pod_name("lora-1", REF.uid, 1), pod_name("lora-1", REF.uid, 2), pod_name("lora-1", other.uid, 1)}
    assert len(names) == 3
    long = pod_name("x" * 80, REF.uid, 12)
    assert len(long) <= 63 and long.endswith("-12")


@pytest.mark.parametrize("reserved", ["GPUJOB_JOB_ID", "GPUJOB_S3_SECRET_KEY"])
def test_user_env_cannot_override_reserved_names(reserved: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        GpuJobSpec.model_validate({"type": "custom", "env": [{"name": reserved, "value": "x"}]})


@pytest.mark.parametrize(
    ("job_id", "valid_as_is"),
    [("lora-1", True), ("Req_42", False), ("a" * 70, False), ("user:42/run", False)],
)
def test_job_name_is_a_dns_label_and_deterministic(job_id: str, valid_as_is: bool) -> None:
    name = job_name(job_id)
    assert name == job_name(job_id)
    assert len(name) <= 63
    assert (name == job_id) is valid_as_is
    assert all(c.islower() or c.isdigit() or c == "-" for c in name)


def test_label_value_hashes_only_when_needed() -> None:
    assert label_value("Req_42.a") == "Req_42.a"
    assert label_value("a:b") != label_value("a/b")
    assert len(label_value("z" * 100)) <= 63
