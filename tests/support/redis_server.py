"""A real redis-server per test session (flushed per test); fails loudly when redis-server is missing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from gpujob.sandbox.procs import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.ping()
    except redis.ConnectionError:  # a previous test restarted or stopped it
        redis_server.restart()
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()
