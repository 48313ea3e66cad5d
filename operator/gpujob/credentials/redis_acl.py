"""A Redis ACL user per job: it may publish that job's events and nothing else.

Why this shape. Redis checks ACLs inside scripts against the calling user, so a user allowed to run the publish
script must itself hold every right the script uses. The shared stream `gpujobs:events` therefore cannot be
written by a job user: a user that may XADD to it can forge entries of any jobId (the `jobId` field is free
text) and can trim it to nothing (`XADD … MAXLEN 0`); Redis ACLs cannot restrict either. So a job user gets:

- `PUBLISH` on exactly `gpujobs:progress:<jobId>`;
- `INCR`/`EXPIRE` on `gpujobs:seq:<jobId>`, `SET`/`GET` on `gpujobs:state:<jobId>`;
- `XADD` on its own stream `gpujobs:events:<jobId>` (the worker's `GPUJOB_EVENTS_STREAM`);
- `EVALSHA` and `SCRIPT LOAD` (the publish script; every call inside it is checked as above), `PING` (redis-py's
  `CLIENT SETINFO` on connect is refused and ignored);
- no other command, key or channel: no XADD to `gpujobs:requests`, nothing of another jobId, no reads of
  the request or event streams, no `KEYS`/`SCAN`, no `SUBSCRIBE`.

The operator relays each job's stream into `gpujobs:events` (`relay`: one atomic script that moves the entries
whose `event` is a JSON object of this jobId, stamps the `jobId` field itself and drops anything else), on its
progress ticks and before it revokes the user. What a job can still do with its credentials is bounded to its
own job: publish false progress of itself, overwrite its own state and sequence number.

Usernames are `gpujob-job:<namespace>:<name>:<uid>`: one user per GpuJob object, so a re-created GpuJob with the
same name gets a new user and `sweep` can tell a live job's user from a leaked one.

The operator's own ACL user needs, besides its `~gpujobs:* &gpujobs:*` rights, `+acl|setuser +acl|deluser
+acl|users`; with `ACL SETUSER` it can create any user, so its password is as sensitive as the default user's.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis.asyncio

from gpujob.credentials.common import JobRef
from gpujob.settings import Settings

USER_PREFIX = "gpujob-job:"
COMMANDS = ("evalsha", "script|load", "incr", "expire", "set", "get", "publish", "xadd", "ping")

_RELAY_SCRIPT = """
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[3])
local moved, dropped = 0, 0
for _, entry in ipairs(entries) do
  local fields, raw = entry[2], nil
  for i = 1, #fields, 2 do
    if fields[i] == 'event' then raw = fields[i + 1] end
  end
  local ok, event = pcall(cjson.decode, raw or '')
  if ok and type(event) == 'table' and event['jobId'] == ARGV[1] then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'jobId', ARGV[1], 'event', raw)
    moved = moved + 1
  else
    dropped = dropped + 1
  end
  redis.call('XDEL', KEYS[1], entry[1])
end
return {moved, dropped}
"""

_GLOB = re.compile(r"([*?\[\]\\])")


def _literal(pattern: str) -> str:
    """An ACL pattern matching exactly this key or channel (glob characters escaped)."""
    return _GLOB.sub(r"\\\1", pattern)


def username(job: JobRef) -> str:
    job.check()
    return f"{USER_PREFIX}{job.namespace}:{job.name}:{job.uid}"


def job_stream(settings: Settings, job_id: str) -> str:
    """The job's own events stream: the worker's GPUJOB_EVENTS_STREAM; the operator relays it."""
    return f"{settings.events_stream}:{job_id}"


def job_keys(settings: Settings, job_id: str) -> tuple[list[str], list[str]]:
    """(keys, channels) a job's user may touch."""
    keys = [f"{settings.seq_key_prefix}{job_id}", f"{settings.state_key_prefix}{job_id}", job_stream(settings, job_id)]
    return keys, [f"{settings.progress_channel_prefix}{job_id}"]


def rules(settings: Settings, job: JobRef, password: str) -> list[str]:
    """The full ACL SETUSER rule list: `reset` first, so applying it again leaves exactly these rights."""
    keys, channels = job_keys(settings, job.job_id)
    out = ["reset", "on", f">{password}", "resetkeys", "resetchannels", "-@all"]
    out += [f"+{command}" for command in COMMANDS]
    out += [f"~{_literal(key)}" for key in keys]
    out += [f"&{_literal(channel)}" for channel in channels]
    return out


class RedisJobCredentials:
    """Creates, revokes and sweeps per-job ACL users through the operator's client."""

    def __init__(self, client: redis.asyncio.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._relay = client.register_script(_RELAY_SCRIPT)

    async def create(self, job: JobRef) -> tuple[str, str]:
        """(username, password) of the job's user; idempotent: a second call leaves one user with the same
        rights and a new password (the old one stops working)."""
        name = username(job)
        password = secrets.token_urlsafe(32)
        await self._acl("SETUSER", name, *rules(self.settings, job, password))
        return name, password

    async def revoke(self, job: JobRef) -> bool:
        """Delete the job's user (Redis closes its open connections); True when it existed. Relays what the
        job's stream still holds into the shared stream first, then deletes the job's stream."""
        await self.relay(job.job_id)
        await self.client.delete(job_stream(self.settings, job.job_id))
        return await self._deluser(username(job))

    async def relay(self, job_id: str, batch: int = 1000) -> tuple[int, int]:
        """Move the job's stream into `gpujobs:events`: (moved, dropped); dropped entries were not events of
        this jobId (a job forging another job's entry ends here)."""
        moved = dropped = 0
        while True:
            keys = [job_stream(self.settings, job_id), self.settings.events_stream]
            m, d = await self._relay(keys=keys, args=[job_id, self.settings.events_maxlen, batch])
            moved, dropped = moved + int(m), dropped + int(d)
            if int(m) + int(d) < batch:
                return moved, dropped

    async def users(self) -> list[str]:
        """Job users that exist now."""
        names = await self._acl("USERS")
        decoded = (n.decode() if isinstance(n, bytes) else str(n) for n in names)
        return [n for n in decoded if n.startswith(USER_PREFIX)]

    async def sweep(self, live: Iterable[JobRef]) -> list[str]:
        """Delete every job user not of a live job (after an operator restart); returns the deleted names."""
        keep = {username(job) for job in live}
        gone = [name for name in await self.users() if name not in keep]
        for name in gone:
            await self._deluser(name)
        return gone

    async def _acl(self, *args: str) -> Any:
        """One ACL subcommand (redis-py's typed acl_setuser has no way to pass a rule list as is)."""
        return await self.client.execute_command("ACL", *args)  # type: ignore[no-untyped-call]

    async def _deluser(self, name: str) -> bool:
        return int(await self._acl("DELUSER", name)) > 0


def redis_url_for(base_url: str, user: str, password: str) -> str:
    """The job's GPUJOB_REDIS_URL: the operator's URL with the job's user and password in place of its own."""
    parts = urlsplit(base_url)
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host  # an IPv6 address keeps its brackets
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
