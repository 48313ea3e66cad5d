"""The cache checked against the API: what a watch missed is dropped (issue 12 item 8).

A watch that is resumed after a gap (410 Gone, an apiserver restart, a peering pause) lists again and sends what
exists, but nothing for what was deleted in the gap: those objects would stay in the cache for ever (a stale
Running Pod blocks every next attempt; a GpuJob that is gone keeps getting Pods that GC deletes). So every
`cache_audit_seconds` the operator lists the names of its GpuJobs and Pods and drops what the cache holds and the
list does not, as if the DELETED event had come. A relist (kopf re-sends every object it lists as an event of
type None) also calls for a check: AUDIT_SETTLE seconds after the last such event, not at the next interval, so
that a job whose Pod ended and went while the API server restarted moves on in seconds, not minutes.

Only what is provably gone is dropped: absent from a list taken at resourceVersion R, and last seen at a
version not newer than R (an object created after the list began is absent from it, and kept). Versions that do
not compare as integers are never taken for gone. A wrongly dropped Pod would be harmless anyway (the reconciler
asks the API before it starts an attempt over a vanished Pod); a job is dropped only on this proof or on a 404.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gpujob import kube
from gpujob.api.constants import KIND, PLURAL
from gpujob.logging import get_logger
from gpujob.operator.cache import JobKey, Store

log = get_logger(__name__)

Listing = tuple[str | None, str, set[tuple[str, str]]]  # scope (namespace or None = all), resourceVersion, names
# Seconds without another listed object (a relist's events) before the check it calls for: the relist is done.
AUDIT_SETTLE = 5.0


def not_newer(seen: str | None, listed: str) -> bool:
    """Whether an object last seen at `seen` existed when the list at `listed` was taken (ints, as etcd's)."""
    try:
        return int(seen or "") <= int(listed)
    except ValueError:
        return False


def gone(held: Iterable[tuple[tuple[str, str], str | None]], listings: Iterable[Listing]) -> list[tuple[str, str]]:
    """Of the held (namespace, name) with their last resourceVersion, those the listings prove deleted."""
    scopes = list(listings)
    found: list[tuple[str, str]] = []
    for key, seen in held:
        for scope, version, names in scopes:
            if (scope is None or scope == key[0]) and key not in names and not_newer(seen, version):
                found.append(key)
                break
    return found


@dataclass
class CacheAudit:
    """Lists names now and then and reports what the cache holds that the API no longer has."""

    store: Store
    namespaces: list[str] | None
    pod_selector: str
    job_gone: Callable[[dict[str, Any]], None]  # called with the held (slim) GpuJob, as a DELETED event would be
    pod_gone: Callable[[dict[str, Any]], None]  # called with a minimal Pod body naming its owner
    settle: float = AUDIT_SETTLE
    _soon: asyncio.Event = field(default_factory=asyncio.Event)

    def soon(self) -> None:
        """A watch listed again (after a gap): check once its listing is over, before the next interval."""
        self._soon.set()

    async def once(self) -> tuple[int, int]:
        """One check; returns how many GpuJobs and Pods were dropped."""
        jobs = await kube.list_names(PLURAL, self.namespaces)
        pods = await kube.list_names("pods", self.namespaces, self.pod_selector)
        held_jobs = [(key, job["metadata"].get("resourceVersion")) for key, job in list(self.store.jobs.items())]
        dropped_jobs = 0
        for key in gone(held_jobs, jobs):
            job = self.store.job(key)
            if job is not None:
                log.warning("job gone while unwatched, dropped", job=f"{key[0]}/{key[1]}")
                self.job_gone(job)
                dropped_jobs += 1
        held_pods: dict[tuple[str, str], tuple[str, str | None]] = {}
        for uid, views in list(self.store.pods.items()):
            owner: JobKey | None = self.store.key_of_uid(uid)
            for view in views.values():
                if owner is not None:
                    held_pods[(owner[0], view.name)] = (uid, view.resource_version)
        dropped_pods = 0
        for key in gone(((k, v[1]) for k, v in held_pods.items()), pods):
            uid = held_pods[key][0]
            log.warning("pod gone while unwatched, dropped", pod=f"{key[0]}/{key[1]}")
            owner_ref = {"kind": KIND, "controller": True, "uid": uid}
            self.pod_gone({"metadata": {"namespace": key[0], "name": key[1], "ownerReferences": [owner_ref]}})
            dropped_pods += 1
        # Pods filed under an owner the cache does not hold (its job dropped or never seen) decide nothing.
        for uid in [uid for uid in self.store.pods if self.store.key_of_uid(uid) is None]:
            self.store.pods.pop(uid, None)
        return dropped_jobs, dropped_pods

    async def run(self, interval: float, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            if await _first(stopping, self._soon, interval) is stopping:
                return
            while self._soon.is_set():  # a relist: wait until its events stop coming
                self._soon.clear()
                if await _first(stopping, self._soon, self.settle) is stopping:
                    return
            try:
                await self.once()
            except Exception as exc:  # the next round tries again; the watches go on meanwhile
                log.warning("cache audit failed", error=repr(exc))


async def _first(stopping: asyncio.Event, soon: asyncio.Event, seconds: float) -> asyncio.Event | None:
    """Which event is set first within `seconds` (`stopping` wins a tie), or None."""
    waits = {asyncio.ensure_future(stopping.wait()): stopping, asyncio.ensure_future(soon.wait()): soon}
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    return stopping if stopping.is_set() else soon if soon.is_set() else None
