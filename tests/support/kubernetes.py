"""The real control plane for tests: one per test session (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler built from Go modules, plus `gpujob kubelet` node agents), a restricted namespace per test.

`api` is the backend-neutral fixture: the operator, intake and end-to-end suites take it and run once on the
`emulator` and once on `kubernetes`. On `kubernetes` the operator authenticates as the Helm chart's
ServiceAccount (a TokenRequest token), so the real RBAC authorizer enforces the chart's ClusterRole.
A test that also takes the `emulator` fixture (request logs, fault injection) runs on the emulator only;
`@pytest.mark.backends("kubernetes")` narrows a test to one backend.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpujob.sandbox.realcluster import KubernetesSandbox, prepare_namespace, run_kubectl
from tests.support.chart import CHART, NAMESPACE, RELEASE, REQUIRED_VALUES, helm, parse_manifests

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
BACKENDS = ("emulator", "kubernetes")
# The real control plane is asynchronous where the emulator is immediate (GC discovery every 30 s, the
# scheduler, controllers): waits on it get this much more time.
KUBERNETES_SLOWDOWN = 4.0
RBAC_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}


def restricted_container(command: list[str], image: str = "local/none:never-pulled") -> dict[str, Any]:
    """A container that passes the `restricted` Pod Security profile (test namespaces enforce it); its command
    runs as a local process on a node agent (images are never pulled)."""
    return {
        "name": "main",
        "image": image,
        "command": command,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


@dataclass
class KubeSession:
    sandbox: KubernetesSandbox
    workdir: Path
    operator_account: tuple[str, str]
    operator_token: str = ""
    namespaces: list[str] = field(default_factory=list)


@dataclass
class ApiTarget:
    """Where a test's API calls go. `kubeconfig` is an admin's with the test's namespace as its context;
    `operator_kubeconfig` is what the operator logs in with; `operator_args` scope it to the namespace."""

    backend: str
    kubeconfig: Path
    namespace: str
    operator_kubeconfig: Path
    operator_args: tuple[str, ...] = ()
    emulator: Any = None  # the emulator fixture's object, on that backend
    kube: KubeSession | None = None

    @property
    def slowdown(self) -> float:
        return KUBERNETES_SLOWDOWN if self.backend == "kubernetes" else 1.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run an `api` test only on these backends")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "api" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    backends = list(marker.args) if marker else list(BACKENDS)
    if "emulator" in metafunc.fixturenames:  # emulator internals (request log, faults): emulator only
        backends = [b for b in backends if b == "emulator"]
    metafunc.parametrize("api", backends, indirect=True)


def _install_operator_rbac(sandbox: KubernetesSandbox) -> tuple[str, str]:
    """The chart's ServiceAccount and cluster-wide RBAC, rendered by helm and applied with kubectl."""
    docs = parse_manifests(helm("template", RELEASE, CHART, "--namespace", NAMESPACE, *REQUIRED_VALUES).stdout)
    rbac = [d for d in docs if d.get("kind") in RBAC_KINDS]
    account = next(d for d in rbac if d["kind"] == "ServiceAccount")
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}

    result = run_kubectl(sandbox.kubeconfig, "apply", "-f", "-", input=yaml.safe_dump_all([namespace, *rbac]))
    assert result.returncode == 0, f"applying the chart's RBAC failed:\n{result.stderr}"
    return account["metadata"].get("namespace") or NAMESPACE, account["metadata"]["name"]


@pytest.fixture(scope="session")
def kube_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeSession]:
    workdir = tmp_path_factory.mktemp("kubernetes")
    sandbox = KubernetesSandbox(workdir / "sandbox", nodes=2, gpus=2, crds=[CRDS], build=True)
    sandbox.start()
    try:
        account = _install_operator_rbac(sandbox)
        session = KubeSession(sandbox, workdir, account)
        session.operator_token = sandbox.service_account_token(*account)
        yield session
    finally:
        sandbox.stop()


@pytest.fixture
def kube_namespace(kube_session: KubeSession) -> Iterator[str]:
    """A fresh namespace (restricted Pod Security, models PV/PVC, default ServiceAccount) for one test."""
    namespace = f"t-{uuid.uuid4().hex[:10]}"
    rest = kube_session.sandbox.rest()
    prepare_namespace(rest, namespace, kube_session.sandbox.models_dir)
    kube_session.namespaces.append(namespace)
    yield namespace
    rest.request("DELETE", f"/api/v1/namespaces/{namespace}")
    rest.request("DELETE", f"/api/v1/persistentvolumes/gpujob-models-{namespace}")


@pytest.fixture
def api(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ApiTarget:
    if request.param == "emulator":
        emulator = request.getfixturevalue("emulator")
        return ApiTarget("emulator", emulator.kubeconfig, "default", emulator.kubeconfig, emulator=emulator)
    session: KubeSession = request.getfixturevalue("kube_session")
    namespace: str = request.getfixturevalue("kube_namespace")
    admin = session.sandbox.write_kubeconfig(tmp_path / "kubeconfig", namespace)
    operator = session.sandbox.write_kubeconfig(tmp_path / "operator.kubeconfig", namespace, session.operator_token)
    monkeypatch.setenv("KUBECONFIG", str(admin))
    import kubernetes.config.kube_config as kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(admin))
    return ApiTarget("kubernetes", admin, namespace, operator, ("--namespace", namespace), kube=session)
