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

Usernames are `gpujob-job:<namespace>:<name>:<uid>[:<expires>]`: one user per GpuJob object, so a re-created
GpuJob with the same name gets a new user and `sweep` can tell a live job's user from a leaked one. `<expires>` (Unix
seconds) is when the credential stops being valid: Redis ACL users cannot expire by themselves, so `sweep` deletes a
user past it even when its job still runs (the operator sweeps at start-up and periodically; while no operator runs
nothing removes them).

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


def username(job: JobRef, expires: int | None = None) -> str:
    job.check()
    base = f"{USER_PREFIX}{job.namespace}:{job.name}:{job.uid}"
    return base if expires is None else f"{base}:{expires}"


def parse(name: str) -> tuple[str, str, str, int | None] | None:
    """(namespace, name, uid, expires or None) of a job user's name; None when it is not one."""
    if not name.startswith(USER_PREFIX):
        return None
    parts = name[len(USER_PREFIX) :].split(":")
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2], None
    if len(parts) == 4 and all(parts[:3]) and parts[3].isdigit():
        return parts[0], parts[1], parts[2], int(parts[3])
    return None


def _of_job(name: str, job: JobRef) -> bool:
    base = username(job)
    return name == base or name.startswith(f"{base}:")


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

    async def create(self, job: JobRef, expires: int | None = None) -> tuple[str, str]:
        """(username, password) of the job's user, valid until `expires` (Unix seconds; see `sweep`); idempotent:
        a second call leaves one user of this job with the same rights and a new password (the old one, and
        any user of this job with another expiry, stop working)."""
        name = username(job, expires)
        password = secrets.token_urlsafe(32)
        await self._acl("SETUSER", name, *rules(self.settings, job, password))
        for other in await self.users():
            if other != name and _of_job(other, job):
                await self._deluser(other)
        return name, password

    async def revoke(self, job: JobRef) -> bool:
        """Delete the job's user (Redis closes its open connections); True when it existed. Relays what the
        job's stream still holds into the shared stream first, then deletes the job's stream."""
        await self.relay(job.job_id)
        await self.client.delete(job_stream(self.settings, job.job_id))
        existed = False
        for name in await self.users():
            if _of_job(name, job):
                existed = await self._deluser(name) or existed
        return existed

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

    async def sweep(self, live: Iterable[JobRef], now: float | None = None) -> list[str]:
        """Delete every job user not of a live job (after an operator restart), and, given `now` (Unix seconds),
        every one past its expiry; returns the deleted names."""
        keep = {(job.namespace, job.name, job.uid) for job in live}
        gone = []
        for name in await self.users():
            parsed = parse(name)
            expired = parsed is not None and parsed[3] is not None and now is not None and parsed[3] <= now
            if parsed is None or parsed[:3] not in keep or expired:
                gone.append(name)
        for name in gone:
            await self._deluser(name)
        return gone

    async def delete(self, name: str) -> bool:
        """Delete one job user by name (Redis closes its connections); True when it existed."""
        return await self._deluser(name)

    async def probe(self, tag: str) -> None:
        """Raises unless this client may make, list and delete job users (what the operator needs)."""
        name = f"{USER_PREFIX}probe-{tag}"
        await self._acl("SETUSER", name, "reset", "off")
        await self._acl("USERS")
        await self._deluser(name)

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
