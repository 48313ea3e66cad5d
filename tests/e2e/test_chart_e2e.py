"""The chart in the emulator: `helm template | kubectl apply`, then the operator started exactly as the rendered
Deployment says (args, env) runs GpuJobs; every API call it made is allowed by the rendered RBAC, and every
grant was used (least privilege, derived from the emulator's request log)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpujob.api.constants import Phase
from gpujob.sandbox.faults import RequestKey
from tests.support.chart import NAMESPACE, allowed, grants, of_kind, operator_container, render
from tests.support.operator import Cluster, OperatorProcess, wait_for

HA_VALUES = Path(__file__).resolve().parents[2] / "charts" / "gpujob-operator" / "ci" / "ha-values.yaml"
OPERATOR_AGENTS = {"kopf", "gpujob-operator"}  # kopf's own client and our kubernetes_asyncio client
# Granted but not exercised by this run, each for a reason a real cluster has and the emulator has not.
GRANTED_FOR_REAL_CLUSTERS = {
    # OwnerReferencesPermissionEnforcement: setting blockOwnerDeletion on a Pod needs update on the owner's finalizers.
    ("gpujob.dev", "gpujobs/finalizers", "update"),
    # kopf re-scans CRDs to notice a CRD upgrade while it runs (cluster mode).
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    # Posted by kopf for warnings only; a clean run posts none.
    ("", "events", "create"),
    # The operator patches one of its Events only when it repeats (series.count); a clean run repeats none.
    ("events.k8s.io", "events", "patch"),
}


def operator_from_deployment(
    docs: list[dict[str, Any]], kubeconfig: Path, log: Path, secrets: dict[str, str]
) -> OperatorProcess:
    container = operator_container(docs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_")}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = "gj-gpujob-operator-7d9f-abcde"  # the Pod's name, from the downward API
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[f"{ref['name']}/{ref['key']}"]  # what the kubelet would resolve
    env["KUBECONFIG"] = str(kubeconfig)
    env["GPUJOB_METRICS_PORT"] = "0"
    assert container["command"] == ["gpujob"]
    argv = [sys.executable, "-m", "gpujob.cli", *container["args"]]
    return OperatorProcess(argv, env, log).start()


def test_chart_applied_to_emulator_runs_jobs_with_least_privilege(
    emulator: Any,
    kubectl: Any,
    k8s_api: Any,
    tmp_path: Path,
    redis_url: str,
    redis_client: Any,
    s3_server: Any,
    s3_client: Any,
    s3_bucket: str,
) -> None:
    # With an S3 server whose IAM the operator may use, per-job credentials are on (the chart's default, `auto`):
    # the Secrets grants are used as on a real install.
    s3_client.make_bucket(s3_bucket)
    s3 = [f"s3.endpoint={s3_server.endpoint}", "s3.secure=false", "s3.region=us-east-1", f"s3.bucket={s3_bucket}"]
    docs = render(HA_VALUES, include_crds=True, extra=["--set", ",".join([*s3, "s3.existingSecret=gpujob-s3"])])
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    kubectl("create", "namespace", NAMESPACE)
    # CRDs first, as on a real cluster: a kind must be registered before objects of it can be applied.
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(crds))
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rest))
    assert kubectl("get", "clusterkopfpeering", "-o", "name").stdout.strip()
    emulator.reset_counts()

    secrets = {
        "gpujob-redis/redis-url": redis_url,
        "gpujob-s3/access-key": s3_server.access_key,
        "gpujob-s3/secret-key": s3_server.secret_key,
    }
    operator = operator_from_deployment(docs, emulator.kubeconfig, tmp_path / "operator.log", secrets)
    try:
        k8s_api.user_agent = "gpujob-tests/1"
        cluster = Cluster(k8s_api, namespace=NAMESPACE)
        cluster.create_job("ok", {"type": "train_lora", "ttlSecondsAfterFinished": 1})
        cluster.create_job("retry", {"type": "custom", "retries": {"limit": 1, "backoffSeconds": 0}})
        # Through the stream, as the backend does: the bridge creates this one and later cancels it.
        redis_client.xadd("gpujobs:requests", {"job": json.dumps({"jobId": "stop", "type": "train_voice",
                                                                   "namespace": NAMESPACE})})  # fmt: skip
        cluster.run_pod("ok", 1)
        cluster.run_pod("retry", 1, exit_code=1)
        cluster.run_pod("retry", 2, exit_code=1)
        cluster.wait_phase("retry", Phase.FAILED)
        stop_pod = cluster.wait_pod("stop", 1).metadata.name
        cluster.set_pod(stop_pod, "Running")
        cluster.core.delete_namespaced_pod(stop_pod, NAMESPACE)  # from outside: a new attempt
        cluster.wait_pod("stop", 2)
        redis_client.xadd(
            "gpujobs:requests", {"action": "cancel", "job": json.dumps({"jobId": "stop", "namespace": NAMESPACE})}
        )
        cluster.wait_phase("stop", Phase.CANCELLED)
        wait_for(lambda: cluster.job("ok") is None, timeout=20, what="ttl deletion")
        # Some status writes conflict (as with a second writer): the re-read path runs and must be granted too.
        emulator.set_faults(status_conflict_rate=0.5, agents=["gpujob-operator"], seed=11)
        cluster.create_job("contended", {"type": "train_lora"})
        cluster.run_pod("contended", 1)
        cluster.wait_phase("contended", Phase.SUCCEEDED)
        # A job in a GpuQueue: the queue manager lists and watches queues and writes their status.
        queue = {"apiVersion": "gpujob.dev/v1alpha1", "kind": "GpuQueue", "metadata": {"name": "team"}}
        kubectl("apply", "-f", "-", input=yaml.safe_dump({**queue, "spec": {"quota": {"nvidia.com/gpu": 1}}}))
        cluster.create_job("queued", {"type": "train_lora", "queue": "team"})
        cluster.run_pod("queued", 1)
        cluster.wait_phase("queued", Phase.SUCCEEDED)
        assert emulator.thread.emulator.faults.injected["409"] > 0
    finally:
        operator.stop()

    calls: dict[RequestKey, int] = {}
    for (agent, key), count in emulator.request_counts_by_agent().items():
        if agent in OPERATOR_AGENTS:
            calls[key] = calls.get(key, 0) + count
    assert calls, "no operator requests were recorded"
    rbac = grants(docs)
    assert of_kind(docs, "ClusterRole"), "cluster mode renders a ClusterRole"
    used: set[tuple[str, str, str]] = set()
    for key in calls:
        resource = f"{key.resource}/{key.subresource}" if key.subresource else key.resource
        namespace = NAMESPACE if key.namespaced else None
        name = "gpujob-ha" if key.resource.endswith("kopfpeerings") else None
        assert allowed(rbac, key.group, resource, key.verb, namespace, name), f"not granted: {key}"
        used.add((key.group, resource, key.verb))
    granted = {(g.group, g.resource, g.verb) for g in rbac}
    unused = granted - used - GRANTED_FOR_REAL_CLUSTERS
    assert not unused, f"granted but never used: {sorted(unused)}"


@pytest.mark.parametrize("values", ["namespaced-values.yaml"])
def test_namespaced_chart_grants_only_roles(values: str) -> None:
    docs = render(HA_VALUES.with_name(values))
    # Nothing cluster-wide but the GpuQueues, which are cluster-scoped by design (docs/queues.md).
    assert {d["metadata"]["name"] for d in of_kind(docs, "ClusterRole", "ClusterRoleBinding")} == {
        "gj-gpujob-operator-queues"
    }
    assert {g.resource for g in grants(docs) if g.namespace is None} == {"gpuqueues", "gpuqueues/status"}
