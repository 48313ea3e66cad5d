"""The one Kubernetes API wrapper: a shared async client; 409 on create and 404 on delete mean "already done"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from enum import StrEnum
from functools import partial
from typing import Any, TypeVar

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException as ApiException  # re-exported: only this module
from yarl import URL

from gpujob import __version__
from gpujob.api.constants import GROUP, MANAGER, PLURAL, VERSION
from gpujob.api.queues import QUEUE_PLURAL
from gpujob.logging import get_logger

log = get_logger("gpujob.kube")

T = TypeVar("T")


class Effect(StrEnum):
    """What a write did: the API wrapper reads 409 on create and 404 on delete as "already done"."""

    CREATED = "created"
    EXISTED = "existed"
    DELETED = "deleted"
    ABSENT = "absent"
    PATCHED = "patched"


_api: client.ApiClient | None = None
_lock = asyncio.Lock()


async def api_client() -> client.ApiClient:
    """One ApiClient per process (connection pool shared by every handler)."""
    global _api
    async with _lock:
        if _api is None:
            configuration = client.Configuration()
            if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            else:
                # KUBECONFIG read now, not at import time (the library's default is fixed when it is imported).
                await config.load_kube_config(
                    config_file=os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None,
                    client_configuration=configuration,
                )
            configuration.connection_pool_maxsize = 64
            _resolve_env_proxy(configuration)
            _api = client.ApiClient(configuration)
            # The library's session trusts the environment, which costs two thread-pool hops per request
            # (an ~/.netrc read and a proxy lookup: a fifth of the operator's CPU in a burst). The proxy is
            # resolved once above; netrc never applies (requests carry the bearer token).
            session: Any = _api.rest_client.pool_manager
            session._trust_env = False
            _api.user_agent = f"{MANAGER}/{__version__}"  # tells our calls apart in API server audit logs
        return _api


def _resolve_env_proxy(configuration: client.Configuration) -> None:
    """HTTPS_PROXY/NO_PROXY for the API server, read once (as the library would on every request)."""
    if configuration.proxy or not configuration.host:
        return
    with contextlib.suppress(LookupError):
        proxy, auth = get_env_proxy_for_url(URL(configuration.host))
        configuration.proxy = str(proxy)
        if auth is not None:
            configuration.proxy_headers = {"Proxy-Authorization": auth.encode()}


async def close() -> None:
    global _api
    async with _lock:
        if _api is not None:
            await _api.close()
            _api = None


async def ping() -> bool:
    """Whether the API server answers (readiness)."""
    version: Any = client.VersionApi(await api_client())
    await version.get_code()
    return True


async def served_resources(group_version: str) -> set[str]:
    """The resource names the API server's discovery lists for `group_version` ("v1" is the core group);
    empty while it does not serve it (yet)."""
    api = await api_client()
    path = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    try:
        resp: Any = await api.call_api(path, "GET", auth_settings=["BearerToken"], _preload_content=False)
        data = await _read(resp[0] if isinstance(resp, tuple) else resp)
    except (ApiException, OSError, TimeoutError, aiohttp.ClientError):
        return set()
    return {str(r.get("name", "")) for r in data.get("resources") or []}


async def wait_for_discovery(wanted: dict[str, str], cap: float = 5.0) -> None:
    """Until discovery lists every {group/version: resource}. kopf resolves its resources once, from discovery,
    when its watchers start; an API server that is coming back (a restart, an upgrade) can answer 403 on /api
    or omit a CRD's group for a moment, and a namespaced kopf never looks again: wait here first."""
    delay = 0.2
    while True:
        missing = [f"{gv}/{res}" for gv, res in wanted.items() if res not in await served_resources(gv)]
        if not missing:
            return
        log.warning("waiting for the API server to serve resources", missing=missing, retry_in=delay)
        await asyncio.sleep(delay)
        delay = min(cap, delay * 2)


async def _read(resp: Any) -> dict[str, Any]:
    """The JSON of a raw (`_preload_content=False`) response; errors raised as the client would have."""
    data: dict[str, Any] = await resp.json(content_type=None)
    if resp.status >= 400:
        exc = ApiException(status=resp.status, reason=resp.reason)
        exc.body = json.dumps(data).encode()
        exc.headers = resp.headers
        raise exc
    return data


class Verdict(StrEnum):
    """How to take a failed API call: the one classification every caller uses."""

    TRANSIENT = "transient"  # the cluster's passing state (5xx, 429, 408, 401, unreachable, resource not served)
    CONFLICT = "conflict"  # 409: someone wrote first (or the object exists)
    NOT_FOUND = "not_found"  # 404 naming an object: the object, or the namespace it would live in
    FORBIDDEN = "forbidden"  # 403 from RBAC or a quota: may pass (an apiserver warming up, a quota that frees)
    REJECTED = "rejected"  # refused for good: invalid (400, 422), admission policy (PodSecurity), any other 4xx


def verdict(exc: BaseException) -> Verdict | None:
    """The Verdict on a failed call; None when `exc` is not the API's answer nor the network's (a bug of ours)."""
    if not isinstance(exc, ApiException):
        return Verdict.TRANSIENT if isinstance(exc, OSError | asyncio.TimeoutError | aiohttp.ClientError) else None
    code = exc.status or 0
    if code >= 500 or code in (401, 408, 429):
        return Verdict.TRANSIENT
    if code == 409:
        return Verdict.CONFLICT
    if code == 404:  # no object named: the path itself is not served (a CRD not installed yet, or upgrading)
        return Verdict.NOT_FOUND if _status_of(exc).get("details", {}).get("name") else Verdict.TRANSIENT
    if code == 403:
        return Verdict.REJECTED if "violates PodSecurity" in message_of(exc) else Verdict.FORBIDDEN
    return Verdict.REJECTED


def _status_of(exc: ApiException) -> dict[str, Any]:
    """The Status object the API server answered with ({} when the body is not one)."""
    try:
        body = json.loads(exc.body or "{}")
    except (ValueError, TypeError):
        return {}
    return body if isinstance(body, dict) and isinstance(body.get("details", {}), dict) else {}


def transient(exc: BaseException) -> bool:
    """Worth retrying: throttled, a server error, or the connection failed."""
    return verdict(exc) is Verdict.TRANSIENT


def _retry_after(exc: BaseException, default: float) -> float:
    headers = getattr(exc, "headers", None) or {}
    try:
        return max(default, float(headers.get("Retry-After", default)))
    except (TypeError, ValueError):
        return default


async def with_retries(call: Callable[[], Awaitable[T]], attempts: int = 8, cap: float = 10.0) -> T:
    """`call()` retried on transient errors with capped exponential back-off (honouring Retry-After)."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except Exception as exc:
            if attempt == attempts or not transient(exc):
                raise
            await asyncio.sleep(min(cap, _retry_after(exc, delay)))
            delay = min(cap, delay * 2)
    raise AssertionError("unreachable")


def message_of(exc: BaseException) -> str:
    """The API server's message of a failed call (its Status body), else the HTTP reason."""
    if not isinstance(exc, ApiException):
        return str(exc)
    return str(_status_of(exc).get("message") or exc.reason)


def exceeded_quota(exc: BaseException) -> bool:
    """A 403 from ResourceQuota admission (`... is forbidden: exceeded quota: <name>, requested: ..., used: ...,
    limited: ...`): the object may pass once the namespace's usage goes down."""
    return isinstance(exc, ApiException) and exc.status == 403 and "exceeded quota" in message_of(exc)


def rejected_for_good(exc: BaseException) -> bool:
    """Will the API server refuse this object whatever we wait for? 400 and 422 (invalid), a 403 from admission
    policy (Pod Security), any 4xx that is not the cluster's passing state (413, ...). Other 403s pass: RBAC
    that is not ready yet (an apiserver that has just restarted refuses everyone for a moment: found by chaos),
    a quota that frees later (`exceeded quota`)."""
    return verdict(exc) is Verdict.REJECTED


def is_status(exc: BaseException, *codes: int) -> bool:
    return isinstance(exc, ApiException) and exc.status in codes


async def _write(call: Awaitable[Any], done: Effect, already: Effect, *already_codes: int) -> Effect:
    """Await a write: `done`, or `already` when the API server answers one of `already_codes` (409 on a create:
    it exists; 404 on a patch or delete: it is gone)."""
    try:
        answer = await call
        if isinstance(answer, aiohttp.ClientResponse):
            await _raise_for_status(answer)
    except ApiException as exc:
        if exc.status in already_codes:
            return already
        raise
    return done


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    """A raw (`_preload_content=False`) answer's error as the ApiException the client raises only when it reads the
    body itself: unchecked, a 500 or 429 on a create read as "created" (a job's credentials Secret never made, its
    Pod waiting for it for ever) and a 409 as "created" too. Read to the end, so the connection is reused."""
    try:
        body = await resp.read()
        if resp.status >= 400:
            exc = ApiException(status=resp.status, reason=resp.reason)
            exc.body = body
            exc.headers = resp.headers
            raise exc
    finally:
        resp.release()


async def create_pod(namespace: str, body: dict[str, Any]) -> tuple[Effect, dict[str, Any] | None]:
    """Create a Pod; returns the created object as the API server stored it (None if it already existed)."""
    api = await api_client()
    core: Any = client.CoreV1Api(api)  # stubs don't accept dict bodies
    try:
        data = await _read(await core.create_namespaced_pod(namespace, body, _preload_content=False))
    except ApiException as exc:
        if exc.status == 409:
            return Effect.EXISTED, None
        raise
    return Effect.CREATED, data


async def _pages(
    plural: str, namespaces: list[str] | None, label_selector: str = "", limit: int = 500
) -> AsyncIterator[tuple[str | None, dict[str, Any]]]:
    """Each `continue` page (namespace listed or None for all, the raw list body) of Pods (`plural` "pods") or
    GpuJobs ("gpujobs"), each page retried on its own; the pages of one namespace's list are one consistent
    snapshot, at its first page's resourceVersion."""
    pods = plural == "pods"
    api: Any = client.CoreV1Api(await api_client()) if pods else client.CustomObjectsApi(await api_client())
    for namespace in list(namespaces) if namespaces else [None]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": limit, "_preload_content": False}
            if label_selector:
                kwargs["label_selector"] = label_selector
            if token:
                kwargs["_continue"] = token
            if pods:
                call = (
                    partial(api.list_pod_for_all_namespaces, **kwargs)
                    if namespace is None
                    else partial(api.list_namespaced_pod, namespace, **kwargs)
                )
            elif namespace is None:
                call = partial(api.list_cluster_custom_object, GROUP, VERSION, plural, **kwargs)
            else:
                call = partial(api.list_namespaced_custom_object, GROUP, VERSION, namespace, plural, **kwargs)
            page = await with_retries(partial(_read_call, call))
            token = (page.get("metadata") or {}).get("continue")
            yield namespace, page
            if not token:
                break


async def list_pods(
    namespaces: list[str] | None, label_selector: str, limit: int = 500
) -> AsyncIterator[list[dict[str, Any]]]:
    """Raw Pod dicts (all namespaces when `namespaces` is None), one `continue` page at a time: the caller
    files a page and drops it, so at most one page of full Pod bodies is held at once."""
    async for _, page in _pages("pods", namespaces, label_selector, limit):
        yield page.pop("items", None) or []


async def _read_call(call: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    return await _read(await call())


async def get_pod(namespace: str, name: str) -> dict[str, Any] | None:
    core: Any = client.CoreV1Api(await api_client())
    try:
        return await _read(await core.read_namespaced_pod(name, namespace, _preload_content=False))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def delete_pod(namespace: str, name: str, grace_seconds: int | None = None) -> Effect:
    core: Any = client.CoreV1Api(await api_client())  # stubs don't accept dict bodies
    return await _write(
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=grace_seconds),
        Effect.DELETED,
        Effect.ABSENT,
        404,
    )


async def create_secret(namespace: str, body: dict[str, Any]) -> Effect:
    """Create a Secret (a job's own credentials; 409: one of that name exists)."""
    core: Any = client.CoreV1Api(await api_client())
    return await _write(
        core.create_namespaced_secret(namespace, body, _preload_content=False), Effect.CREATED, Effect.EXISTED, 409
    )


async def delete_secret(namespace: str, name: str) -> Effect:
    core: Any = client.CoreV1Api(await api_client())
    return await _write(
        core.delete_namespaced_secret(name, namespace, _preload_content=False), Effect.DELETED, Effect.ABSENT, 404
    )


async def create_gpujob(namespace: str, body: dict[str, Any]) -> Effect:
    custom: Any = client.CustomObjectsApi(await api_client())
    return await _write(
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body),
        Effect.CREATED,
        Effect.EXISTED,
        409,
    )


async def get_gpujob(namespace: str, name: str) -> dict[str, Any] | None:
    custom: Any = client.CustomObjectsApi(await api_client())
    try:
        obj: dict[str, Any] = await custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


async def get_peering(name: str, namespace: str | None) -> dict[str, Any] | None:
    """kopf's peering object (kopf.dev/v1): a ClusterKopfPeering (namespace None) or a namespace's KopfPeering;
    None when there is none. Read by a list narrowed to its name: the chart grants list and watch on peerings
    (kopf's own need), not get."""
    custom: Any = client.CustomObjectsApi(await api_client())
    selector = f"metadata.name={name}"
    if namespace is None:
        found = await custom.list_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", field_selector=selector
        )
    else:
        found = await custom.list_namespaced_custom_object(
            "kopf.dev", "v1", namespace, "kopfpeerings", field_selector=selector
        )
    items: list[dict[str, Any]] = [i for i in found.get("items") or [] if i.get("metadata", {}).get("name") == name]
    return items[0] if items else None


async def patch_gpujob(namespace: str, name: str, patch: dict[str, Any], *, status: bool = False) -> Effect:
    """JSON merge-patch of a GpuJob (or its status subresource); 404 = the job is gone."""
    custom: Any = client.CustomObjectsApi(await api_client())
    method = custom.patch_namespaced_custom_object_status if status else custom.patch_namespaced_custom_object
    return await _write(
        method(GROUP, VERSION, namespace, PLURAL, name, patch, _content_type="application/merge-patch+json"),
        Effect.PATCHED,
        Effect.ABSENT,
        404,
    )


async def patch_gpujob_status(
    namespace: str, name: str, status: dict[str, Any], resource_version: str | None
) -> dict[str, Any] | None:
    """Merge-patch the status subresource, guarded by resourceVersion (409 if someone wrote in between).
    Returns the stored object, or None when the GpuJob is gone."""
    custom: Any = client.CustomObjectsApi(await api_client())
    body: dict[str, Any] = {"status": status}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    try:
        resp = await custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            body,
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )
        return await _read(resp)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def list_gpujobs(namespaces: list[str] | None, limit: int = 500) -> AsyncIterator[list[dict[str, Any]]]:
    """Raw GpuJob dicts (all namespaces when `namespaces` is None), one `continue` page at a time."""
    async for _, page in _pages(PLURAL, namespaces, limit=limit):
        yield page.pop("items", None) or []


async def list_names(
    plural: str, namespaces: list[str] | None, label_selector: str = ""
) -> list[tuple[str | None, str, set[tuple[str, str]]]]:
    """What exists now, for checking a cache against it: per listed scope (a namespace, or None for all), the
    list's resourceVersion and the (namespace, name) of each Pod (`plural` "pods") or GpuJob ("gpujobs")."""
    found: dict[str | None, tuple[str, set[tuple[str, str]]]] = {}
    async for namespace, page in _pages(plural, namespaces, label_selector):
        _, names = found.setdefault(namespace, (str((page.get("metadata") or {}).get("resourceVersion") or ""), set()))
        for item in page.get("items") or []:
            meta = item.get("metadata") or {}
            names.add((meta.get("namespace", ""), meta.get("name", "")))
    return [(namespace, version, names) for namespace, (version, names) in found.items()]


async def list_gpuqueues() -> list[dict[str, Any]] | None:
    """Every GpuQueue (cluster-scoped), or None when the GpuQueue CRD is not installed or may not be read (an
    install whose RBAC predates queues): then there are no queues, as before them."""
    custom: Any = client.CustomObjectsApi(await api_client())
    try:
        listed = await _read(
            await custom.list_cluster_custom_object(GROUP, VERSION, QUEUE_PLURAL, _preload_content=False)
        )
    except ApiException as exc:
        if exc.status in (403, 404):
            log.warning("GpuQueues not readable, no queues", error=f"API {exc.status} {exc.reason}")
            return None
        raise
    items: list[dict[str, Any]] = listed.get("items") or []
    return items


async def patch_gpuqueue_status(name: str, status: dict[str, Any]) -> Effect:
    """Merge-patch a GpuQueue's status subresource (its usage, as the queue manager derives it); 404 = gone."""
    custom: Any = client.CustomObjectsApi(await api_client())
    return await _write(
        custom.patch_cluster_custom_object_status(
            GROUP, VERSION, QUEUE_PLURAL, name, {"status": status}, _content_type="application/merge-patch+json"
        ),
        Effect.PATCHED,
        Effect.ABSENT,
        404,
    )


async def delete_gpujob(namespace: str, name: str, uid: str | None = None) -> Effect:
    """Delete a GpuJob; with `uid`, only that one (a precondition: a GpuJob re-created under the same name has
    another uid, and the API server answers 409, taken here as "already gone")."""
    custom: Any = client.CustomObjectsApi(await api_client())
    body = {"preconditions": {"uid": uid}} if uid else None
    return await _write(
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body=body),
        Effect.DELETED,
        Effect.ABSENT,
        *((404, 409) if uid else (404,)),
    )


async def create_event(namespace: str, body: dict[str, Any]) -> Effect:
    """Create an events.k8s.io/v1 Event (409: one of that name exists, i.e. already posted)."""
    events: Any = client.EventsV1Api(await api_client())
    return await _write(
        events.create_namespaced_event(namespace, body, _preload_content=False), Effect.CREATED, Effect.EXISTED, 409
    )


async def patch_event(namespace: str, name: str, patch: dict[str, Any]) -> Effect:
    """Merge-patch an events.k8s.io/v1 Event (a series' count and last time); 404 = it expired or was deleted."""
    events: Any = client.EventsV1Api(await api_client())
    return await _write(
        events.patch_namespaced_event(
            name, namespace, patch, _content_type="application/merge-patch+json", _preload_content=False
        ),
        Effect.PATCHED,
        Effect.ABSENT,
        404,
    )
