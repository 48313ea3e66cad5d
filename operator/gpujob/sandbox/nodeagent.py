"""What makes the sandbox kubelet a node agent on a real control plane, beside running Pods:

- `Heartbeat`: renews the Node's Lease in kube-node-lease and its Ready condition, so the node-lifecycle
  controller keeps it Ready (and marks it NotReady, then evicts its Pods, once the agent is gone);
- `LogServer`: the kubelet's `/containerLogs/{namespace}/{pod}/{container}` endpoint on loopback over HTTPS, which
  kube-apiserver proxies for `kubectl logs` and `kubectl logs -f`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from gpujob.sandbox import podlogs
from gpujob.sandbox.kubeclient import MERGE, ApiError, KubeClient

log = logging.getLogger("gpujob.sandbox.kubelet")
LEASE_SECONDS = 40


def micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Heartbeat:
    def __init__(self, client: KubeClient, node: str, period: float) -> None:
        self.client, self.node, self.period = client, node, period

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except (ApiError, OSError, TimeoutError) as exc:
                log.warning("sandbox kubelet: heartbeat of node %s failed: %r", self.node, exc)
            await asyncio.sleep(self.period)

    async def beat(self) -> None:
        await self._renew_lease()
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "sandbox kubelet is posting ready status",
            "lastHeartbeatTime": now,
        }
        # Strategic merge by type: lastTransitionTime stays as it was unless the status changed.
        patch = {"status": {"conditions": [ready]}}
        await self.client.request(
            "PATCH",
            f"/api/v1/nodes/{self.node}/status",
            patch,
            {"Content-Type": "application/strategic-merge-patch+json"},
        )

    async def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_time()}
        try:
            await self.client.request("PATCH", path, {"spec": spec}, MERGE)
        except ApiError as exc:
            if exc.status != 404:
                raise
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.node, "namespace": "kube-node-lease"},
                "spec": spec,
            }
            with contextlib.suppress(ApiError):  # 409: created meanwhile; the next beat renews it
                await self.client.request(
                    "POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease
                )


class LogServer:
    """Serves the newest log of each Pod (by namespace and name) from the kubelet's pods directory."""

    def __init__(self, pods_dir: Path, cert: Path, key: Path) -> None:
        self.pods_dir, self.cert, self.key = pods_dir, cert, key
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._running: Callable[[str, str], bool] = lambda namespace, name: False

    async def start(self, running: Callable[[str, str], bool]) -> None:
        self._running = running
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._logs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.cert), str(self.key))
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        server: Any = site._server
        self.port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _log_path(self, namespace: str, pod: str) -> Path | None:
        candidates = list(self.pods_dir.glob(f"{namespace}_{pod}_*/{podlogs.LOG_FILE}"))
        return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        namespace, pod, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        try:
            options = podlogs.LogOptions.from_query(request.query, container, pod)
            path = self._log_path(namespace, pod)
            if path is None:
                raise podlogs.LogUnavailable(
                    f'container "{container}" in pod "{pod}" is waiting to start: ContainerCreating'
                )
        except podlogs.LogUnavailable as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return await podlogs.stream(request, path, options, lambda: not self._running(namespace, pod))
