"""The sandbox kubelet on its own thread against the emulator fixture (tests/integration/test_kubelet.py); the
end-to-end tests run the whole stack as processes with gpujob.sandbox.stack.LocalStack."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpujob.sandbox.kubelet import Kubelet, KubeletConfig
from gpujob.sandbox.loopthread import LoopThread
from tests.support.emulator import RunningEmulator


class KubeletThread(LoopThread):
    """The kubelet on its own event loop; leaving it ends every Pod's process."""

    def __init__(self, server: str, config: KubeletConfig) -> None:
        self.kubelet = Kubelet(server, config)
        super().__init__(self.kubelet, "sandbox-kubelet")

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(None, None, None)
        assert self.stopped, "the sandbox kubelet did not stop within 30 s"

    def pids(self) -> list[int]:
        return [p for p in self.call(lambda: [r.pid for r in self.kubelet.runners.values()]) if p]


@pytest.fixture
def kubelet_factory(emulator: RunningEmulator, tmp_path: Path) -> Iterator[Callable[..., KubeletThread]]:
    started: list[KubeletThread] = []

    def start(gpus: int = 1, **config: Any) -> KubeletThread:
        cfg = KubeletConfig(gpus=gpus, state_dir=tmp_path / "sandbox", models_dir=tmp_path / "models", **config)
        thread = KubeletThread(emulator.url, cfg).__enter__()
        started.append(thread)
        return thread

    yield start
    for thread in started:
        pids = thread.pids() if thread.loop is not None and thread.loop.is_running() else []
        thread.__exit__(None, None, None)
        for pid in pids:
            assert not _alive(pid), f"pod process {pid} survived the kubelet"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
