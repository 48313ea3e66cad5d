"""Entry points that compose the independent parts: `gpujob operator` is the kopf operator plus, when Redis is
configured and the bridge is on, the stream bridge as one of its services. The operator package never imports
the bridge (import-linter checks it); this module is the one place they meet."""

from __future__ import annotations

import asyncio

import redis.asyncio

from gpujob import metrics
from gpujob.bridge.intake import Bridge
from gpujob.operator import main as operator
from gpujob.operator.runtime import RedisService
from gpujob.settings import Settings


def bridge_service(settings: Settings) -> RedisService:
    async def run(client: redis.asyncio.Redis, stopping: asyncio.Event) -> None:
        bridge = Bridge(settings, client)
        metrics.register_stream_stats(lambda: bridge.stats)
        await bridge.run(stopping)

    return run


def services(settings: Settings) -> dict[str, RedisService]:
    return {"bridge": bridge_service(settings)} if settings.bridge else {}


def operator_main(argv: list[str]) -> int:
    """`gpujob operator`."""
    return operator.main(argv, services)
