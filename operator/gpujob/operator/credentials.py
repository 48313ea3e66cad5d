"""Per-job credentials in a job's life (issue 15): made before each attempt's Pod, handed to it in a Secret owned by
the GpuJob (mounted as files), revoked when the job ends, and swept: users of jobs that ended or are gone (after an
operator restart) and users past their expiry (Redis ACL users and SeaweedFS IAM keys cannot expire by themselves).

The mechanisms (what a job user may do, and why) are in `gpujob.credentials`; this module only decides when.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gpujob import kube
from gpujob.api.constants import MANAGER, Label, Phase
from gpujob.api.models import GpuJobSpec, GpuJobStatus
from gpujob.api.naming import credentials_secret_name, job_id_of, label_value
from gpujob.credentials import redis_acl
from gpujob.credentials import s3 as s3_iam
from gpujob.credentials.common import JobRef as CredentialJob
from gpujob.logging import get_logger
from gpujob.operator.builders import JobRef
from gpujob.operator.status import Transition
from gpujob.settings import Settings

log = get_logger(__name__)

RELAY_INTERVAL_SECONDS = 0.5
# A job's GpuJob by uid, as the operator's cache holds it (None: not known there).
JobLookup = Callable[[str], dict[str, Any] | None]


class CredentialsRefused(ValueError):
    """The job can never get credentials (an input key it may not be given): the job fails, it is not retried."""


class CredentialsUnavailable(RuntimeError):
    """GPUJOB_CREDENTIALS_MODE=on, and the operator may not make job users on a configured server."""


def expires_at(spec: GpuJobSpec, now: datetime, settings: Settings) -> int:
    """When an attempt's credentials stop being valid (Unix seconds): it may wait pendingTimeoutSeconds for its
    node, then run timeoutSeconds (activeDeadlineSeconds), plus the margin; without a timeout, the default
    lifetime stands in for it."""
    lifetime = spec.timeout_seconds or settings.credentials_lifetime_seconds
    return int(now.timestamp()) + spec.pending_timeout_seconds + lifetime + settings.credentials_margin_seconds


def secret_body(ref: JobRef, job_id: str, data: dict[str, str], expires: int) -> dict[str, Any]:
    """The job's credentials Secret: owned by the GpuJob (GC removes it with the job), one key per setting."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": credentials_secret_name(ref.name, ref.uid),
            "namespace": ref.namespace,
            "labels": {Label.JOB_ID: label_value(job_id), Label.MANAGED_BY: MANAGER},
            "annotations": {"gpujob.dev/credentials-expire": str(expires)},
            "ownerReferences": [ref.owner_reference()],
        },
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in sorted(data.items())},
    }


def ended(job: dict[str, Any]) -> bool:
    """The job will run no attempt any more: finished (Succeeded, Failed, Cancelled) or being deleted."""
    if (job.get("metadata") or {}).get("deletionTimestamp"):
        return True
    phase = (job.get("status") or {}).get("phase")
    try:
        return phase is not None and Phase(phase).terminal
    except ValueError:
        return False


@dataclass
class JobCredentials:
    """Issues, revokes and sweeps per-job credentials for the operator (either server may be absent)."""

    settings: Settings
    redis: redis_acl.RedisJobCredentials | None
    s3: s3_iam.S3JobCredentials | None
    namespaces: list[str] | None = None  # None: every namespace is this operator's
    clock: Callable[[], float] = time.time
    # HA: while this replica is paused (gpujob.operator.pause) it neither relays nor sweeps: it writes nothing.
    paused: Callable[[], bool] = field(default=lambda: False)
    _relays: set[str] = field(default_factory=set)

    @classmethod
    async def setup(
        cls, settings: Settings, client: Redis | None, namespaces: list[str] | None
    ) -> JobCredentials | None:
        """Per-job credentials as GPUJOB_CREDENTIALS_MODE asks: None when off (or auto without the rights);
        raises CredentialsUnavailable when on and a configured server refuses the operator."""
        if settings.credentials_mode == "off":
            return None
        made = cls(settings, None, None, namespaces)
        problems: list[str] = []
        if client is not None:
            made.redis = redis_acl.RedisJobCredentials(client, settings)
            try:
                await made.redis.probe(socket.gethostname())
            except Exception as exc:
                problems.append(f"Redis: {exc}")
        if settings.s3_access_key is not None and settings.s3_secret_key is not None:
            made.s3 = s3_iam.S3JobCredentials(settings)
            try:
                await asyncio.to_thread(made.s3.users)
            except Exception as exc:
                problems.append(f"S3: {exc}")
        if made.s3 is None and settings.credentials_mode == "auto":
            # Workers need S3 for their artifacts: without the operator's own S3 keys they can only get the
            # shared ones (GPUJOB_WORKER_SECRET), as before per-job credentials. `on` makes what it can.
            return None
        if made.s3 is None and made.redis is None:
            problems.append("neither GPUJOB_REDIS_URL nor the S3 keys (GPUJOB_S3_ACCESS_KEY/SECRET_KEY) are set")
        if problems:
            why = "; ".join(problems)
            if settings.credentials_mode == "on":
                raise CredentialsUnavailable(f"per-job credentials (GPUJOB_CREDENTIALS_MODE=on) cannot be made: {why}")
            log.warning("per-job credentials off: job Pods get the shared GPUJOB_WORKER_SECRET", why=why)
            return None
        log.info("per-job credentials on", redis=made.redis is not None, s3=made.s3 is not None)
        return made

    # --- an attempt starts
    async def issue(self, job: dict[str, Any], spec: GpuJobSpec, now: datetime) -> str | None:
        """Make (or replace) the job's credentials and their Secret; the Secret's name, None when the job gets none.
        Replacing them for a new attempt cuts off the previous attempt's Pod (the old password and keys stop)."""
        want_redis, want_s3 = spec.wants_credentials()
        want_redis, want_s3 = want_redis and self.redis is not None, want_s3 and self.s3 is not None
        if not (want_redis or want_s3):
            return None
        cred = CredentialJob.from_body(job)
        expires = expires_at(spec, now, self.settings)
        data: dict[str, str] = {}
        if want_s3 and self.s3 is not None:
            try:
                s3_iam.check_inputs(cred)
            except ValueError as exc:
                raise CredentialsRefused(str(exc)) from exc
            access, secret = await asyncio.to_thread(self.s3.create, cred, expires)
            data |= {
                "GPUJOB_S3_ACCESS_KEY": access,
                "GPUJOB_S3_SECRET_KEY": secret,
                "GPUJOB_S3_ENDPOINT": self.settings.s3_endpoint,
                "GPUJOB_S3_BUCKET": self.settings.s3_bucket,
                "GPUJOB_S3_SECURE": str(self.settings.s3_secure).lower(),
                # A job's keys may not read the bucket's location: its client must be told the region.
                "GPUJOB_S3_REGION": self.settings.s3_region or "us-east-1",
            }
        if want_redis and self.redis is not None and self.settings.redis_url is not None:
            try:
                user, password = await self.redis.create(cred, expires)
            except (RedisError, OSError) as exc:
                # Progress is best effort, the attempt is not: without Redis now, the Pod runs without a Redis
                # user (its worker only logs its progress) rather than wait for Redis.
                log.warning("no Redis user for this attempt: Redis unavailable", error=str(exc))
                want_redis = False
            else:
                base_url = self.settings.redis_url.get_secret_value()
                data["GPUJOB_REDIS_URL"] = redis_acl.redis_url_for(base_url, user, password)
                data["GPUJOB_EVENTS_STREAM"] = redis_acl.job_stream(self.settings, cred.job_id)
        if not data:
            return None
        ref = JobRef(cred.namespace, cred.name, cred.uid)
        body = secret_body(ref, cred.job_id, data, expires)
        name: str = body["metadata"]["name"]
        if await kube.create_secret(ref.namespace, body) is kube.Effect.EXISTED:
            # Left by an earlier attempt (or a pass that failed after creating it): its keys are dead now.
            await kube.delete_secret(ref.namespace, name)
            if await kube.create_secret(ref.namespace, body) is kube.Effect.EXISTED:
                raise RuntimeError(f"Secret {ref.namespace}/{name} re-appeared; retrying")
        log.info("credentials issued", resource=f"secrets/{name}", redis=want_redis, s3=want_s3, expires=expires)
        return name

    # --- the job ends
    async def revoke(self, job: dict[str, Any]) -> None:
        """Delete the job's users and keys (relaying its events stream first) and its Secret; idempotent."""
        cred = CredentialJob.from_body(job)
        if not (cred.namespace and cred.name and cred.uid):
            return
        redis_gone = False
        if self.redis is not None:
            try:
                redis_gone = await self.redis.revoke(cred)
            except (RedisError, OSError) as exc:
                # Redis is down (or restarting): its user stays until a sweep, which deletes the users of jobs
                # that ended (and relays their streams); the Secret goes now all the same.
                log.warning("Redis user not revoked yet: Redis unavailable, the sweep retries", error=str(exc))
        s3_gone = await asyncio.to_thread(self.s3.revoke, cred) if self.s3 is not None else False
        try:
            secret = await kube.delete_secret(cred.namespace, credentials_secret_name(cred.name, cred.uid))
        except Exception as exc:
            # The API server refused or is down: what the Secret holds is revoked (or left to the sweep, which
            # deletes the Secret too); else GC takes it with the GpuJob. Never an after-write hook traceback.
            log.warning("credentials Secret not deleted", error=kube.message_of(exc))
            secret = kube.Effect.ABSENT
        if redis_gone or s3_gone or secret is kube.Effect.DELETED:
            log.info("credentials revoked", redis=redis_gone, s3=s3_gone, secret=secret.value)

    async def sink(self, job: dict[str, Any], transitions: list[Transition], status: GpuJobStatus) -> None:
        """After a status write: a job that reached Succeeded, Failed or Cancelled loses its credentials."""
        if any(t.new.terminal for t in transitions):
            await self.revoke(job)

    # --- progress: the job's own events stream into the shared one
    def relay_soon(self, job_id: str) -> None:
        if self.redis is not None:
            self._relays.add(job_id)

    async def relay_pending(self) -> None:
        if self.redis is None:
            return
        while self._relays:
            job_id = self._relays.pop()
            try:
                await self.redis.relay(job_id)
            except Exception as exc:
                log.warning("relay of a job's events failed", job_id=job_id, error=repr(exc))

    # --- sweeps
    async def sweep(self, lookup: JobLookup) -> list[str]:
        """Delete users (and the Secrets of ended jobs) that no live job holds: past their expiry, of a job that
        ended, or of a GpuJob that is gone. A user of a job the cache does not know is checked against the API
        (one list of the GpuJobs), so a start-up sweep with an empty cache deletes nothing live. In namespaced mode
        a user of another namespace's job is not ours to judge (another installation's), except when expired."""
        now = self.clock()
        redis_users = await self.redis.users() if self.redis is not None else []
        s3_users = await asyncio.to_thread(self.s3.users) if self.s3 is not None else []
        # name -> (namespace or None, uid or None, expires or None)
        found: dict[tuple[str, str], tuple[str | None, str | None, int | None]] = {}
        for name in redis_users:
            parsed = redis_acl.parse(name)
            found["redis", name] = (parsed[0], parsed[2], parsed[3]) if parsed else (None, None, None)
        # An IAM name holds no namespace: a Redis user of the same GpuJob (uid) tells it.
        namespace_of = {uid: ns for ns, uid, _ in found.values() if uid and ns}
        for name in s3_users:
            parsed_s3 = s3_iam.parse(name)
            uid = parsed_s3[0] if parsed_s3 else None
            found["s3", name] = (namespace_of.get(uid or ""), uid, parsed_s3[1] if parsed_s3 else None)
        if not found:
            return []
        jobs = {uid: lookup(uid) for _, uid, _ in found.values() if uid}
        if any(body is None for body in jobs.values()):
            jobs |= await self._listed_jobs()
        deleted: list[str] = []
        ended_jobs: dict[str, dict[str, Any]] = {}
        for (kind, name), (namespace, uid, expires) in found.items():
            body = jobs.get(uid) if uid else None
            if body is not None and ended(body):
                ended_jobs[uid or ""] = body
            ours = self.namespaces is None or (namespace is not None and namespace in self.namespaces)
            if uid is None or (expires is not None and expires <= now):
                why = "malformed" if uid is None else "expired"
            elif body is None and ours:
                why = "job gone"
            elif body is not None and ended(body):
                why = "job ended"
            else:
                continue
            if kind == "redis" and self.redis is not None:
                await self.redis.delete(name)
            elif kind == "s3" and self.s3 is not None:
                await asyncio.to_thread(self.s3.delete, name)
            log.info("job credential swept", user=name, kind=kind, why=why)
            deleted.append(name)
        for body in ended_jobs.values():
            meta = body["metadata"]
            await kube.delete_secret(meta["namespace"], credentials_secret_name(meta["name"], meta["uid"]))
            if self.redis is not None:  # what its stream still holds reaches the shared stream
                await self.redis.relay(job_id_of(body))
        return deleted

    async def _listed_jobs(self) -> dict[str, dict[str, Any]]:
        """Every GpuJob this operator watches, by uid (only metadata and status kept)."""
        jobs: dict[str, dict[str, Any]] = {}
        async for page in kube.list_gpujobs(self.namespaces):
            for body in page:
                meta = body.get("metadata") or {}
                if meta.get("uid"):
                    jobs[meta["uid"]] = {"metadata": meta, "spec": body.get("spec") or {}, "status": body.get("status")}
        return jobs

    async def run(self, lookup: JobLookup, stopping: asyncio.Event) -> None:
        """Relays (twice a second) and sweeps (at start, then every GPUJOB_CREDENTIALS_SWEEP_INTERVAL)."""
        next_sweep = 0.0
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            if self.paused():
                await asyncio.sleep(RELAY_INTERVAL_SECONDS)
                continue
            await self.relay_pending()
            if loop.time() >= next_sweep:
                try:
                    await self.sweep(lookup)
                except Exception as exc:  # the next sweep tries again
                    log.warning("credentials sweep failed", error=kube.message_of(exc))
                next_sweep = loop.time() + self.settings.credentials_sweep_interval
            await asyncio.sleep(RELAY_INTERVAL_SECONDS)
