"""The kopf operator's run: arguments, logging, the HTTP server, the Runtime and kopf. `gpujob operator`
(gpujob.entrypoints) calls it with the `Metrics` and `Health` it built and the services to run beside it (the
Redis bridge when GPUJOB_REDIS_URL is set)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, cast

import kopf

from gpujob import health as http
from gpujob.health import Health
from gpujob.logging import configure as configure_logging
from gpujob.logging import register_secret
from gpujob.metrics import Metrics
from gpujob.operator.handlers import register
from gpujob.operator.pause import replica_identity
from gpujob.operator.runtime import RedisService, Runtime, pod_defaults
from gpujob.settings import Settings, get_settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpujob operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    parser.add_argument("--peering", help="kopf peering name for HA (default: GPUJOB_PEERING, else standalone)")
    return parser.parse_args(argv)


def main(
    argv: list[str],
    metrics: Metrics,
    health: Health,
    services: Callable[[Settings], dict[str, RedisService]] | None = None,
) -> int:
    args = parse_args(argv)
    settings = get_settings()
    if args.peering:
        settings.peering = args.peering
    configure_logging(settings.log_format, settings.log_level)
    register_secret(settings.redis_url, settings.s3_access_key, settings.s3_secret_key)
    # kopf reports every handled event at INFO; our reconciler logs what matters.
    logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, logging.getLogger().level))
    namespaces: list[str] | None = args.namespace or None
    runtime = Runtime(
        settings=settings,
        namespaces=namespaces,
        defaults=pod_defaults(settings, dict(os.environ)),
        metrics=metrics,
        health=health,
        services=services(settings) if services is not None else {},
    )
    registry = kopf.OperatorRegistry()
    register(registry, runtime)
    asyncio.run(_run(registry, runtime, namespaces, settings.peering))
    return 0


async def _run(
    registry: kopf.OperatorRegistry, runtime: Runtime, namespaces: list[str] | None, peering: str | None
) -> None:
    # Once per process, before kopf: probes and scrapes answer while start-up is retried (/readyz says 503 until
    # the watchers run), and a retried start-up never binds the port again.
    server = await http.serve(runtime.health, runtime.metrics.registry, runtime.settings.metrics_port)
    try:
        # kopf handles SIGTERM/SIGINT itself: it stops the watchers, then runs the cleanup handler (runtime.stop).
        await kopf.operator(
            registry=registry,
            clusterwide=namespaces is None,
            namespaces=namespaces or (),
            standalone=peering is None,
            peering_name=peering,
            # The identity Runtime's pause (gpujob.operator.pause) looks for in the peering object.
            identity=cast(Any, replica_identity()) if peering else None,
            ready_flag=runtime.started,
        )
    finally:
        await server.cleanup()
