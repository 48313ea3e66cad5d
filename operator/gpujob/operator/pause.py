"""Whether this replica is paused by kopf's peering (HA): another live replica of the same peering has a higher
priority (or the same: kopf then pauses them all). kopf freezes its watch streams while paused but does not tell
its handlers, and the operator's own timers (pending timeout, retry, TTL), its progress mirror and its queue
manager run outside kopf: they ask `Pause.active` before every write. The peering object is read on a short
interval with kopf's own rule (`paused_by`, pure), so a paused replica writes nothing within about one interval of
kopf pausing it; on resume, every job is passed again from what kopf's relist brings (see Runtime)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from gpujob import kube
from gpujob.logging import get_logger
from gpujob.operator.conventions import parse_time

log = get_logger("gpujob.pause")

DEFAULT_LIFETIME = 60.0  # kopf's peering lifetime when a peer does not say (settings.peering.lifetime)


def paused_by(peers: dict[str, Any], me: str, priority: int, now: datetime) -> list[str]:
    """The live peers that pause `me` under kopf's rule: a higher priority, or the same (kopf pauses every replica
    then, with a warning). A peer is dead once `lastseen + lifetime` has passed; `me` is never its own peer."""
    found = []
    for identity, info in sorted(peers.items()):
        if identity == me or not isinstance(info, dict):
            continue
        try:
            raw = info.get("lastseen")
            seen = (parse_time(str(raw)) if raw is not None else None) or now  # kopf: none is now
            lifetime = float(info.get("lifetime") or DEFAULT_LIFETIME)
            theirs = int(info.get("priority") or 0)
        except (TypeError, ValueError):
            continue
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=UTC)  # kopf reads a naive time as UTC
        if seen + timedelta(seconds=lifetime) <= now:
            continue  # dead: kopf cleans it up and does not pause for it
        if theirs >= priority:
            found.append(identity)
    return found


@dataclass
class Pause:
    """This replica's pause, read from its peering object(s): one ClusterKopfPeering for a cluster-wide operator,
    one KopfPeering per watched namespace otherwise (paused when any of them says so)."""

    peering: str
    identity: str
    priority: int
    namespaces: list[str] | None  # None: cluster-wide
    interval: float = 1.0
    on_resume: list[Callable[[], None]] = field(default_factory=list)
    paused: bool = False
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def active(self) -> bool:
        """True while this replica must not write (kopf has, or is about to have, paused it)."""
        return self.paused

    def observe(self, objects: list[dict[str, Any] | None]) -> None:
        """Take the peering objects as read (None: not there yet) and switch the pause when it changes."""
        blockers = [
            peer
            for obj in objects
            if obj is not None
            for peer in paused_by(obj.get("status") or {}, self.identity, self.priority, self.clock())
        ]
        if blockers and not self.paused:
            self.paused = True
            log.warning("paused by peering: no writes until resumed", peering=self.peering, peers=blockers)
        elif not blockers and self.paused:
            self.paused = False
            log.info("resumed by peering: every job is passed again", peering=self.peering)
            for callback in self.on_resume:
                callback()

    async def read(self) -> list[dict[str, Any] | None]:
        if self.namespaces is None:
            return [await kube.get_peering(self.peering, None)]
        return [await kube.get_peering(self.peering, namespace) for namespace in self.namespaces]

    async def run(self, stopping: asyncio.Event) -> None:
        """Until `stopping`: read the peering and follow it. A failed read keeps the last word (kopf, which reads
        the same object, keeps its own too)."""
        while not stopping.is_set():
            try:
                self.observe(await self.read())
            except Exception as exc:  # the API's passing state: try again next interval
                log.debug("peering read failed", peering=self.peering, error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.interval)


def replica_identity() -> str:
    """This replica's identity in the peering (the operator hands the same to kopf): its Pod's name and pid."""
    return f"{os.environ.get('POD_ID') or socket.gethostname()}/{os.getpid()}"
