"""Watch streams: newline-delimited JSON events, resumable from a resourceVersion, with timeouts and bookmarks."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gpujob.sandbox import errors, tables
from gpujob.sandbox.resources import Resource
from gpujob.sandbox.store import Event, TooOld

if TYPE_CHECKING:
    from gpujob.sandbox.handler import SandboxHandler
    from gpujob.sandbox.selectors import Predicate

Json = dict[str, Any]
HEADERS = {"Content-Type": "application/json", "Cache-Control": "no-cache, private"}


def _line(event_type: str, obj: Json) -> bytes:
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"


def _visible(event: Event, predicate: Predicate | None) -> tuple[str, Json] | None:
    """What this watcher sees: objects moving in or out of its selection appear as ADDED or DELETED."""
    if predicate is None:
        return event.type, event.obj
    now_in = predicate(event.obj)
    if event.type == "MODIFIED" and event.old is not None:
        was_in = predicate(event.old)
        if now_in != was_in:
            return ("ADDED" if now_in else "DELETED"), event.obj
    return (event.type, event.obj) if now_in else None


class _Renderer:
    def __init__(self, res: Resource, as_table: bool, include: str) -> None:
        self.res, self.as_table, self.include = res, as_table, include

    def event(self, event: Event, predicate: Predicate | None) -> bytes | None:
        visible = _visible(event, predicate)
        if visible is None:
            return None
        if not self.as_table and visible[0] == event.type:
            return event.line()  # the shared, serialised-once line
        return self.line(*visible)

    def line(self, event_type: str, obj: Json) -> bytes:
        if self.as_table:
            obj = tables.table(self.res, [obj], obj["metadata"].get("resourceVersion", ""), self.include)
        return _line(event_type, obj)


def _bookmark(res: Resource, rv: int, initial_end: bool = False) -> bytes:
    meta: Json = {"resourceVersion": str(rv)}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return _line("BOOKMARK", {"kind": res.kind, "apiVersion": res.group_version, "metadata": meta})


async def serve_watch(
    handler: SandboxHandler, raw: web.BaseRequest, res: Resource, namespace: str, name: str | None
) -> web.StreamResponse:
    store, faults, query = handler.store, handler.faults, raw.query
    agent = raw.headers.get("User-Agent", "")
    predicate = handler.selection(raw, namespace, name)
    renderer = _Renderer(res, tables.wants_table(raw.headers.get("Accept", "")), query.get("includeObject", ""))
    requested = query.get("resourceVersion", "")
    send_initial = query.get("sendInitialEvents") == "true" or requested in {"", "0"}
    bookmarks = query.get("allowWatchBookmarks") in {"true", "1"}
    timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None

    response = web.StreamResponse(status=200, headers=HEADERS)
    try:
        if not send_initial and faults.roll(faults.watch_gone_rate, res.plural, agent, "410"):
            raise TooOld(f"too old resource version: {requested} (sandbox: injected)")
        watcher, backlog = store.subscribe(res.store_key, None if send_initial else int(requested))
    except TooOld as exc:
        await response.prepare(raw)
        await response.write(_line("ERROR", errors.gone(str(exc)).status_object()))
        return response
    except ValueError as exc:
        raise errors.bad_request(f"invalid resourceVersion: {requested!r}") from exc

    try:
        await response.prepare(raw)
        chunk: list[bytes] = []
        if send_initial:
            for obj in store.items(res.store_key, namespace or None):
                if predicate is None or predicate(obj):
                    chunk.append(renderer.line("ADDED", obj))
            if bookmarks and query.get("sendInitialEvents") == "true":
                chunk.append(_bookmark(res, store.rv, initial_end=True))
        chunk += [line for event in backlog if (line := renderer.event(event, predicate)) is not None]
        if chunk:
            await response.write(b"".join(chunk))
        await _stream(handler, response, watcher.queue, renderer, predicate, timeout, bookmarks, agent)
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the client went away
    finally:
        store.unsubscribe(res.store_key, watcher)
    return response


async def _stream(
    handler: SandboxHandler,
    response: web.StreamResponse,
    queue: asyncio.Queue[Event],
    renderer: _Renderer,
    predicate: Predicate | None,
    deadline_seconds: float | None,
    bookmarks: bool,
    agent: str = "",
) -> None:
    loop = asyncio.get_running_loop()
    deadline = None if deadline_seconds is None else loop.time() + deadline_seconds
    faults, res = handler.faults, renderer.res
    while True:
        wait = None if deadline is None else deadline - loop.time()
        if wait is not None and wait <= 0:
            return
        if bookmarks:
            wait = handler.bookmark_interval if wait is None else min(wait, handler.bookmark_interval)
        try:
            event = await (queue.get() if wait is None else asyncio.wait_for(queue.get(), wait))
        except TimeoutError:
            if bookmarks and queue.empty():
                await response.write(_bookmark(res, handler.store.rv))
            continue
        # Drain what is queued already: one write per batch keeps tens of thousands of events/s cheap.
        events = [event]
        while not queue.empty():
            events.append(queue.get_nowait())
        chunk: list[bytes] = []
        for item in events:
            line = renderer.event(item, predicate)
            if line is not None:
                chunk.append(line)
                if faults.roll(faults.watch_cut_rate, res.plural, agent, "watch_cut"):
                    await response.write(b"".join(chunk))
                    return
        if chunk:
            await response.write(b"".join(chunk))
