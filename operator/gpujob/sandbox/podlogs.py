"""`kubectl logs [-f]` in the sandbox: a container's output is the file the sandbox kubelet writes
(`<pods dir>/<namespace>_<pod>_<uid8>/container.log`, stdout and stderr), served as the kubelet's
`/containerLogs` serves it. The node agents' `LogServer` (behind kube-apiserver) and the API emulator's `pods/log`
both use `stream`; the emulator finds the file through its Node's `PODS_DIR_ANNOTATION`.

Honoured: `follow` (until the container has ended), `tailLines`, `limitBytes`, `previous` (there never is a previous
container: restarts are not run). Not: `timestamps`, `sinceSeconds`, `sinceTime` (the file has no times per line).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

PODS_DIR_ANNOTATION = "sandbox.gpujob.dev/pods-dir"  # on the Node: where its kubelet keeps each Pod's files
LOG_FILE = "container.log"
FOLLOW_POLL_SECONDS = 0.2


class LogUnavailable(Exception):
    """A 400 as the kubelet (or kube-apiserver) answers it, e.g. a container that has not started."""


def _non_negative(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise LogUnavailable(f"{name}: invalid value {value!r}") from None
    if number < 0:
        raise LogUnavailable(f"{name}: must be greater than or equal to 0")
    return number


@dataclass(frozen=True)
class LogOptions:
    follow: bool = False
    tail_lines: int | None = None
    limit_bytes: int | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str], container: str, pod: str) -> LogOptions:
        if query.get("previous") in ("true", "1"):
            raise LogUnavailable(f'previous terminated container "{container}" in pod "{pod}" not found')
        limit = _non_negative(query, "limitBytes")
        if limit == 0:
            raise LogUnavailable("limitBytes: must be greater than 0")
        return cls(query.get("follow") in ("true", "1"), _non_negative(query, "tailLines"), limit)


def pod_dir(pods_dir: Path, namespace: str, name: str, uid: str) -> Path:
    """Where the sandbox kubelet keeps one Pod's files (PodRunner.dir)."""
    return pods_dir / f"{namespace}_{name}_{uid[:8]}"


def container_log(pod: dict[str, Any], container: str | None, pods_dir: Path) -> tuple[str, Path]:
    """(container name, log file) of a Pod the sandbox kubelet ran; LogUnavailable as kube-apiserver and the
    kubelet answer for a container that is not the Pod's or has not started (only the first one ever runs)."""
    meta, spec = pod["metadata"], pod.get("spec") or {}
    names = [c.get("name", "") for c in spec.get("containers") or []]
    if not container:
        if len(names) != 1:
            choices = " ".join(names)
            raise LogUnavailable(
                f"a container name must be specified for pod {meta['name']}, choose one of: [{choices}]"
            )
        container = names[0]
    elif container not in names:
        raise LogUnavailable(f"container {container} is not valid for pod {meta['name']}")
    path = pod_dir(pods_dir, meta["namespace"], meta["name"], meta.get("uid", "")) / LOG_FILE
    if container != names[0] or not path.exists():
        reason = "ContainerCreating"
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if status.get("name") == container:
                reason = ((status.get("state") or {}).get("waiting") or {}).get("reason") or reason
        raise LogUnavailable(f'container "{container}" in pod "{meta["name"]}" is waiting to start: {reason}')
    return container, path


async def stream(
    request: web.BaseRequest, path: Path, options: LogOptions, ended: Callable[[], bool]
) -> web.StreamResponse:
    """The log as text/plain; with `follow`, what the container writes next until `ended()` (nothing written
    before the end is lost: the file is read once more after it)."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    budget = options.limit_bytes
    with path.open("rb") as handle:
        data = handle.read()
        if options.tail_lines is not None:
            data = b"".join(data.splitlines(keepends=True)[-options.tail_lines :]) if options.tail_lines else b""
        while True:
            if budget is not None:
                data = data[:budget]
                budget -= len(data)
            if data:
                await response.write(data)
            if not options.follow or budget == 0:
                break
            finished = ended()
            data = handle.read()
            if not data:
                if finished:
                    break
                await asyncio.sleep(FOLLOW_POLL_SECONDS)
    await response.write_eof()
    return response
