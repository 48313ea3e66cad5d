"""Progress events: one atomic Redis script per event, so events of one job are strictly ordered.

The script INCRs the job's sequence number, stamps it into the event, PUBLISHes it on
`gpujobs:progress:<jobId>`, appends it to the capped stream `gpujobs:events` and stores it as the job's
latest state. Operator and worker publish for the same job through the same script, so `seq` is strictly
increasing in the order subscribers receive events, whoever sent them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

import redis
import redis.asyncio

from gpujob.api.events import ProgressEvent
from gpujob.settings import Settings

_PUBLISH_SCRIPT = """
local seq = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local event = cjson.decode(ARGV[1])
event['seq'] = seq
local out = cjson.encode(event)
redis.call('PUBLISH', ARGV[2], out)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'jobId', event['jobId'], 'event', out)
redis.call('SET', KEYS[2], out, 'EX', ARGV[3])
return out
"""

# The same, published only while the job is unheard of: neither its state key (KEYS[2]) nor any key after KEYS[3]
# exists. For a request rejected by the intake: a bad resend of a jobId that has events (a running or finished
# job) must not tell its subscribers that the job ended.
_PUBLISH_IF_UNHEARD_SCRIPT = (
    """
for i = 2, #KEYS do
  if i ~= 3 and redis.call('EXISTS', KEYS[i]) == 1 then return false end
end
"""
    + _PUBLISH_SCRIPT
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(job_id: str, status: str, progress: float, message: str = "", **extra: Any) -> ProgressEvent:
    """An event with the current timestamp; `extra` holds the optional fields (phase, attempt, reason, ...)."""
    fields = {key: value for key, value in extra.items() if value is not None}
    return ProgressEvent(
        jobId=job_id,
        status=status,
        progress=max(0.0, min(100.0, progress)),
        message=message,
        timestamp=now_iso(),
        **fields,
    )


class _Keys:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def channel(self, job_id: str) -> str:
        return f"{self.settings.progress_channel_prefix}{job_id}"

    def state(self, job_id: str) -> str:
        return f"{self.settings.state_key_prefix}{job_id}"

    def script_args(self, event: ProgressEvent) -> tuple[list[str], list[str | int]]:
        s = self.settings
        keys = [f"{s.seq_key_prefix}{event.jobId}", self.state(event.jobId), s.events_stream]
        args: list[str | int] = [
            event.to_json(),
            self.channel(event.jobId),
            s.state_ttl_seconds,
            s.events_maxlen,
        ]
        return keys, args


class AsyncPublisher(Protocol):
    async def publish(self, event: ProgressEvent) -> ProgressEvent: ...


class EventPublisher(_Keys):
    """Async publisher used by the operator."""

    def __init__(self, client: redis.asyncio.Redis, settings: Settings) -> None:
        super().__init__(settings)
        self._script = client.register_script(_PUBLISH_SCRIPT)
        self._if_unheard = client.register_script(_PUBLISH_IF_UNHEARD_SCRIPT)
        self.client = client

    async def publish(self, event: ProgressEvent) -> ProgressEvent:
        keys, args = self.script_args(event)
        raw = await self._script(keys=keys, args=args)
        return ProgressEvent.model_validate_json(raw)

    async def publish_if_unheard(self, event: ProgressEvent, *guards: str) -> ProgressEvent | None:
        """Publish as `publish` does, unless the job already has a state or any of `guards` exists (one atomic
        script); returns None when nothing was published."""
        keys, args = self.script_args(event)
        raw = await self._if_unheard(keys=[*keys, *guards], args=args)
        return None if raw is None else ProgressEvent.model_validate_json(raw)

    async def latest(self, job_id: str) -> ProgressEvent | None:
        raw = await self.client.get(self.state(job_id))
        return None if raw is None else ProgressEvent.model_validate_json(raw)


class SyncEventPublisher(_Keys):
    """Blocking publisher for code inside the Pod (the worker runs outside any event loop)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(settings)
        self._script = client.register_script(_PUBLISH_SCRIPT)
        self.client = client

    def publish(self, event: ProgressEvent) -> ProgressEvent:
        keys, args = self.script_args(event)
        raw = self._script(keys=keys, args=args)
        return ProgressEvent.model_validate_json(raw)

    def latest(self, job_id: str) -> ProgressEvent | None:
        raw = self.client.get(self.state(job_id))
        return None if raw is None else ProgressEvent.model_validate_json(raw)


def redis_kwargs() -> dict[str, Any]:
    """Connection options shared by every client: bounded timeouts, keep-alive, health checks."""
    return {"socket_connect_timeout": 5, "socket_keepalive": True, "health_check_interval": 15}


def _url_and_options(settings: Settings, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if settings.redis_url is None:
        raise ValueError("GPUJOB_REDIS_URL is not set")
    options: dict[str, Any] = {**redis_kwargs(), "decode_responses": True}
    if settings.redis_ssl_ca_certs:
        options["ssl_ca_certs"] = settings.redis_ssl_ca_certs
    return settings.redis_url.get_secret_value(), {**options, **overrides}


def async_client(settings: Settings, **overrides: Any) -> redis.asyncio.Redis:
    """A client from GPUJOB_REDIS_URL: redis:// or rediss:// (TLS; ?ssl_ca_certs=/path for a private CA),
    user:password@ for ACL users."""
    url, options = _url_and_options(settings, overrides)
    return redis.asyncio.Redis.from_url(url, **options)


def sync_client(settings: Settings, **overrides: Any) -> redis.Redis:
    url, options = _url_and_options(settings, overrides)
    return redis.Redis.from_url(url, **options)
