"""Health of the operator and its one HTTP server: /healthz (liveness), /readyz (readiness) and /metrics.

`Health` holds the readiness checks (each dependency the operator needs registers one); `serve` composes the HTTP
server from a `Health` and a Prometheus registry (the injected `gpujob.metrics.Metrics`'s), and is started once
per process by the operator's entry point, before kopf starts, so probes answer while start-up is still retried.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from gpujob.logging import get_logger

log = get_logger(__name__)

READINESS_TIMEOUT_SECONDS: Final = 3.0

ReadinessCheck = Callable[[], Awaitable[bool]]


class Health:
    """Readiness checks by name; /readyz is 200 only when every check answers True in time."""

    def __init__(self, readiness_timeout: float = READINESS_TIMEOUT_SECONDS) -> None:
        self._readiness: dict[str, ReadinessCheck] = {}
        self.readiness_timeout = readiness_timeout

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        """`check` answers True when its dependency is usable; /readyz is 200 only when all answer True."""
        self._readiness[name] = check

    def remove_readiness_check(self, name: str) -> None:
        self._readiness.pop(name, None)

    async def readiness(self) -> dict[str, bool]:
        names = list(self._readiness)
        results = await asyncio.gather(*(self._run_check(n, self._readiness[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def _run_check(self, name: str, check: ReadinessCheck) -> bool:
        try:
            async with asyncio.timeout(self.readiness_timeout):
                return bool(await check())
        except Exception as exc:  # TimeoutError included: a hung dependency is not ready
            log.info("readiness check failed", check=name, error=repr(exc))
            return False


def make_app(health: Health, registry: CollectorRegistry) -> web.Application:
    async def handle_metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    async def handle_readyz(_: web.Request) -> web.Response:
        checks = await health.readiness()
        ready = all(checks.values())
        return web.Response(
            status=200 if ready else 503,
            text=json.dumps({"ready": ready, "checks": checks}),
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", _handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    return app


async def _handle_healthz(_: web.Request) -> web.Response:
    # Answering at all proves the event loop is alive: a blocked loop times the probe out.
    return web.Response(text=json.dumps({"alive": True}), content_type="application/json")


async def serve(health: Health, registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    """Serve /metrics, /healthz and /readyz; stop with `await runner.cleanup()`. Port 0 = any free port
    (see `bound_port`)."""
    runner = web.AppRunner(make_app(health, registry), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("http server listening", host=host, port=bound_port(runner))
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a started runner listens on (useful with port 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the http server is not listening")
