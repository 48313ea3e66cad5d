"""Run the Kubernetes API emulator: `async with Emulator(...)` on a loop, or `with EmulatorThread(...)` anywhere."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml
from aiohttp import web

from gpujob.sandbox.faults import Faults, RequestKey, RequestLog
from gpujob.sandbox.handler import SandboxHandler
from gpujob.sandbox.kubeconfig import write_kubeconfig
from gpujob.sandbox.loopthread import LoopThread
from gpujob.sandbox.objects import CRD_KEY, NAMESPACE_KEY, ObjectApi
from gpujob.sandbox.resources import Registry
from gpujob.sandbox.store import Store

Json = dict[str, Any]
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def load_manifests(paths: Iterable[str | Path]) -> list[Json]:
    """All documents of the given YAML files, and of the *.yaml/*.yml files of the given directories."""
    documents: list[Json] = []
    for path in map(Path, paths):
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
        for file in files:
            documents += [doc for doc in yaml.safe_load_all(file.read_text()) if isinstance(doc, dict)]
    return documents


class Emulator:
    """The emulated API server on a real HTTP port, with CRDs installed from files before it says it's up."""

    def __init__(
        self,
        crd_dirs: Iterable[str | Path] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        history_size: int = 10_000,
    ) -> None:
        self.crd_paths = list(crd_dirs)
        self.host, self.port = host, port
        self.registry = Registry()
        self.store = Store(history_size=history_size)
        self.api = ObjectApi(self.registry, self.store)
        self.faults = Faults()
        self.request_log = RequestLog()
        self.handler = SandboxHandler(self.registry, self.api, self.faults, self.request_log)
        self._runner: web.ServerRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        for namespace in INITIAL_NAMESPACES:
            self.create_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        for manifest in load_manifests(self.crd_paths):
            self.create_object(manifest)
        # handler_cancellation: a watch whose client disconnects ends at once instead of at its next write.
        server = web.Server(self.handler, handler_cancellation=True)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def create_object(self, obj: Json) -> Json:
        """Create an object in-process (no HTTP), e.g. CRDs and fixtures; the manifest names its resource."""
        group, _, version = obj["apiVersion"].rpartition("/")
        res = next(
            (r for r in self.registry.all() if (r.group, r.version, r.kind) == (group, version, obj["kind"])), None
        )
        if res is None:
            raise LookupError(f"no resource serves {obj['apiVersion']} {obj['kind']}")
        namespace = (obj.get("metadata") or {}).get("namespace") or ("default" if res.namespaced else "")
        return self.api.create(res, namespace, obj)

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        return write_kubeconfig(path, self.url, namespace)

    def request_counts(self) -> dict[RequestKey, int]:
        return self.request_log.snapshot()

    def request_counts_by_agent(self) -> dict[tuple[str, RequestKey], int]:
        return dict(self.request_log.by_agent)

    def total_requests(self) -> int:
        return self.request_log.total

    def reset_counts(self) -> None:
        self.request_log.reset()

    def has_crd(self, name: str) -> bool:
        return self.store.get(CRD_KEY, "", name) is not None

    def namespaces(self) -> list[str]:
        return [ns["metadata"]["name"] for ns in self.store.items(NAMESPACE_KEY)]


class EmulatorThread(LoopThread):
    """The emulator on its own thread and event loop, for synchronous code: pytest fixtures, benchmarks."""

    def __init__(self, crd_dirs: Iterable[str | Path] = (), **kwargs: Any) -> None:
        self.emulator = Emulator(crd_dirs, **kwargs)
        super().__init__(self.emulator, "gpujob-sandbox-emulator")

    @property
    def url(self) -> str:
        return self.emulator.url

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        return self.emulator.write_kubeconfig(path, namespace)

    def request_counts(self) -> dict[RequestKey, int]:
        result: dict[RequestKey, int] = self.call(self.emulator.request_counts)
        return result

    def request_counts_by_agent(self) -> dict[tuple[str, RequestKey], int]:
        result: dict[tuple[str, RequestKey], int] = self.call(self.emulator.request_counts_by_agent)
        return result

    def total_requests(self) -> int:
        result: int = self.call(self.emulator.total_requests)
        return result

    def reset_counts(self) -> None:
        self.call(self.emulator.reset_counts)

    def set_faults(self, **changes: Any) -> None:
        self.call(self.emulator.faults.update, changes)

    def create_object(self, obj: Json) -> Json:
        result: Json = self.call(self.emulator.create_object, obj)
        return result
