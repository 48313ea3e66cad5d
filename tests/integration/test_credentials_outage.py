"""Per-job credentials while Redis is down (seen under chaos): revoking a job that ended is no error. The job's
Secret goes at once; its Redis user stays for the sweep, which deletes the users of jobs that ended once Redis
answers again. Real Redis (stopped and started on its port), the real API (both backends), in process."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis.asyncio
from kubernetes_asyncio import client

from gpujob import kube
from gpujob.api.constants import API_VERSION, KIND, Phase
from gpujob.api.models import GpuJobSpec
from gpujob.api.naming import credentials_secret_name
from gpujob.credentials import redis_acl
from gpujob.credentials.common import JobRef
from gpujob.credentials.redis_acl import RedisJobCredentials
from gpujob.operator.credentials import JobCredentials
from gpujob.sandbox.procs import RedisServer
from gpujob.settings import Settings
from tests.support.kubernetes import ApiTarget


async def secret_exists(namespace: str, name: str) -> bool:
    core: Any = client.CoreV1Api(await kube.api_client())
    try:
        await core.read_namespaced_secret(name, namespace)
    except kube.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def test_revoke_while_redis_is_down_deletes_the_secret_and_leaves_the_user_to_the_sweep(
    api: ApiTarget,
) -> None:
    server = RedisServer().start()
    settings = Settings(redis_url=server.url, credentials_mode="on")
    connection = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    creds = JobCredentials(settings, RedisJobCredentials(connection, settings), None)
    try:
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "outage-1"}}
        body["spec"] = {"type": "train_lora"}
        assert await kube.create_gpujob(api.namespace, body) is kube.Effect.CREATED
        job = await kube.get_gpujob(api.namespace, "outage-1")
        assert job is not None
        meta = job["metadata"]
        secret = await creds.issue(job, GpuJobSpec.model_validate(job["spec"]), datetime.now(UTC))
        assert secret == credentials_secret_name(meta["name"], meta["uid"])
        assert await secret_exists(api.namespace, secret)
        assert len(await creds.redis.users()) == 1  # type: ignore[union-attr]

        server.stop()  # Redis goes down as the job ends
        job["status"] = {"phase": Phase.SUCCEEDED.value}
        await creds.revoke(job)  # no exception: the after-write hook logs a warning, not a traceback
        assert not await secret_exists(api.namespace, secret)

        server.process.start()  # back on its port (without AOF its users are gone: make one as the job's again)
        await connection.execute_command("ACL", "SETUSER", *_job_user(job))
        assert await creds.sweep(lambda uid: job if uid == meta["uid"] else None) != []
        assert await creds.redis.users() == []  # type: ignore[union-attr]
    finally:
        await connection.aclose()
        server.stop()
        await kube.close()


def _job_user(job: dict[str, Any]) -> list[str]:
    """The ACL SETUSER arguments of a user named as the job's (what a restarted Redis with its ACL kept holds)."""
    name = redis_acl.username(JobRef.from_body(job), 4_000_000_000)
    return [name, "on", ">pw"]
