"""In-memory object store: objects by key, one resourceVersion counter, a bounded event history, watchers.

Everything runs on the emulator's one event loop, so reads and writes need no locks; a write and its event
fan-out happen without an `await` in between, so a watcher never misses or reorders events.
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

Json = dict[str, Any]
StoreKey = tuple[str, str]  # (group, plural)
ObjectKey = tuple[str, str]  # (namespace or "", name)
FullKey = tuple[StoreKey, str, str]


class Event:
    __slots__ = ("_line", "obj", "old", "rv", "type")

    def __init__(self, rv: int, type_: str, obj: Json, old: Json | None) -> None:
        self.rv, self.type, self.obj, self.old = rv, type_, obj, old
        self._line: bytes | None = None

    def line(self) -> bytes:
        """The watch-stream line, serialised once and shared by all watchers."""
        if self._line is None:
            self._line = json.dumps({"type": self.type, "object": self.obj}, separators=(",", ":")).encode() + b"\n"
        return self._line


class Watcher:
    """One watch stream's private queue (unbounded: a slow reader costs memory, never blocks writers)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()


class TooOld(Exception):
    """The requested resourceVersion is older than the kept history (the API answers 410 Gone)."""


class Store:
    def __init__(self, history_size: int = 10_000) -> None:
        self.rv = 0
        self.history_size = history_size
        self._objects: dict[StoreKey, dict[ObjectKey, Json]] = collections.defaultdict(dict)
        self._history: dict[StoreKey, collections.deque[Event]] = collections.defaultdict(
            lambda: collections.deque(maxlen=history_size)
        )
        self._evicted: dict[StoreKey, int] = collections.defaultdict(int)
        self._watchers: dict[StoreKey, set[Watcher]] = collections.defaultdict(set)
        # owner uid -> dependents: garbage collection looks dependents up instead of scanning everything.
        self._dependents: dict[str, set[FullKey]] = collections.defaultdict(set)

    def next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def get(self, skey: StoreKey, namespace: str, name: str) -> Json | None:
        return self._objects[skey].get((namespace, name))

    def items(self, skey: StoreKey, namespace: str | None = None) -> list[Json]:
        objects = self._objects[skey]
        keys = sorted(objects) if namespace is None else sorted(k for k in objects if k[0] == namespace)
        return [objects[k] for k in keys]

    def count(self, skey: StoreKey) -> int:
        return len(self._objects[skey])

    def put(self, skey: StoreKey, obj: Json, old: Json | None) -> Event:
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        self._objects[skey][key] = obj
        self._index_owners((skey, *key), old, obj)
        return self._emit(skey, Event(int(meta["resourceVersion"]), "ADDED" if old is None else "MODIFIED", obj, old))

    def remove(self, skey: StoreKey, obj: Json) -> Event:
        """Drop the object; `obj` is its last state, already carrying the deletion's resourceVersion."""
        meta = obj["metadata"]
        old = self._objects[skey].pop((meta.get("namespace", ""), meta["name"]))
        self._index_owners((skey, meta.get("namespace", ""), meta["name"]), old, None)
        return self._emit(skey, Event(int(meta["resourceVersion"]), "DELETED", obj, old))

    def drop_all(self, skey: StoreKey) -> list[Json]:
        return list(self._objects.pop(skey, {}).values())

    def dependents(self, uid: str) -> set[FullKey]:
        return set(self._dependents.get(uid, ()))

    def _index_owners(self, full_key: FullKey, old: Json | None, new: Json | None) -> None:
        old_uids = {ref.get("uid") for ref in (old or {}).get("metadata", {}).get("ownerReferences") or ()}
        new_uids = {ref.get("uid") for ref in (new or {}).get("metadata", {}).get("ownerReferences") or ()}
        for uid in old_uids - new_uids:
            self._dependents[str(uid)].discard(full_key)
            if not self._dependents[str(uid)]:
                del self._dependents[str(uid)]
        for uid in new_uids - old_uids:
            self._dependents[str(uid)].add(full_key)

    def _emit(self, skey: StoreKey, event: Event) -> Event:
        history = self._history[skey]
        if len(history) == history.maxlen:
            self._evicted[skey] = history[0].rv
        history.append(event)
        for watcher in self._watchers[skey]:
            watcher.queue.put_nowait(event)
        return event

    # --- watching
    def subscribe(self, skey: StoreKey, since: int | None) -> tuple[Watcher, list[Event]]:
        """Register a watcher; return it with the kept events newer than `since` (none if `since` is None)."""
        backlog: list[Event] = []
        if since is not None:
            if since < self._evicted[skey]:
                raise TooOld(f"too old resource version: {since} ({self._evicted[skey]})")
            backlog = [event for event in self._history[skey] if event.rv > since]
        watcher = Watcher()
        self._watchers[skey].add(watcher)
        return watcher, backlog

    def unsubscribe(self, skey: StoreKey, watcher: Watcher) -> None:
        self._watchers[skey].discard(watcher)

    def watcher_count(self) -> int:
        return sum(len(w) for w in self._watchers.values())
