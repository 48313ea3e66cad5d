"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager (default controllers)
and kube-scheduler, the official binaries built from Go modules by hack/build-kubernetes.sh (`make kubernetes`).

The launcher only chooses flags, ports and files; every API behaviour comes from the real binaries (as envtest and
kwok do). Node agents (`gpujob kubelet`) are separate processes, started by the sandbox or the tests.

Shortened for a sandbox, and said here so nobody mistakes them for defaults: a node is NotReady 15 s after its
last heartbeat (default 50 s), and Pods on a NotReady/unreachable node are evicted after 10 s (default 300 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from gpujob.sandbox.kubeconfig import write_kubeconfig
from gpujob.sandbox.pki import LocalCA, service_account_key
from gpujob.sandbox.procs import ComponentMissing, ManagedProcess, free_port, port_open, wait_for

KUBERNETES_VERSION = "v1.37.2"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
REPO = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO / "hack" / "build-kubernetes.sh"
ADMIN_TOKEN_USER = "gpujob-admin"
NODE_MONITOR_GRACE = "15s"
EVICTION_TOLERATION_SECONDS = 10
SERVICE_CIDR = "10.96.0.0/16"  # allocated from, never routed: nothing here sends traffic to it


def bin_dir(build: bool = False) -> Path:
    """Where the binaries are: $GPUJOB_KUBE_BIN, else the build cache (built first when `build`)."""
    explicit = os.environ.get("GPUJOB_KUBE_BIN")
    if explicit:
        path = Path(explicit)
    elif build:
        out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, capture_output=True, text=True).stdout
        path = Path(out.strip().splitlines()[-1])
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        root = Path(os.environ.get("GPUJOB_KUBE_CACHE") or cache / "gpujob")
        path = root / f"kubernetes-{KUBERNETES_VERSION}" / "bin"
    missing = [b for b in BINARIES if not (path / b).is_file()]
    if missing:
        raise ComponentMissing(f"{', '.join(missing)} not in {path}: run `make kubernetes` (hack/build-kubernetes.sh)")
    return path


@dataclass
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int

    @classmethod
    def pick(cls, apiserver: int = 0) -> Ports:
        return cls(free_port(), free_port(), apiserver or free_port(), free_port(), free_port())


class ControlPlane:
    """`with ControlPlane(workdir) as cp:` a ready control plane; `cp.kubeconfig` is an admin (system:masters)
    kubeconfig. `restart("kube-apiserver")` / `restart("etcd")` stop and start one component in place."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        port: int = 0,
        binaries: Path | None = None,
        audit: bool = False,
        extra_args: dict[str, list[str]] | None = None,
    ) -> None:
        self.bin = binaries or bin_dir()
        self.audit = audit  # every request's metadata (user, agent, verb, resource) to logs/audit.log (benchmarks)
        self.extra_args = extra_args or {}
        self.workdir = (workdir or Path(tempfile.mkdtemp(prefix="gpujob-kube-"))).resolve()
        self.requested_port = port
        self.ports = Ports.pick(port)
        self.token = os.urandom(16).hex()
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.pki = self.workdir / "pki"
        self.processes: dict[str, ManagedProcess] = {}

    # --- files
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def serving_ca(self) -> Path:
        """The apiserver's self-signed serving certificate (it makes it in --cert-dir) doubles as the CA."""
        return self.pki / "apiserver" / "apiserver.crt"

    @property
    def node_ca(self) -> LocalCA:
        """Signs node agents' serving certificates and the apiserver's client certificate towards them."""
        return LocalCA(self.pki / "nodes")

    def _prepare(self) -> None:
        for sub in ("etcd", "pki/apiserver", "logs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        service_account_key(self.pki / "sa.key")
        (self.pki / "tokens.csv").write_text(f'{self.token},{ADMIN_TOKEN_USER},{ADMIN_TOKEN_USER},"system:masters"\n')
        (self.pki / "tokens.csv").chmod(0o600)
        self.node_ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", server=False)
        scheduler = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfig)},
            "leaderElection": {"leaderElect": False},
        }
        (self.workdir / "scheduler.yaml").write_text(json.dumps(scheduler))
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived", "ResponseStarted"],
            "rules": [{"level": "Metadata"}],
        }
        (self.workdir / "audit-policy.yaml").write_text(json.dumps(policy))

    @property
    def audit_log(self) -> Path:
        return self.workdir / "logs" / "audit.log"

    # --- argv
    def _argv(self, name: str) -> list[str]:
        return [*self._base_argv(name), *self.extra_args.get(name, [])]

    def _audit_args(self) -> list[str]:
        if not self.audit:
            return []
        return [
            f"--audit-policy-file={self.workdir / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-mode=batch",
            "--audit-log-maxsize=0",
        ]

    def _base_argv(self, name: str) -> list[str]:
        p, pki = self.ports, self.pki
        if name == "etcd":
            peer, client = f"http://127.0.0.1:{p.etcd_peer}", f"http://127.0.0.1:{p.etcd_client}"
            return [
                str(self.bin / "etcd"),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ]
        if name == "kube-apiserver":
            to_kubelet = self.node_ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", server=False)
            return [
                str(self.bin / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{p.etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={p.apiserver}",
                f"--cert-dir={pki / 'apiserver'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.key'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                "--endpoint-reconciler-type=none",
                f"--kubelet-certificate-authority={self.node_ca.cert_path}",
                f"--kubelet-client-certificate={to_kubelet.cert}",
                f"--kubelet-client-key={to_kubelet.key}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--default-not-ready-toleration-seconds={EVICTION_TOLERATION_SECONDS}",
                f"--default-unreachable-toleration-seconds={EVICTION_TOLERATION_SECONDS}",
                *self._audit_args(),
                "--v=1",
            ]
        if name == "kube-controller-manager":
            return [
                str(self.bin / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.controller_manager}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={self.serving_ca}",
                "--use-service-account-credentials=true",
                f"--node-monitor-grace-period={NODE_MONITOR_GRACE}",
                "--node-monitor-period=2s",
                # The quota controller counts from its informers: a Pod admitted while it recounts can be missed
                # (status.used one low, and the next Pod admitted past `hard`) until the next full resync, 5 min
                # by default. A short resync heals such a count in seconds.
                "--resource-quota-sync-period=10s",
                "--v=1",
            ]
        if name == "kube-scheduler":
            return [
                str(self.bin / "kube-scheduler"),
                f"--config={self.workdir / 'scheduler.yaml'}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.scheduler}",
                "--v=1",
            ]
        raise ValueError(name)

    def _ready(self, name: str) -> bool:
        if name == "etcd":
            return self._get(f"http://127.0.0.1:{self.ports.etcd_client}/health", tls=False) is not None
        if name == "kube-apiserver":
            return self.serving_ca.exists() and self._get(f"{self.url}/readyz") == "ok"
        port = self.ports.controller_manager if name == "kube-controller-manager" else self.ports.scheduler
        return port_open(port)

    def _get(self, url: str, tls: bool = True) -> str | None:
        context = None
        if tls:
            context = ssl.create_default_context(cafile=str(self.serving_ca))
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with (
            contextlib.suppress(OSError, urllib.error.URLError, ssl.SSLError, ValueError),
            urllib.request.urlopen(request, timeout=2, context=context) as resp,
        ):
            return str(resp.read().decode())
        return None

    # --- lifecycle
    def start(self, timeout: float = 120.0) -> Self:
        self._prepare()
        try:
            for name in BINARIES:
                self._start(name, timeout)
                if name == "kube-apiserver":
                    write_kubeconfig(self.kubeconfig, self.url, token=self.token, ca_pem=self.serving_ca.read_bytes())
            wait_for(self._default_service_account, timeout, 0.2, what="the default ServiceAccount")
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, name: str, timeout: float) -> None:
        log = self.workdir / "logs" / f"{name}.log"
        process = ManagedProcess(name, self._argv(name), lambda: self._ready(name), log)
        self.processes[name] = process
        process.start(timeout)

    def _default_service_account(self) -> bool:
        return self._get(f"{self.url}/api/v1/namespaces/default/serviceaccounts/default") is not None

    def restart(
        self, name: str, down: float = 0.0, timeout: float = 120.0, extra_args: list[str] | None = None
    ) -> None:
        """Stop one component (SIGTERM, SIGKILL after 5 s), stay down `down` seconds, start it again (with
        `extra_args` instead of the ones it had, when given)."""
        if extra_args is not None:
            self.extra_args[name] = extra_args
        self.processes[name].stop()
        time.sleep(down)
        self._start(name, timeout)

    def stop(self) -> None:
        for name in reversed(BINARIES):
            process = self.processes.pop(name, None)
            if process is not None:
                process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def logs(self, name: str, lines: int = 40) -> str:
        process = self.processes.get(name)
        return process.tail(lines) if process is not None else ""

    def versions(self) -> dict[str, Any]:
        body = self._get(f"{self.url}/version")
        result: dict[str, Any] = json.loads(body) if body else {}
        return result
