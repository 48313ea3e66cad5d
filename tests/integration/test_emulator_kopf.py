"""A tiny real kopf operator against the emulator: create once, status patches, finalizers, owner-reference GC."""

from __future__ import annotations

import threading
from typing import Any

import kopf
import kubernetes
from kopf.testing import KopfRunner

from gpujob.api import GROUP, PLURAL, VERSION
from tests.support.emulator import wait_until

FINALIZER = "sandbox.gpujob.dev/test"


def build_operator(calls: list[tuple[str, str]], api_client: Any) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    lock = threading.Lock()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.watching.server_timeout = 30

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_kubeconfig(**kwargs)  # reads KUBECONFIG, set by the emulator fixture

    @kopf.on.create(GROUP, VERSION, PLURAL, id="created", registry=registry)
    def created(name: str, namespace: str, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        with lock:
            calls.append(("create", name))
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-pod", "labels": {"job": name}},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        }
        kopf.adopt(pod, owner=body)
        kubernetes.client.CoreV1Api(api_client).create_namespaced_pod(namespace, pod)
        patch.status["phase"] = "Scheduled"
        patch.status["podName"] = pod["metadata"]["name"]
        patch.status["undeclared"] = "pruned by the CRD schema"

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="deleted", registry=registry)
    def deleted(name: str, **_: Any) -> None:
        with lock:
            calls.append(("delete", name))

    return registry


def gpujob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GpuJob",
        "metadata": {"name": name},
        "spec": {"type": "custom", "image": "busybox"},
    }


def test_kopf_operator_lifecycle(emulator: Any, k8s_api: Any) -> None:
    calls: list[tuple[str, str]] = []
    custom = kubernetes.client.CustomObjectsApi(k8s_api)
    core = kubernetes.client.CoreV1Api(k8s_api)
    registry = build_operator(calls, k8s_api)
    args = ["run", "--standalone", "--all-namespaces", "--verbose"]
    with KopfRunner(args, registry=registry, timeout=30) as runner:
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, gpujob("job-a"))

        def handled() -> dict[str, Any] | None:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "job-a")
            return obj if obj.get("status", {}).get("phase") else None

        obj = wait_until(handled, message="the create handler's result in status")
        assert obj["status"]["phase"] == "Scheduled"  # patched through the status subresource
        assert obj["status"]["podName"] == "job-a-pod"
        assert "undeclared" not in obj["status"]
        assert FINALIZER in obj["metadata"]["finalizers"]
        pod = core.read_namespaced_pod("job-a-pod", "default")
        assert pod.metadata.owner_references[0].uid == obj["metadata"]["uid"]

        # kopf recognises its own patches: more changes never re-run the create handler.
        labels = {"metadata": {"labels": {"x": "y"}}}
        custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "job-a", labels)

        custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "job-a")
        wait_until(lambda: ("delete", "job-a") in calls, message="the delete handler")

        def gone() -> bool:
            names = [
                o["metadata"]["name"]
                for o in custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"]
            ]
            return "job-a" not in names

        wait_until(gone, message="the GpuJob to be released by its finalizer and removed")
        wait_until(lambda: not core.list_namespaced_pod("default", label_selector="job=job-a").items, message="pod GC")

    assert calls.count(("create", "job-a")) == 1, calls
    assert calls.count(("delete", "job-a")) == 1, calls
    assert "Traceback" not in runner.output, runner.output[-3000:]
