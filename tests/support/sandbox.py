"""The sandbox kubelet on its own thread against the emulator fixture (tests/test_kubelet.py); the end-to-end
tests run the whole stack as processes with gpujob.sandbox.stack.LocalStack."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from gpujob.sandbox.kubelet import Kubelet, KubeletConfig
from tests.support.emulator import RunningEmulator


class KubeletThread:
    """The kubelet on its own event loop; `stop()` ends every Pod's process."""

    def __init__(self, server: str, config: KubeletConfig) -> None:
        self.kubelet = Kubelet(server, config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sandbox-kubelet", daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._started.set()
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with self.kubelet:
            self._started.set()
            await self._stop.wait()

    def __enter__(self) -> KubeletThread:
        self._thread.start()
        if not self._started.wait(30) or self._error is not None:
            raise RuntimeError(f"the sandbox kubelet did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.loop is not None and self._stop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the sandbox kubelet did not stop within 30 s"

    def call(self, func: Callable[[], Any]) -> Any:
        """Read the kubelet's state on its own loop."""
        assert self.loop is not None

        async def call() -> Any:
            return func()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

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
