"""The chart on the real control plane: `helm install`, `helm upgrade` (cluster-wide → namespaced RBAC) and
`helm uninstall`, with the real RBAC authorizer answering what the operator's ServiceAccount may do."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from gpujob.sandbox.realcluster import run_kubectl
from tests.support.chart import CHART, REQUIRED_VALUES, binary, run
from tests.support.kubernetes import KubeSession

# The operator Pod must not run in this test (its image is never pulled; the sandbox's node agents would run its
# command as a local process): a nodeSelector no Node has keeps it Pending, which is all `helm install` needs.
PARKED = ["--set", "nodeSelector.gpujob\\.dev/test-pen=no-node-has-this", *REQUIRED_VALUES]


def helm(session: KubeSession, *args: str, check: bool = True) -> str:
    proc = run([binary("helm"), "--kubeconfig", str(session.sandbox.kubeconfig), *args], check=check)
    return proc.stdout


def can_i(session: KubeSession, account: str, verb: str, resource: str, namespace: str) -> bool:
    proc = run_kubectl(session.sandbox.kubeconfig, "auth", "can-i", verb, resource, "-n", namespace, f"--as={account}")
    assert proc.stdout.strip() in ("yes", "no"), proc.stderr
    return proc.stdout.strip() == "yes"


def kinds_of_release(session: KubeSession, release: str, namespace: str) -> set[str]:
    selector = f"app.kubernetes.io/instance={release}"
    kinds = "deployment,serviceaccount,service,role,rolebinding,clusterrole,clusterrolebinding"
    proc = run_kubectl(session.sandbox.kubeconfig, "get", kinds, "-A", "-l", selector, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    return {item["kind"] for item in json.loads(proc.stdout)["items"]}


@pytest.fixture
def release(kube_session: KubeSession) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:6]
    return f"gjh-{suffix}", f"gpujob-helm-{suffix}"


def test_helm_install_upgrade_uninstall_on_a_real_control_plane(
    kube_session: KubeSession, kube_namespace: str, release: tuple[str, str], tmp_path: Path
) -> None:
    name, namespace = release
    account = f"system:serviceaccount:{namespace}:{name}-gpujob-operator"
    helm(kube_session, "install", name, str(CHART), "-n", namespace, "--create-namespace", "--wait=false", *PARKED)
    try:
        status = json.loads(helm(kube_session, "status", name, "-n", namespace, "-o", "json"))
        assert status["info"]["status"] == "deployed" and status["version"] == 1
        assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds_of_release(
            kube_session, name, namespace
        )
        # Cluster-wide: the authorizer grants exactly the chart's rules, in any namespace.
        assert can_i(kube_session, account, "create", "gpujobs.gpujob.dev", kube_namespace)
        assert can_i(kube_session, account, "patch", "gpujobs.gpujob.dev/status", kube_namespace)
        assert can_i(kube_session, account, "delete", "pods", kube_namespace)
        assert not can_i(kube_session, account, "get", "secrets", kube_namespace)
        assert not can_i(kube_session, account, "update", "pods", kube_namespace)

        # Upgrade to namespaced mode: cluster-scoped grants go (but those on the GpuQueues, cluster-scoped by
        # design), a Role in the watched namespace comes.
        helm(
            kube_session,
            "upgrade",
            name,
            str(CHART),
            "-n",
            namespace,
            "--wait=false",
            *PARKED,
            "--set",
            f"watchNamespaces={{{kube_namespace}}}",
            "--set",
            f"jobNamespace={kube_namespace}",
        )
        status = json.loads(helm(kube_session, "status", name, "-n", namespace, "-o", "json"))
        assert status["info"]["status"] == "deployed" and status["version"] == 2
        kinds = kinds_of_release(kube_session, name, namespace)
        assert "Role" in kinds
        assert can_i(kube_session, account, "create", "gpujobs.gpujob.dev", kube_namespace)
        assert not can_i(kube_session, account, "create", "gpujobs.gpujob.dev", "default")
        assert not can_i(kube_session, account, "list", "pods", "default")
        assert can_i(kube_session, account, "watch", "gpuqueues.gpujob.dev", kube_namespace)
        assert not can_i(kube_session, account, "delete", "gpuqueues.gpujob.dev", kube_namespace)
    finally:
        helm(kube_session, "uninstall", name, "-n", namespace, "--wait", "--timeout", "60s", check=False)
    assert kinds_of_release(kube_session, name, namespace) == set()
    assert not can_i(kube_session, account, "create", "gpujobs.gpujob.dev", kube_namespace)
    # CRDs are not a release's to delete: the GpuJob API stays for other installs and existing jobs.
    crd = run_kubectl(kube_session.sandbox.kubeconfig, "get", "crd", "gpujobs.gpujob.dev")
    assert crd.returncode == 0, crd.stderr
