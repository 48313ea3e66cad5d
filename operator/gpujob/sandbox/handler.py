"""The HTTP face of the emulator: a kmock handler that routes requests by key instead of by request history.

kmock's own handler keeps every served request and matches each new one against all reactions and that
history (the cost per request grows without bound), so this subclass serves Kubernetes requests directly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path
from typing import Any

import kmock
import yaml
from aiohttp import web

from gpujob.sandbox import errors, podlogs, protobuf, selectors, tables
from gpujob.sandbox.faults import Faults, RequestKey, RequestLog
from gpujob.sandbox.objects import PATCH_TYPES, ObjectApi, now
from gpujob.sandbox.openapi import OpenApi
from gpujob.sandbox.resources import Registry, Resource
from gpujob.sandbox.watching import serve_watch

Json = dict[str, Any]
logger = logging.getLogger(__name__)

SERVER_VERSION: Json = {
    "major": "1",
    "minor": "37",
    "gitVersion": "v1.37.0-gpujob-sandbox",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.25",
    "compiler": "gc",
    "platform": "linux/amd64",
}
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


def _list_key(obj: Json) -> list[str]:
    """Where an object sorts in a list (the store's order: namespace, then name)."""
    meta = obj["metadata"]
    return [meta.get("namespace", ""), meta["name"]]


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )


class SandboxHandler(kmock.KubernetesScaffold):
    """Serves discovery, OpenAPI, CRUD, watch and the `/_sandbox/*` debug endpoints."""

    def __init__(self, registry: Registry, api: ObjectApi, faults: Faults, request_log: RequestLog) -> None:
        super().__init__()
        self.registry, self.api, self.faults, self.request_log = registry, api, faults, request_log
        self.store = api.store
        self.openapi = OpenApi(registry)
        self.bookmark_interval = 5.0  # seconds of silence before a watch that allows bookmarks gets one

    async def __call__(self, raw: web.BaseRequest) -> web.StreamResponse:  # no request history: see module doc
        self.request_log.total += 1
        try:
            return await self._route(raw)
        except errors.ApiError as exc:
            headers = {"Retry-After": str(self.faults.retry_after_seconds)} if exc.status == 429 else None
            return json_response(exc.status_object(), exc.status, headers)
        except selectors.SelectorError as exc:
            return json_response(errors.bad_request(str(exc)).status_object(), 400)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # an emulator bug: answer like the server would, and keep serving
            logger.exception("sandbox: %s %s failed", raw.method, raw.path_qs)
            error = errors.ApiError(500, "InternalError", f"sandbox emulator error: {exc!r}", {})
            return json_response(error.status_object(), 500)

    async def _route(self, raw: web.BaseRequest) -> web.StreamResponse:
        parts = [p for p in raw.path.split("/") if p]
        if parts and parts[0] in {"api", "apis"}:
            core = parts[0] == "api"
            depth = 2 if core else 3  # /api/v1 vs /apis/group/version
            if len(parts) > depth:
                group, version = ("", parts[1]) if core else (parts[1], parts[2])
                return await self._resource_request(raw, group, version, parts[depth:])
            return self._discovery(parts)
        if parts and parts[0] == "openapi":
            return self._openapi(parts)
        if parts and parts[0] == "_sandbox":
            return await self._debug(raw, parts[1:])
        if raw.path.rstrip("/") == "/version":  # clients ask for /version/ too
            return json_response(SERVER_VERSION)
        if raw.path in {"/healthz", "/readyz", "/livez"}:
            return web.Response(text="ok")
        if raw.path == "/":
            return json_response({"paths": ["/api", "/api/v1", "/apis", "/openapi/v2", "/openapi/v3", "/version"]})
        raise errors.unknown_resource()

    def _discovery(self, parts: list[str]) -> web.Response:
        document: Json | None
        if parts == ["api"]:
            document = {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        elif parts == ["apis"]:
            document = self.registry.api_group_list()
        elif parts[0] == "api":
            document = self.registry.resource_list("", parts[1])
        elif len(parts) == 2:
            document = self.registry.api_group(parts[1])
        else:
            document = self.registry.resource_list(parts[1], parts[2])
        if document is None:
            raise errors.unknown_resource()
        return json_response(document)

    def _openapi(self, parts: list[str]) -> web.Response:
        body: bytes | None = None
        if parts == ["openapi", "v2"]:
            body = self.openapi.v2()
        elif parts == ["openapi", "v3"]:
            body = self.openapi.v3_root()
        elif parts[:2] == ["openapi", "v3"]:
            body = self.openapi.v3_document("/".join(parts[2:]))
        if body is None:
            raise errors.unknown_resource()
        return web.Response(body=body, content_type="application/json")

    async def _debug(self, raw: web.BaseRequest, parts: list[str]) -> web.Response:
        if parts == ["requests"]:
            if raw.method in {"DELETE", "POST"}:
                self.request_log.reset()
            return json_response(self.request_log.as_json())
        if parts == ["faults"]:
            if raw.method == "POST":
                try:
                    self.faults.update(json.loads(await raw.read() or b"{}"))
                except (ValueError, TypeError) as exc:
                    raise errors.bad_request(str(exc)) from exc
            return json_response(self.faults.as_json())
        raise errors.unknown_resource()

    # --- resources
    async def _resource_request(
        self, raw: web.BaseRequest, group: str, version: str, rest: list[str]
    ) -> web.StreamResponse:
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in {"status", "finalize"}:
            namespace, rest = rest[1], rest[2:]
        res = self.registry.get(group, version, rest[0])
        name = rest[1] if len(rest) > 1 else None
        sub = "/".join(rest[2:]) or None
        if res is None or (sub is not None and sub not in res.subresources) or (namespace and not res.namespaced):
            raise errors.unknown_resource()
        if res.namespaced and not namespace and (name is not None or raw.method not in {"GET"}):
            raise errors.unknown_resource()
        query = raw.query
        verb = self._verb(raw.method, name, query.get("watch", "") in {"true", "1"})
        key = RequestKey(verb, group, res.plural, sub or "", bool(namespace))
        self.request_log.record(key, raw.headers.get("User-Agent", ""))
        await self._inject_faults(res, verb, sub, raw.headers.get("User-Agent", ""))

        if verb == "list":
            return self._list(raw, res, namespace)
        if verb == "watch":
            return await serve_watch(self, raw, res, namespace, name)
        if verb == "get":
            if sub == "log":
                return await self._pod_log(raw, res, namespace, name or "")
            obj = self.api.get(res, namespace, name or "")
            if tables.wants_table(raw.headers.get("Accept", "")):
                return json_response(tables.table(res, [obj], str(self.store.rv), query.get("includeObject", "")))
            return json_response(obj)

        body = await self._body(raw)
        options = {"dry_run": "All" in query.getall("dryRun", []), "strict": query.get("fieldValidation") == "Strict"}
        if verb == "create" and name is not None:  # pods/eviction, pods/binding
            return json_response(self._pod_action(res, namespace, name, sub, body), 201)
        if verb == "create":
            return json_response(self.api.create(res, namespace, body, **options), 201)
        if verb == "update":
            return json_response(self.api.update(res, namespace, name or "", body, sub, **options))
        if verb == "patch":
            patch_type = PATCH_TYPES.get(raw.content_type)
            if patch_type is None:
                raise errors.unsupported_media_type(raw.content_type)
            obj, created = self.api.patch(res, namespace, name or "", body, patch_type, sub, **options)
            return json_response(obj, 201 if created else 200)
        delete_options = {
            **(body if isinstance(body, dict) else {}),
            **{k: query[k] for k in ("propagationPolicy",) if k in query},
        }
        if verb == "delete":
            return json_response(
                self.api.delete(res, namespace, name or "", delete_options, dry_run=options["dry_run"])
            )
        return self._delete_collection(raw, res, namespace, delete_options, options["dry_run"])

    @staticmethod
    def _verb(method: str, name: str | None, watch: bool) -> str:
        if method == "GET":
            return "watch" if watch else "get" if name is not None else "list"
        verbs = {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if name is not None else "deletecollection",
        }
        if method not in verbs or (method in {"PUT", "PATCH"} and name is None):
            raise errors.method_not_allowed()
        return verbs[method]

    async def _inject_faults(self, res: Resource, verb: str, sub: str | None, agent: str) -> None:
        faults = self.faults
        if faults.latency_seconds > 0:
            await asyncio.sleep(faults.latency_seconds)
        if faults.roll(faults.error_429_rate, res.plural, agent, "429"):
            raise errors.ApiError(
                429,
                "TooManyRequests",
                "sandbox: injected 429, please try again later",
                {"retryAfterSeconds": faults.retry_after_seconds},
            )
        if faults.roll(faults.error_500_rate, res.plural, agent, "500"):
            raise errors.ApiError(500, "InternalError", "sandbox: injected internal error", {})
        if faults.roll(faults.error_403_rate, res.plural, agent, "403"):
            raise errors.ApiError(403, "Forbidden", f"sandbox: injected: {verb} {res.plural} is forbidden", {})
        if (
            sub == "status"
            and verb in {"update", "patch"}
            and faults.roll(faults.status_conflict_rate, res.plural, agent, "409")
        ):
            raise errors.conflict(res, "(injected)")

    @staticmethod
    async def _body(raw: web.BaseRequest) -> Any:
        data = await raw.read()
        if not data:
            return None
        if "protobuf" in raw.content_type:
            try:
                return protobuf.decode(data)
            except protobuf.ProtobufError as exc:
                raise errors.unsupported_media_type(f"{raw.content_type} ({exc})") from exc
        try:
            if "yaml" in raw.content_type:
                return yaml.safe_load(data)
            return json.loads(data)
        except (ValueError, yaml.YAMLError) as exc:
            raise errors.bad_request(f"the request body could not be decoded: {exc}") from exc

    def selection(self, raw: web.BaseRequest, namespace: str, name: str | None = None) -> selectors.Predicate | None:
        in_namespace = (lambda obj: obj["metadata"].get("namespace") == namespace) if namespace else None
        named = (lambda obj: obj["metadata"]["name"] == name) if name else None
        labels = selectors.label_selector(raw.query.get("labelSelector"))
        fields = selectors.field_selector(raw.query.get("fieldSelector"))
        return selectors.combine(in_namespace, named, labels, fields)

    def _list(self, raw: web.BaseRequest, res: Resource, namespace: str) -> web.Response:
        predicate = self.selection(raw, "")
        objects = self.store.items(res.store_key, namespace or None)
        if predicate is not None:
            objects = [obj for obj in objects if predicate(obj)]
        # A paged list is one list: every page carries the resourceVersion of the first, and the next page starts
        # after the last key served (not at an offset, which writes in between would shift). Objects are served as
        # they are now, not as they were at that version, but a watch from that version replays every change
        # since, so no change between the pages is lost (a later version for every page would lose them).
        rv = self.store.rv
        token = raw.query.get("continue")
        if token:
            try:
                rv, after = json.loads(base64.urlsafe_b64decode(token.encode()))
            except (ValueError, TypeError) as exc:
                raise errors.bad_request(f"invalid continue token: {token!r}") from exc
            objects = [obj for obj in objects if _list_key(obj) > after]
        meta: Json = {"resourceVersion": str(rv)}
        limit = int(raw.query.get("limit") or 0)
        if 0 < limit < len(objects):
            meta["remainingItemCount"] = len(objects) - limit
            objects = objects[:limit]
            last = json.dumps([rv, _list_key(objects[-1])]).encode()
            meta["continue"] = base64.urlsafe_b64encode(last).decode()
        if tables.wants_table(raw.headers.get("Accept", "")):
            return json_response(
                tables.table(res, objects, meta["resourceVersion"], raw.query.get("includeObject", ""), meta)
            )
        return json_response(
            {"kind": f"{res.kind}List", "apiVersion": res.group_version, "metadata": meta, "items": objects}
        )

    def _delete_collection(
        self, raw: web.BaseRequest, res: Resource, namespace: str, options: Json, dry_run: bool
    ) -> web.Response:
        predicate = self.selection(raw, namespace)
        deleted = []
        for obj in self.store.items(res.store_key, namespace or None):
            if predicate is None or predicate(obj):
                meta = obj["metadata"]
                if self.store.get(res.store_key, meta.get("namespace", ""), meta["name"]) is not None:
                    deleted.append(
                        self.api.delete(res, meta.get("namespace", ""), meta["name"], options, dry_run=dry_run)
                    )
        return json_response(
            {
                "kind": f"{res.kind}List",
                "apiVersion": res.group_version,
                "metadata": {"resourceVersion": str(self.store.rv)},
                "items": deleted,
            }
        )

    async def _pod_log(self, raw: web.BaseRequest, res: Resource, namespace: str, name: str) -> web.StreamResponse:
        """`kubectl logs [-f]`: the file the sandbox kubelet of the Pod's Node writes (its pods dir is on the Node)."""
        pod = self.api.get(res, namespace, name)
        node_name = (pod.get("spec") or {}).get("nodeName")
        if not node_name:  # not scheduled: kube-apiserver answers an empty log
            return web.Response(text="")
        node = self.store.get(("", "nodes"), "", node_name) or {}
        pods_dir = ((node.get("metadata") or {}).get("annotations") or {}).get(podlogs.PODS_DIR_ANNOTATION)
        if not pods_dir:
            raise errors.bad_request(f"node {node_name} has no sandbox kubelet that keeps its Pods' logs")
        uid = pod["metadata"].get("uid")
        try:
            container, path = podlogs.container_log(pod, raw.query.get("container"), Path(pods_dir))
            options = podlogs.LogOptions.from_query(raw.query, container, name)
        except podlogs.LogUnavailable as exc:
            raise errors.bad_request(str(exc)) from None

        def ended() -> bool:
            current = self.store.get(res.store_key, namespace, name)
            if current is None or current["metadata"].get("uid") != uid:
                return True
            status = current.get("status") or {}
            states = [s.get("state") or {} for s in status.get("containerStatuses") or [] if s.get("name") == container]
            return status.get("phase") in {"Succeeded", "Failed"} or any("terminated" in s for s in states)

        return await podlogs.stream(raw, path, options, ended)

    def _pod_action(self, res: Resource, namespace: str, name: str, sub: str | None, body: Any) -> Json:
        if sub == "eviction":
            # As the real Eviction API (1.26+): the Pod is marked DisruptionTarget before it is deleted.
            condition = {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting",
                "lastTransitionTime": now(),
            }
            self.api.patch(res, namespace, name, {"status": {"conditions": [condition]}}, "strategic", "status")
            self.api.delete(res, namespace, name, (body or {}).get("deleteOptions") or {})
        elif sub == "binding":
            node = ((body or {}).get("target") or {}).get("name", "")
            self.api.patch(res, namespace, name, {"spec": {"nodeName": node}}, "merge", None)
        else:
            raise errors.method_not_allowed()
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}
