"""Pure builders: the Pod of one attempt of a GpuJob, as a plain dict (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gpujob.api.constants import (
    API_VERSION,
    CONTAINER_NAME,
    GPU_PRODUCT_LABEL,
    GPU_TAINT_KEY,
    KIND,
    MANAGER,
    MODELS_MOUNT_PATH,
    MODELS_VOLUME_NAME,
    TERMINATION_MESSAGE_PATH,
    Label,
)
from gpujob.api.models import GpuJobSpec
from gpujob.api.naming import label_value, pod_name

# The job's per-job credentials Secret (issue 15), mounted read-only as files: one file per GPUJOB_* setting.
CREDENTIALS_VOLUME_NAME = "credentials"
CREDENTIALS_MOUNT_PATH = "/var/run/gpujob/credentials"
# 0400: with the Pod's fsGroup the kubelet makes them 0440, group = the Pod's group; no other user reads them.
CREDENTIALS_FILE_MODE = 0o400


@dataclass(frozen=True)
class PodDefaults:
    """Operator settings that shape every job Pod (from gpujob.settings, passed in so builders stay pure)."""

    worker_image: str
    worker_command: tuple[str, ...]
    image_pull_policy: str = "IfNotPresent"
    models_pvc: str = "gpujob-models"
    worker_secret: str | None = "gpujob-worker"
    run_as_user: int = 10001
    service_account: str | None = None
    passthrough_env: dict[str, str] = field(default_factory=dict)  # non-secret settings, e.g. S3 endpoint
    # Cluster-wide defaults of job Pods (chart: worker.*); a GpuJob's own values win or add to them.
    image_pull_secrets: tuple[str, ...] = ()
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    priority_class_name: str | None = None
    shm_size: str = "2Gi"


@dataclass(frozen=True)
class JobRef:
    """Identity of the owning GpuJob."""

    namespace: str
    name: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def job_id_of(ref: JobRef, spec: GpuJobSpec) -> str:
    return spec.job_id or ref.name


def pod_labels(ref: JobRef, spec: GpuJobSpec, attempt: int) -> dict[str, str]:
    return {
        Label.JOB_ID: label_value(job_id_of(ref, spec)),
        Label.JOB_NAME: label_value(ref.name),  # a GpuJob name may be 253 long: a label value at most 63
        Label.TYPE: spec.type.value,
        Label.ATTEMPT: str(attempt),
        Label.MANAGED_BY: MANAGER,
    }


def _env(ref: JobRef, spec: GpuJobSpec, attempt: int, defaults: PodDefaults) -> list[dict[str, Any]]:
    # User env first; ours last so they win (the CRD and the model also forbid GPUJOB_* user names).
    env: list[dict[str, Any]] = [{"name": e.name, "value": e.value} for e in spec.env]
    env += [{"name": k, "value": v} for k, v in sorted(defaults.passthrough_env.items())]
    env += [
        {"name": "GPUJOB_JOB_ID", "value": job_id_of(ref, spec)},
        {"name": "GPUJOB_JOB_TYPE", "value": spec.type.value},
        {"name": "GPUJOB_JOB_PARAMS", "value": spec.params_json()},  # bounded: GpuJobSpec.params_error
        {"name": "GPUJOB_ATTEMPT", "value": str(attempt)},
        {"name": "GPUJOB_MODELS_DIR", "value": MODELS_MOUNT_PATH},
        {"name": "GPUJOB_TERMINATION_MESSAGE_PATH", "value": TERMINATION_MESSAGE_PATH},
        {"name": "GPUJOB_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "GPUJOB_POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    return env


def _resources(spec: GpuJobSpec) -> dict[str, Any]:
    requests = {k: str(v) for k, v in spec.resources.requests.items()}
    limits = {k: str(v) for k, v in spec.resources.limits.items()}
    if spec.gpus > 0:
        # Extended resources can't be overcommitted: request = limit.
        limits[spec.gpu_resource] = str(spec.gpus)
        requests[spec.gpu_resource] = str(spec.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


GPU_TOLERATION: dict[str, Any] = {"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
# CPU attempts (spec.fallback): node labels only GPU nodes carry (GPU Feature Discovery, device plugins) are not
# asked for, the GPU taint is not tolerated (a CPU attempt stays off GPU nodes where they are tainted), and the
# worker is told it runs on CPU by intent; NVIDIA_VISIBLE_DEVICES=void: a node whose container runtime hands every
# GPU to every container (the NVIDIA runtime as default) gives this one none.
GPU_LABEL_PREFIXES = ("nvidia.com/", "amd.com/")
CPU_ATTEMPT_ENV = {"GPUJOB_GPUS": "0", "NVIDIA_VISIBLE_DEVICES": "void"}


def _gpu_label(key: str) -> bool:
    return key.startswith(GPU_LABEL_PREFIXES)


def cpu_attempt(spec: GpuJobSpec) -> GpuJobSpec:
    """The spec of an attempt on CPU: no GPUs, spec.fallback.resources (the job's own when it sets none), no GPU
    node selector (gpuProduct, nvidia.com/* labels), no toleration of the GPU taint."""
    fallback = spec.fallback
    resources = (
        fallback.resources
        if fallback is not None and (fallback.resources.requests or fallback.resources.limits)
        else spec.resources
    )
    return spec.model_copy(
        update={
            "gpus": 0,
            "gpu_product": None,
            "resources": resources,
            "node_selector": {k: v for k, v in spec.node_selector.items() if not _gpu_label(k)},
            "tolerations": [t for t in spec.tolerations if t.key != GPU_TAINT_KEY],
        }
    )


def _covers_gpu_taint(toleration: dict[str, Any]) -> bool:
    """Does a user toleration already tolerate GPU_TOLERATION's taints (any value, NoSchedule)?"""
    if toleration.get("operator") != "Exists" or toleration.get("effect") not in (None, "NoSchedule"):
        return False
    return toleration.get("key") in (None, GPU_TAINT_KEY)


def _tolerations(spec: GpuJobSpec, defaults: PodDefaults) -> list[dict[str, Any]]:
    """The user's tolerations and the operator's default ones, plus the GPU toleration for GPU jobs unless one of
    them already covers it (one for another key, or for the GPU key with another effect or only one value, does
    not)."""
    tolerations = [t.wire() for t in spec.tolerations]
    tolerations += [dict(t) for t in defaults.tolerations if t not in tolerations]
    if spec.gpus > 0 and not any(_covers_gpu_taint(t) for t in tolerations):
        # The device plugin does not add it, and many clusters taint their GPU nodes.
        tolerations.append(dict(GPU_TOLERATION))
    return tolerations


def build_pod(
    ref: JobRef,
    spec: GpuJobSpec,
    attempt: int,
    defaults: PodDefaults,
    credentials_secret: str | None = None,
    *,
    cpu: bool = False,
) -> dict[str, Any]:
    """The Pod of `attempt` (1-based): deterministic name, owned by the GpuJob, restricted security context.
    `credentials_secret`: the job's own credentials Secret, mounted as files (GPUJOB_CREDENTIALS_DIR).
    `cpu`: an attempt on CPU (spec.fallback, status.fallback): see `cpu_attempt`; the operator's default GPU node
    selectors and GPU-taint tolerations are left out too."""
    if cpu:
        spec = cpu_attempt(spec)
        defaults = replace(
            defaults,
            node_selector={k: v for k, v in defaults.node_selector.items() if not _gpu_label(k)},
            tolerations=tuple(t for t in defaults.tolerations if t.get("key") != GPU_TAINT_KEY),
            passthrough_env=defaults.passthrough_env | CPU_ATTEMPT_ENV,
        )
    node_selector = defaults.node_selector | spec.node_selector
    if spec.gpu_product:
        node_selector[GPU_PRODUCT_LABEL] = spec.gpu_product
    mount: dict[str, Any] = {
        "name": MODELS_VOLUME_NAME,
        "mountPath": MODELS_MOUNT_PATH,
        "readOnly": spec.models.read_only,
    }
    if spec.models.sub_path:
        mount["subPath"] = spec.models.sub_path
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image or defaults.worker_image,
        "imagePullPolicy": spec.image_pull_policy or defaults.image_pull_policy,
        "command": list(spec.command or defaults.worker_command),
        "args": list(spec.args),
        "env": _env(ref, spec, attempt, defaults),
        "resources": _resources(spec),
        "volumeMounts": [mount, {"name": "dshm", "mountPath": "/dev/shm"}],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    if defaults.worker_secret:
        container["envFrom"] = [{"secretRef": {"name": defaults.worker_secret, "optional": True}}]
    volumes: list[dict[str, Any]] = []
    if credentials_secret:
        container["env"].append({"name": "GPUJOB_CREDENTIALS_DIR", "value": CREDENTIALS_MOUNT_PATH})
        container["volumeMounts"].append(
            {"name": CREDENTIALS_VOLUME_NAME, "mountPath": CREDENTIALS_MOUNT_PATH, "readOnly": True}
        )
        secret = {"secretName": credentials_secret, "defaultMode": CREDENTIALS_FILE_MODE}
        volumes.append({"name": CREDENTIALS_VOLUME_NAME, "secret": secret})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [
            {
                "name": MODELS_VOLUME_NAME,
                "persistentVolumeClaim": {
                    "claimName": spec.models.claim_name or defaults.models_pvc,
                    "readOnly": spec.models.read_only,
                },
            },
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": defaults.shm_size}},
            *volumes,
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": defaults.run_as_user,
            "runAsGroup": defaults.run_as_user,
            "fsGroup": defaults.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": 60,  # time for the worker to save a checkpoint on SIGTERM
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations := _tolerations(spec, defaults):
        pod_spec["tolerations"] = tolerations
    if defaults.service_account:
        pod_spec["serviceAccountName"] = defaults.service_account
    if priority_class := spec.priority_class_name or defaults.priority_class_name:
        pod_spec["priorityClassName"] = priority_class
    pull_secrets = list(dict.fromkeys([*defaults.image_pull_secrets, *(s.name for s in spec.image_pull_secrets)]))
    if pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in pull_secrets]
    if spec.timeout_seconds:
        pod_spec["activeDeadlineSeconds"] = spec.timeout_seconds
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(ref.name, ref.uid, attempt),
            "namespace": ref.namespace,
            "labels": pod_labels(ref, spec, attempt),
            "ownerReferences": [ref.owner_reference()],
        },
        "spec": pod_spec,
    }
