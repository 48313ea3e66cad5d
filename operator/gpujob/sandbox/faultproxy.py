"""A fault-injecting reverse proxy in front of a real kube-apiserver, for chaos tests on the real control plane.

It listens on loopback (plain HTTP), forwards every request to the apiserver (HTTPS, verified with its CA; the
client's own bearer token goes through untouched, so RBAC still judges the client) and streams watch responses
through line by line. Per the `Faults` rates (the same knobs and counters as the API emulator's) it answers 500,
429 with Retry-After, 409 on writes to a /status subresource, 410 (an ERROR event, as the apiserver sends for a
too old resourceVersion) when a watch resumes, and cuts watch streams after an event. Discovery, OpenAPI and
health paths are never faulted. While the apiserver is down (a restart) the proxy answers 503, as a load balancer
in front of it would. `GET/POST /_sandbox/faults` read and change the settings, as on the emulator.

    python -m gpujob.sandbox.faultproxy --upstream https://127.0.0.1:6443 --ca apiserver.crt --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import ssl
import sys
from typing import Any

import aiohttp
from aiohttp import web

from gpujob.sandbox.faults import Faults

log = logging.getLogger("gpujob.sandbox.faultproxy")
READY_LINE = "fault proxy ready"
# Hop-by-hop and transport headers: the proxy's own connections set them (aiohttp decompresses upstream bodies).
DROP_REQUEST = {"host", "content-length", "accept-encoding", "connection", "transfer-encoding", "keep-alive"}
DROP_RESPONSE = {"content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive"}


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}  # fmt: skip


def resource_of(path: str) -> tuple[str, str | None] | None:
    """`/api/v1/namespaces/ns/pods/p/status` -> ("pods", "status"); None for discovery and everything else."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"]:
        rest = parts[3:]
    else:
        return None
    if rest[:1] == ["watch"]:
        rest = rest[1:]
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]
    if not rest:
        return None
    return rest[0], (rest[2] if len(rest) > 2 else None)


class FaultProxy:
    """`async with FaultProxy(upstream, ca_pem, faults, port):` serving on http://127.0.0.1:port."""

    def __init__(self, upstream: str, ca_pem: str, faults: Faults, port: int) -> None:
        self.upstream, self.faults, self.port = upstream.rstrip("/"), faults, port
        self.context = ssl.create_default_context(cadata=ca_pem)
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.ServerRunner | None = None

    async def __aenter__(self) -> FaultProxy:
        connector = aiohttp.TCPConnector(ssl=self.context, limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        runner = self.runner = web.ServerRunner(web.Server(self.handle))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/_sandbox/faults":
            if request.method == "POST":
                self.faults.update(json.loads(await request.read() or b"{}"))
            return web.json_response(self.faults.as_json())
        agent = request.headers.get("User-Agent", "")
        target = resource_of(request.path)
        query = request.query
        watching = query.get("watch") in {"true", "1"} or "/watch/" in request.path
        if target is not None:
            plural, sub = target
            fault = await self._fault(request.method, plural, sub, agent)
            if fault is not None:
                return fault
            resumes = query.get("resourceVersion", "") not in {"", "0"} and query.get("sendInitialEvents") != "true"
            if watching and resumes and self.faults.roll(self.faults.watch_gone_rate, plural, agent, "410"):
                gone = status(410, "Expired", f"too old resource version: {query['resourceVersion']} (injected)")
                response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
                with contextlib.suppress(aiohttp.ClientError, OSError):  # the client may be gone already
                    await response.prepare(request)
                    await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                return response
        return await self._forward(request, target[0] if target and watching else None, agent)

    async def _fault(self, method: str, plural: str, sub: str | None, agent: str) -> web.Response | None:
        faults = self.faults
        if faults.latency_seconds > 0:
            await asyncio.sleep(faults.latency_seconds)
        if faults.roll(faults.error_429_rate, plural, agent, "429"):
            body = status(429, "TooManyRequests", "injected 429, please try again later",
                          {"retryAfterSeconds": faults.retry_after_seconds})  # fmt: skip
            return web.json_response(body, status=429, headers={"Retry-After": str(faults.retry_after_seconds)})
        if faults.roll(faults.error_500_rate, plural, agent, "500"):
            return web.json_response(status(500, "InternalError", "injected internal error"), status=500)
        writes_status = method in {"PUT", "PATCH"} and sub == "status"
        if writes_status and faults.roll(faults.status_conflict_rate, plural, agent, "409"):
            message = f"Operation cannot be fulfilled on {plural}: the object has been modified (injected)"
            return web.json_response(status(409, "Conflict", message), status=409)
        return None

    async def _forward(self, request: web.BaseRequest, watched: str | None, agent: str) -> web.StreamResponse:
        assert self.session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP_REQUEST}
        body = await request.read()
        try:
            upstream = await self.session.request(
                request.method, self.upstream + request.rel_url.raw_path_qs, headers=headers, data=body or None
            )
        except (aiohttp.ClientError, OSError) as exc:
            return unavailable(exc)
        async with upstream:
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in DROP_RESPONSE}
            if watched is None or upstream.status != 200:
                try:
                    payload = await upstream.read()
                except (aiohttp.ClientError, OSError) as exc:  # the apiserver went away mid-body (a restart)
                    return unavailable(exc)
                return web.Response(status=upstream.status, body=payload, headers=out)
            response = web.StreamResponse(status=200, headers=out)
            pending = b""
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        await response.write(line + b"\n")
                        if self.faults.roll(self.faults.watch_cut_rate, watched, agent, "watch_cut"):
                            return response  # the client sees the stream end, as when a connection drops
            except (aiohttp.ClientError, OSError):
                pass  # the apiserver or the client went away mid-stream: end the stream here too
            return response


def unavailable(exc: BaseException) -> web.Response:
    """What a load balancer answers while the apiserver behind it is down."""
    return web.json_response(status(503, "ServiceUnavailable", f"the apiserver is unavailable: {exc!r}"), status=503)


async def serve(upstream: str, ca_pem: str, port: int, faults: Faults) -> None:
    async with FaultProxy(upstream, ca_pem, faults, port):
        print(f"{READY_LINE} on http://127.0.0.1:{port} -> {upstream}", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpujob.sandbox.faultproxy", description=__doc__)
    parser.add_argument("--upstream", required=True, help="the kube-apiserver's URL (https://127.0.0.1:PORT)")
    parser.add_argument("--ca", required=True, help="the CA (PEM file) that signed the apiserver's certificate")
    parser.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--faults", default="{}", help="initial Faults settings as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    faults = Faults()
    faults.update(json.loads(args.faults))
    with open(args.ca) as ca:
        ca_pem = ca.read()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.upstream, ca_pem, args.port, faults))
    return 0


if __name__ == "__main__":
    sys.exit(main())
