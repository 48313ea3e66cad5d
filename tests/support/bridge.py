"""Helpers for tests that run the stream intake in the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis

from gpujob import kube
from gpujob.bridge.intake import Bridge, intake_client
from gpujob.settings import Settings


def bridge_settings(redis_url: str, consumer: str = "bridge-a", **extra: Any) -> Settings:
    return Settings(redis_url=redis_url, consumer_name=consumer, read_block_ms=50, claim_idle_ms=300, **extra)


# What a train_lora must name (gpujob.api.params.LoraParams): tests about other things fill these in.
LORA_REQUIRED_PARAMS: dict[str, Any] = {"baseModel": "tiny-llama", "dataset": {"text": ["hello"]}}


def with_valid_params(spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` with the train_lora params it lacks filled in, so the operator and the intake accept it (they
    refuse a train_lora without baseModel/dataset: InvalidParams); other types unchanged."""
    params = spec.get("params")
    if spec.get("type") != "train_lora" or not isinstance(params, dict | None):
        return spec
    return {**spec, "params": {**LORA_REQUIRED_PARAMS, **(params or {})}}


def request(job_id: str, **spec: Any) -> dict[str, str]:
    """A stream entry submitting a train_lora job (with valid params unless `params` says otherwise)."""
    return {"job": json.dumps(with_valid_params({"jobId": job_id, "type": "train_lora", **spec}))}


async def eventually(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Poll without blocking the event loop the bridge runs on."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := predicate()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.05)
    return value


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings, kind: type[Bridge] = Bridge) -> AsyncIterator[Bridge]:
    """A bridge running as a task until the block ends; then stopped, its clients closed."""
    client = intake_client(settings)
    bridge = kind(settings, client)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        yield bridge
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await client.aclose()
        await kube.close()


def pending(r: redis.Redis) -> int:
    """Entries of the intake's consumer group read and not yet acknowledged (0 before the group exists)."""
    try:
        return int(r.xpending("gpujobs:requests", "gpujob-operator")["pending"])
    except redis.ResponseError:  # no group yet
        return 0
