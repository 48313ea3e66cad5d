"""Entry points that compose the independent parts: `gpujob operator` is the kopf operator plus, when Redis is
configured and the bridge is on, the stream bridge as one of its services. The operator package never imports
the bridge (import-linter checks it); this module is the one place they meet, and where the process's one
`Metrics` and `Health` are built and handed to whoever reports to them."""

from __future__ import annotations

import asyncio

import redis.asyncio

from gpujob.bridge.intake import Bridge, intake_client
from gpujob.health import Health
from gpujob.metrics import Metrics
from gpujob.operator import main as operator
from gpujob.operator.runtime import RedisService
from gpujob.settings import Settings


def bridge_service(settings: Settings, metrics: Metrics) -> RedisService:
    async def run(_shared: redis.asyncio.Redis, stopping: asyncio.Event) -> None:
        client = intake_client(settings)  # its own: the intake reads bytes, the shared client decodes
        try:
            bridge = Bridge(settings, client)
            metrics.register_stream_stats(lambda: bridge.stats)
            await bridge.run(stopping)
        finally:
            await client.aclose()

    return run


def services(settings: Settings, metrics: Metrics) -> dict[str, RedisService]:
    return {"bridge": bridge_service(settings, metrics)} if settings.bridge else {}


def operator_main(argv: list[str]) -> int:
    """`gpujob operator`."""
    metrics = Metrics()
    return operator.main(argv, metrics, Health(), lambda settings: services(settings, metrics))
