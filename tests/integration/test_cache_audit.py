"""The cache told the truth after a watch gap (issue 12 item 8), read against each backend's real lists:
objects deleted while unwatched are dropped, live ones and ones newer than the list are kept, and a job found
gone is dropped instead of getting a Pod that garbage collection would only delete."""

from __future__ import annotations

from typing import Any

from gpujob import kube
from gpujob.api.constants import API_VERSION, GROUP, KIND, MANAGER, PLURAL, VERSION, Label
from gpujob.operator.audit import CacheAudit
from gpujob.operator.builders import PodDefaults
from gpujob.operator.cache import Store
from gpujob.operator.reconciler import Reconciler
from gpujob.operator.runtime import POD_SELECTOR
from tests.support.kubernetes import ApiTarget, restricted_container
from tests.support.operator import PEN, with_valid_params


async def custom() -> Any:
    from kubernetes_asyncio import client

    return client.CustomObjectsApi(await kube.api_client())


async def core() -> Any:
    from kubernetes_asyncio import client

    return client.CoreV1Api(await kube.api_client())


async def new_job(namespace: str, name: str) -> dict[str, Any]:
    spec = {**with_valid_params({"type": "train_lora"}), "nodeSelector": PEN}
    body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}
    job: dict[str, Any] = await (await custom()).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    return job


async def new_pod(namespace: str, name: str, owner: dict[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    ref = {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"], "controller": True}
    body = {
        "metadata": {"name": name, "labels": {Label.MANAGED_BY: MANAGER, Label.ATTEMPT: "1"}, "ownerReferences": [ref]},
        "spec": {"containers": [restricted_container(["true"])], "nodeSelector": PEN, "restartPolicy": "Never"},
    }
    pod = await (await core()).create_namespaced_pod(namespace, body)
    result: dict[str, Any] = (await kube.api_client()).sanitize_for_serialization(pod)
    return result


async def test_the_audit_drops_what_was_deleted_while_unwatched_and_keeps_the_rest(api: ApiTarget) -> None:
    ns = api.namespace
    try:
        live, deleted = await new_job(ns, "audit-live"), await new_job(ns, "audit-deleted")
        kept_pod = await new_pod(ns, "audit-live-a1", live)
        gone_pod = await new_pod(ns, "audit-live-a2", live)
        store = Store()
        for job in (live, deleted):
            store.put_job(job)
        for pod in (kept_pod, gone_pod):
            store.put_pod(pod)
        # Seen at a version newer than any list can be: created after the list began, so never taken for gone.
        newer = {**live, "metadata": {**live["metadata"], "name": "audit-newer", "uid": "u-newer",
                                      "resourceVersion": str(10**15)}}  # fmt: skip
        store.put_job(newer)
        # Deleted while "unwatched": this store sees no DELETED events.
        await (await custom()).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "audit-deleted")
        await (await core()).delete_namespaced_pod("audit-live-a2", ns, grace_period_seconds=0)

        jobs_gone: list[dict[str, Any]] = []
        pods_gone: list[dict[str, Any]] = []

        def job_gone(body: dict[str, Any]) -> None:
            jobs_gone.append(body)
            store.drop_job((body["metadata"]["namespace"], body["metadata"]["name"]))

        def pod_gone(body: dict[str, Any]) -> None:
            pods_gone.append(body)
            store.drop_pod(body)

        audit = CacheAudit(store, [ns], POD_SELECTOR, job_gone, pod_gone)
        assert await audit.once() == (1, 1)
        assert [j["metadata"]["name"] for j in jobs_gone] == ["audit-deleted"]
        assert [p["metadata"]["name"] for p in pods_gone] == ["audit-live-a2"]
        assert store.job((ns, "audit-live")) is not None and store.job((ns, "audit-newer")) is not None
        assert [p.name for p in store.pods_of(live["metadata"]["uid"])] == ["audit-live-a1"]
        assert await audit.once() == (0, 0), "a second look finds nothing more"
    finally:
        await kube.close()


async def test_a_job_found_gone_is_dropped_and_gets_no_pod(api: ApiTarget) -> None:
    """The cache holds a Running job whose Pod went (what a watch gap leaves after the job was deleted and GC took
    its Pod): the next attempt would be a Pod for an owner that is gone. The reconciler asks first."""
    ns = api.namespace
    try:
        job = await new_job(ns, "audit-owner-gone")
        await (await custom()).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "audit-owner-gone")
        held = {**job, "status": {"phase": "Running", "attempts": 1, "podName": "audit-owner-gone-a1"}}
        store = Store()
        store.put_job(held)
        defaults = PodDefaults(worker_image="w:1", worker_command=("gpujob", "worker"), passthrough_env={})
        reconciler = Reconciler(store, defaults)
        found: list[str] = []
        reconciler.on_gone = lambda body: found.append(body["metadata"]["name"])
        await reconciler.trigger((ns, "audit-owner-gone"))
        assert found == ["audit-owner-gone"]
        pods = await (await core()).list_namespaced_pod(ns, label_selector=POD_SELECTOR)
        assert [p.metadata.name for p in pods.items] == [], "no Pod for an owner that is gone"
        await reconciler.close()
    finally:
        await kube.close()
