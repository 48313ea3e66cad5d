"""Per-job Redis ACL users (issue 15 item 2) against a real redis-server: the job's user publishes its own
progress through the real worker publisher, and the server refuses (NOPERM) everything else."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
import redis.asyncio
from pydantic import SecretStr

from gpujob.credentials.common import JobRef
from gpujob.credentials.redis_acl import RedisJobCredentials, job_stream, redis_url_for, username
from gpujob.events import SyncEventPublisher, make_event
from gpujob.settings import Settings

JOB_A = JobRef("team-a", "job-a", "11111111-aaaa-4000-8000-000000000001", "job-a", "train_lora")
JOB_B = JobRef("team-b", "job-b", "22222222-bbbb-4000-8000-000000000002", "job-b", "train_lora")


@pytest.fixture
async def creds(operator_redis_url: str) -> AsyncIterator[RedisJobCredentials]:
    client = redis.asyncio.Redis.from_url(operator_redis_url, decode_responses=True)
    yield RedisJobCredentials(client, Settings(redis_url=operator_redis_url))
    await client.aclose()


def job_settings(base_url: str, job: JobRef, user: str, password: str) -> Settings:
    """What the worker of `job` runs with: the job's user and its own events stream."""
    base = Settings(redis_url=base_url)
    return Settings(
        redis_url=SecretStr(redis_url_for(base_url, user, password)),
        events_stream=job_stream(base, job.job_id),
    )


def refused(call: Callable[[], Any]) -> str:
    with pytest.raises(redis.exceptions.NoPermissionError) as info:
        call()
    return str(info.value)


async def test_job_user_publishes_its_own_events_and_nothing_else(
    creds: RedisJobCredentials, redis_url: str, redis_client: redis.Redis
) -> None:
    user, password = await creds.create(JOB_A)
    assert user == username(JOB_A) == "gpujob-job:team-a:job-a:11111111-aaaa-4000-8000-000000000001"
    settings = job_settings(redis_url, JOB_A, user, password)
    job = redis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)  # type: ignore[union-attr]
    listener = redis_client.pubsub()
    listener.subscribe("gpujobs:progress:job-a")
    listener.get_message(timeout=1)

    published = SyncEventPublisher(job, settings).publish(make_event("job-a", "running", 40, "epoch 2/5"))
    assert published.seq == 1
    message = listener.get_message(timeout=5)
    assert message is not None and json.loads(message["data"])["seq"] == 1
    assert json.loads(redis_client.get("gpujobs:state:job-a") or "{}")["progress"] == 40
    assert redis_client.xlen("gpujobs:events:job-a") == 1
    listener.close()

    # Another job's events, through the same publisher and by hand.
    assert "no permissions" in refused(
        lambda: SyncEventPublisher(job, settings).publish(make_event("job-b", "succeeded", 100))
    )
    refused(lambda: job.publish("gpujobs:progress:job-b", "{}"))
    refused(lambda: job.get("gpujobs:state:job-b"))
    refused(lambda: job.set("gpujobs:state:job-b", "{}"))
    refused(lambda: job.incr("gpujobs:seq:job-b"))
    refused(lambda: job.xadd("gpujobs:events:job-b", {"jobId": "job-b", "event": "{}"}))
    # The request stream and the shared event stream (forging, trimming, reading).
    refused(lambda: job.xadd("gpujobs:requests", {"job": "{}"}))
    refused(lambda: job.xadd("gpujobs:events", {"jobId": "job-b", "event": "{}"}, maxlen=0))
    refused(lambda: job.xrange("gpujobs:events"))
    refused(lambda: job.xrange("gpujobs:requests"))
    # Other keys and commands: reads of its own keys beyond GET, listing, subscribing, admin.
    refused(lambda: job.set("other", "x"))
    refused(lambda: job.delete("gpujobs:state:job-a"))
    refused(lambda: job.xrange("gpujobs:events:job-a"))
    refused(lambda: job.keys("*"))
    refused(lambda: job.eval("return 1", 0))
    refused(lambda: job.execute_command("SUBSCRIBE", "gpujobs:progress:job-a"))
    refused(lambda: job.execute_command("ACL", "SETUSER", "x", "on", "+@all"))
    refused(lambda: job.flushall())
    job.close()


async def test_forged_entries_in_the_job_stream_never_reach_the_shared_stream(
    creds: RedisJobCredentials, redis_url: str, redis_client: redis.Redis
) -> None:
    user, password = await creds.create(JOB_A)
    settings = job_settings(redis_url, JOB_A, user, password)
    job = redis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)  # type: ignore[union-attr]
    publisher = SyncEventPublisher(job, settings)
    publisher.publish(make_event("job-a", "running", 10))
    forged = make_event("job-b", "succeeded", 100).to_json()
    job.xadd("gpujobs:events:job-a", {"jobId": "job-b", "event": forged})  # its own stream: allowed, and dropped
    job.xadd("gpujobs:events:job-a", {"jobId": "job-a", "event": "not json"})
    publisher.publish(make_event("job-a", "running", 20))

    assert await creds.relay("job-a") == (2, 2)
    shared = redis_client.xrange("gpujobs:events")
    assert [f["jobId"] for _, f in shared] == ["job-a", "job-a"]
    assert [json.loads(f["event"])["seq"] for _, f in shared] == [1, 2]
    assert redis_client.xlen("gpujobs:events:job-a") == 0
    job.close()


async def test_revoke_refuses_everywhere_and_closes_open_connections(
    creds: RedisJobCredentials, redis_url: str, redis_client: redis.Redis
) -> None:
    user, password = await creds.create(JOB_A)
    settings = job_settings(redis_url, JOB_A, user, password)
    job = redis.Redis.from_url(settings.redis_url.get_secret_value(), decode_responses=True)  # type: ignore[union-attr]
    SyncEventPublisher(job, settings).publish(make_event("job-a", "running", 50))

    assert await creds.revoke(JOB_A) is True
    assert await creds.revoke(JOB_A) is False  # idempotent
    assert redis_client.xlen("gpujobs:events") == 1  # relayed before the stream went away
    assert redis_client.exists("gpujobs:events:job-a") == 0
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ConnectionError)):
        SyncEventPublisher(job, settings).publish(make_event("job-a", "running", 60))
    fresh = redis.Redis.from_url(settings.redis_url.get_secret_value())  # type: ignore[union-attr]
    with pytest.raises(redis.exceptions.AuthenticationError):
        fresh.ping()
    fresh.close()
    job.close()


async def test_create_again_replaces_the_password_and_sweep_removes_leftovers(
    creds: RedisJobCredentials, redis_url: str
) -> None:
    user, first = await creds.create(JOB_A)
    _, second = await creds.create(JOB_A)
    await creds.create(JOB_B)
    old = redis.Redis.from_url(redis_url_for(redis_url, user, first))
    with pytest.raises(redis.exceptions.AuthenticationError):
        old.ping()
    new = redis.Redis.from_url(redis_url_for(redis_url, user, second))
    assert new.ping()
    assert sorted(await creds.users()) == sorted([username(JOB_A), username(JOB_B)])

    assert await creds.sweep([JOB_A]) == [username(JOB_B)]
    assert await creds.users() == [username(JOB_A)]
    old.close()
    new.close()
