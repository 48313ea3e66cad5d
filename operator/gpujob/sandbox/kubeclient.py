"""The few Kubernetes API calls the sandbox kubelet makes (aiohttp), with a list+watch iterator: plain HTTP to the
emulator, HTTPS with the cluster's CA and a bearer token to a real kube-apiserver."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from gpujob.sandbox.kubeconfig import read_kubeconfig

Json = dict[str, Any]
log = logging.getLogger("gpujob.sandbox.kubelet")
MERGE = {"Content-Type": "application/merge-patch+json"}
# Pod status: conditions merge by type, so a kubelet's write keeps what others set (DisruptionTarget, PodScheduled).
STRATEGIC = {"Content-Type": "application/strategic-merge-patch+json"}


class ApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:500]}")
        self.status = status


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class KubeClient:
    def __init__(
        self, server: str, request_timeout: float = 15.0, *, token: str | None = None, ca_pem: bytes | None = None
    ) -> None:
        self.server = server.rstrip("/")
        self.request_timeout = request_timeout
        self.token = token or "sandbox"
        self.ssl: ssl.SSLContext | None = None
        if ca_pem is not None:
            self.ssl = ssl.create_default_context(cadata=ca_pem.decode())
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, path: str | Path, request_timeout: float = 15.0) -> KubeClient:
        server, token, ca_pem, _ = read_kubeconfig(path)
        return cls(server, request_timeout, token=token, ca_pem=ca_pem)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self.ssl) if self.ssl is not None else None
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.token}"}, connector=connector
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Json:
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        async with self.session.request(
            method, self.server + path, json=body, headers=headers, timeout=timeout
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise ApiError(resp.status, text)
            result: Json = json.loads(text) if text else {}
            return result

    # --- the calls
    async def get_data(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's or ConfigMap's data as strings, or None when it does not exist."""
        try:
            obj = await self.request("GET", f"/api/v1/namespaces/{namespace}/{kind}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        data: dict[str, str] = {}
        if kind == "secrets":
            for key, value in (obj.get("data") or {}).items():
                data[key] = base64.b64decode(value).decode("utf-8", errors="replace")
        else:
            data.update(obj.get("data") or {})
        data.update(obj.get("stringData") or {})
        return data

    async def patch_pod_status(self, namespace: str, name: str, status: Json) -> bool:
        """Merge-patch the Pod's status; False when the Pod is gone."""
        try:
            path = f"/api/v1/namespaces/{namespace}/pods/{name}/status"
            await self.request("PATCH", path, {"status": status}, STRATEGIC)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def bind(self, namespace: str, name: str, uid: str, node: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        await self.request("POST", f"/api/v1/namespaces/{namespace}/pods/{name}/binding", body)

    async def delete_pod_now(self, namespace: str, name: str, uid: str) -> None:
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            await self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    async def put_node(self, node: Json) -> None:
        """Create the Node, or bring an existing one (a kubelet restart) up to date."""
        try:
            await self.request("POST", "/api/v1/nodes", node)
        except ApiError as exc:
            if exc.status != 409:
                raise
            name = node["metadata"]["name"]
            await self.request("PATCH", f"/api/v1/nodes/{name}", {"metadata": node["metadata"]}, MERGE)
            await self.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": node["status"]}, MERGE)

    async def list_and_watch(self, path: str, timeout_seconds: int = 30) -> AsyncIterator[tuple[str, Json]]:
        """("SYNC", {"items": [...]}) after every (re-)list, then ("ADDED"|"MODIFIED"|"DELETED", obj) events.
        Re-lists on 410 Gone and on disconnects, forever; the caller reconciles its state on each SYNC."""
        backoff = 0.1
        while True:
            try:
                listing = await self.request("GET", path)
                yield "SYNC", listing
                rv = listing["metadata"]["resourceVersion"]
                while True:
                    async for event_type, obj in self._watch(path, rv, timeout_seconds):
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if event_type != "BOOKMARK":
                            yield event_type, obj
                        backoff = 0.1
            except Gone:
                log.debug("watch %s: resourceVersion too old, listing again", path)
            except (aiohttp.ClientError, ApiError, TimeoutError, ValueError) as exc:
                log.warning("watch %s failed (%r); listing again in %.1fs", path, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _watch(self, path: str, rv: str, timeout_seconds: int) -> AsyncIterator[tuple[str, Json]]:
        sep = "&" if "?" in path else "?"
        url = f"{self.server}{path}{sep}watch=true&allowWatchBookmarks=true&resourceVersion={rv}"
        url += f"&timeoutSeconds={timeout_seconds}"
        # A stream silent past the server's own timeout is dead (seen after an etcd restart): drop it and go on.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout, sock_read=timeout_seconds + 15)
        async with self.session.get(url, timeout=timeout) as resp:
            if resp.status == 410:
                raise Gone()
            if resp.status >= 400:
                raise ApiError(resp.status, await resp.text())
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        if (event.get("object") or {}).get("code") == 410:
                            raise Gone()
                        raise ApiError(int((event.get("object") or {}).get("code") or 500), line.decode())
                    yield event["type"], event["object"]
