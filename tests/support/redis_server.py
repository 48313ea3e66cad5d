"""A real redis-server per test session (flushed per test); fails loudly when redis-server is missing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from gpujob.credentials.redis_acl import redis_url_for
from gpujob.sandbox.procs import RedisServer

# The operator's own Redis user when it makes per-job users, exactly as the README documents it: its usual rights
# plus the three ACL subcommands.
OPERATOR_ACL = (
    "on >operator-pw ~gpujobs:* &gpujobs:* &gpujobs:progress:* +@all -@dangerous +acl|setuser +acl|deluser +acl|users"
)


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


@pytest.fixture
def operator_redis_url(redis_url: str, redis_client: redis.Redis) -> Iterator[str]:
    """The URL of an operator Redis user with OPERATOR_ACL; it and every per-job user are deleted afterwards."""
    redis_client.execute_command("ACL", "SETUSER", "gpujob", *OPERATOR_ACL.split())
    yield redis_url_for(redis_url, "gpujob", "operator-pw")
    for name in redis_client.execute_command("ACL", "USERS"):
        if name == "gpujob" or name.startswith("gpujob-job:"):
            redis_client.execute_command("ACL", "DELUSER", name)
