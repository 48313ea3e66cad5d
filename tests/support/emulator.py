"""Fixtures: a running Kubernetes API emulator (real HTTP), the real kubectl, and a kubernetes client for it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpujob.sandbox import EmulatorThread
from gpujob.sandbox.procs import wait_for

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
KUBECTL = Path(sys.executable).with_name("kubectl")


class RunningEmulator:
    """What tests get: the emulator thread plus the kubeconfig written for it."""

    def __init__(self, thread: EmulatorThread, kubeconfig: Path) -> None:
        self.thread = thread
        self.kubeconfig = kubeconfig

    @property
    def url(self) -> str:
        return self.thread.url

    def __getattr__(self, name: str) -> Any:  # request_counts(), reset_counts(), set_faults(), create_object()
        return getattr(self.thread, name)


@pytest.fixture
def emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningEmulator]:
    with EmulatorThread(crd_dirs=[CRDS]) as thread:
        kubeconfig = thread.write_kubeconfig(tmp_path / "kubeconfig")
        # kopf and the kubernetes client log in from the default kubeconfig: point it (and KUBECONFIG) here.
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        import kubernetes.config.kube_config as kube_config

        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        yield RunningEmulator(thread, kubeconfig)


KubectlRunner = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def kubectl(emulator: RunningEmulator) -> KubectlRunner:
    """`kubectl("get", "gj", input=..., check=True, timeout=60)`: the real kubectl against the emulator."""

    def run(
        *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(KUBECTL), "--kubeconfig", str(emulator.kubeconfig), *args]
        env = {**os.environ, "KUBECONFIG": str(emulator.kubeconfig), "KUBECTL_INTERACTIVE_DELETE": "false"}
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    return run


@pytest.fixture
def k8s_api(emulator: RunningEmulator) -> Iterator[Any]:
    """A synchronous `kubernetes.client.ApiClient` configured for the emulator."""
    import kubernetes

    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(emulator.kubeconfig), client_configuration=configuration)
    with kubernetes.client.ApiClient(configuration) as client:
        yield client


def wait_until(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, message: str = "") -> Any:
    """`gpujob.sandbox.procs.wait_for`, with the emulator tests' keyword."""
    return wait_for(condition, timeout, interval, what=message)
