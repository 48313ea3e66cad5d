"""A sandbox component (an async context manager) on its own thread and event loop, for synchronous code:
pytest fixtures, benchmarks."""

from __future__ import annotations

import asyncio
import threading
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Self


class LoopThread:
    def __init__(self, component: AbstractAsyncContextManager[Any], name: str, timeout: float = 30.0) -> None:
        self.component = component
        self.name = name
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._started.wait(timeout=self.timeout):
            raise TimeoutError(f"{self.name} did not start within {self.timeout:g} s")
        if self._error is not None:
            raise RuntimeError(f"{self.name} failed to start") from self._error
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.loop is not None and self._stop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=self.timeout)

    @property
    def stopped(self) -> bool:
        return not self._thread.is_alive()

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
        async with self.component:
            self._started.set()
            await self._stop.wait()

    def call(self, func: Any, *args: Any) -> Any:
        """Run `func(*args)` on the component's loop (its state is not thread-safe) and return the result."""
        assert self.loop is not None

        async def call() -> Any:
            return func(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=self.timeout)
