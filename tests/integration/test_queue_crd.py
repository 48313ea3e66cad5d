"""crds/gpuqueue.yaml (issue 14): a structural, documented, cluster-scoped CRD that agrees with the pydantic model,
with its defaults and bounds enforced by a real kube-apiserver (kubectl apply, as a platform engineer would)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpujob.api.queues import GpuQueueSpec, QueuePreemption
from gpujob.sandbox.realcluster import run_kubectl
from tests.support.kubernetes import KubeSession

CRD = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" / "gpuqueue.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def aliases(model: Any) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


def test_the_crd_and_the_model_have_the_same_fields_and_defaults() -> None:
    spec = SCHEMA["properties"]["spec"]
    assert set(spec["properties"]) == aliases(GpuQueueSpec)
    assert set(spec["properties"]["preemption"]["properties"]) == aliases(QueuePreemption)
    defaults = GpuQueueSpec.model_validate({"quota": {"nvidia.com/gpu": 1}}).wire()
    assert spec["properties"]["weight"]["default"] == defaults["weight"] == 1
    assert spec["properties"]["borrow"]["default"] is defaults["borrow"] is True
    preemption = spec["properties"]["preemption"]["properties"]
    assert preemption["withinQueue"]["default"] == defaults["preemption"]["withinQueue"] == "LowerPriority"
    assert preemption["reclaim"]["default"] is defaults["preemption"]["reclaim"] is True
    assert CRD["spec"]["scope"] == "Cluster" and CRD["spec"]["names"]["shortNames"] == ["gq"]


def queue(name: str, **spec: Any) -> str:
    return json.dumps({"apiVersion": "gpujob.dev/v1alpha1", "kind": "GpuQueue", "metadata": {"name": name},
                       "spec": spec})  # fmt: skip


def test_a_real_apiserver_defaults_and_bounds_a_gpuqueue(kube_session: KubeSession) -> None:
    kubeconfig = kube_session.sandbox.kubeconfig
    try:
        applied = run_kubectl(
            kubeconfig, "apply", "-f", "-", input=queue("team-a", quota={"nvidia.com/gpu": 4, "cpu": "500m"})
        )
        assert applied.returncode == 0, applied.stderr
        got = json.loads(run_kubectl(kubeconfig, "get", "gq", "team-a", "-o", "json").stdout)
        assert got["spec"]["weight"] == 1 and got["spec"]["borrow"] is True
        assert got["spec"]["preemption"] == {"withinQueue": "LowerPriority", "reclaim": True}
        assert GpuQueueSpec.model_validate(got["spec"]).amounts() == {"nvidia.com/gpu": 4, "cpu": pytest.approx(0.5)}
        table = run_kubectl(kubeconfig, "get", "gpuqueues")
        assert table.stdout.split("\n")[0].split() == ["NAME", "QUOTA", "IN", "USE", "BORROWED", "PENDING", "RUNNING",
                                                       "WEIGHT", "AGE"]  # fmt: skip
        for bad, words in [
            ({"quota": {"nvidia.com/gpu": 1}, "weight": 0}, "spec.weight"),
            ({"quota": {"nvidia.com/gpu": "lots"}}, "spec.quota"),
            ({"quota": {"nvidia.com/gpu": 1}, "preemption": {"withinQueue": "Always"}}, "withinQueue"),
            ({"weight": 2}, "spec.quota: Required value"),
        ]:
            refused = run_kubectl(kubeconfig, "apply", "-f", "-", input=queue("bad", **bad))
            assert refused.returncode != 0 and words in refused.stderr, (bad, refused.stderr)
    finally:
        run_kubectl(kubeconfig, "delete", "gq", "team-a", "--ignore-not-found")
