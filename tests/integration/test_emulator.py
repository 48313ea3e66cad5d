"""The API emulator over real HTTP: each test proves one gap of plain kmock (docs/testing.md) is fixed."""

from __future__ import annotations

import datetime
from typing import Any

import kubernetes
import pytest
import requests
from kubernetes.client.rest import ApiException

from gpujob.api import GROUP, PLURAL, VERSION

GJ = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"
PODS = "/api/v1/namespaces/default/pods"
NOW = datetime.datetime.now(datetime.UTC)
MERGE = {"Content-Type": "application/merge-patch+json"}


def gpujob(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "GpuJob",
        "metadata": {"name": name},
        "spec": {"type": "custom", **spec},
    }


def pod(name: str, **meta: Any) -> dict[str, Any]:
    containers = [
        {"name": "a", "image": "busybox"},
        {"name": "b", "image": "busybox", "env": [{"name": "X", "value": "1"}]},
    ]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **meta}, "spec": {"containers": containers}}


class Http:
    def __init__(self, url: str) -> None:
        self.url, self.session = url, requests.Session()

    def __call__(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, **params: Any
    ) -> requests.Response:
        return self.session.request(method, self.url + path, json=body, headers=headers, params=params, timeout=10)


@pytest.fixture
def http(emulator: Any) -> Http:
    return Http(emulator.url)


def test_create_fills_metadata_and_answers_201(http: Http, k8s_api: Any) -> None:
    response = http("POST", GJ, gpujob("a"))
    assert response.status_code == 201
    meta = response.json()["metadata"]
    assert meta["namespace"] == "default"  # from the URL
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1
    # The official client returns the object (it returns None for a 200 to a create).
    created = kubernetes.client.CoreV1Api(k8s_api).create_namespaced_config_map(
        "default", {"metadata": {"generateName": "cm-"}}
    )
    assert created.metadata.name.startswith("cm-") and len(created.metadata.name) == 8


def test_errors_are_status_objects_like_the_real_server(http: Http) -> None:
    assert http("POST", GJ, gpujob("a")).status_code == 201
    again = http("POST", GJ, gpujob("a"))
    assert (again.status_code, again.json()["reason"]) == (409, "AlreadyExists")
    assert http("GET", f"{GJ}/missing").json()["reason"] == "NotFound"
    assert http("GET", "/apis/nope.dev/v1/namespaces/default/things").status_code == 404
    assert http("POST", "/api/v1/namespaces/nowhere/configmaps", {"metadata": {"name": "x"}}).status_code == 404
    bad_name = http("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "Not_Valid"}})
    assert bad_name.status_code == 422


def test_schema_validation_defaulting_and_pruning(http: Http) -> None:
    invalid = http("POST", GJ, gpujob("too-many", gpus=100))
    assert invalid.status_code == 422
    assert invalid.json()["message"].startswith(
        'GpuJob.gpujob.dev "too-many" is invalid: spec.gpus: Invalid value: 100'
    )
    assert invalid.json()["details"]["causes"][0]["field"] == "spec.gpus"
    wrong_type = http("POST", GJ, gpujob("bad-type", type="nope"))
    assert 'spec.type: Unsupported value: "nope"' in wrong_type.json()["message"]
    missing = http("POST", GJ, {**gpujob("no-spec"), "spec": {}})
    assert "spec.type: Required value" in missing.json()["message"]

    created = http("POST", GJ, gpujob("ok", surprise=True)).json()
    assert "surprise" not in created["spec"]  # pruned
    assert created["spec"]["gpus"] == 1 and created["spec"]["retries"]["limit"] == 3  # defaulted, nested too
    strict = http("POST", GJ, gpujob("strict", surprise=True), fieldValidation="Strict")
    assert strict.status_code == 400 and 'unknown field "spec.surprise"' in strict.json()["message"]


def test_label_and_field_selectors(http: Http) -> None:
    http("POST", "/api/v1/namespaces", {"metadata": {"name": "other"}})
    for name, ns, labels in [
        ("p1", "default", {"app": "x", "tier": "a"}),
        ("p2", "default", {"app": "y"}),
        ("p3", "other", {"app": "x"}),
    ]:
        assert http("POST", f"/api/v1/namespaces/{ns}/pods", pod(name, labels=labels)).status_code == 201
    http("PATCH", f"{PODS}/p2/status", {"status": {"phase": "Running"}}, MERGE)

    def names(path: str, **params: Any) -> list[str]:
        return [item["metadata"]["name"] for item in http("GET", path, **params).json()["items"]]

    assert names("/api/v1/pods", labelSelector="app=x") == ["p1", "p3"]
    assert names("/api/v1/pods", labelSelector="app in (x,y),tier") == ["p1"]
    assert names("/api/v1/pods", labelSelector="app!=x,!tier") == ["p2"]
    assert names("/api/v1/pods", fieldSelector="metadata.namespace=other") == ["p3"]
    assert names(PODS, fieldSelector="metadata.name=p2") == ["p2"]
    assert names("/api/v1/pods", fieldSelector="status.phase=Pending") == ["p1", "p3"]
    assert names("/api/v1/pods", fieldSelector="status.phase!=Pending") == ["p2"]


def test_status_subresource_and_generation(http: Http) -> None:
    http("POST", GJ, gpujob("s"))
    spec_write = http("PATCH", f"{GJ}/s", {"spec": {"gpus": 2}, "status": {"phase": "Running"}}, MERGE).json()
    assert spec_write["metadata"]["generation"] == 2 and "status" not in spec_write
    status_write = http("PATCH", f"{GJ}/s/status", {"spec": {"gpus": 3}, "status": {"phase": "Running"}}, MERGE).json()
    assert status_write["status"] == {"phase": "Running"} and status_write["spec"]["gpus"] == 2
    assert status_write["metadata"]["generation"] == 2
    labelled = http("PATCH", f"{GJ}/s", {"metadata": {"labels": {"a": "b"}}}, MERGE).json()
    assert labelled["metadata"]["generation"] == 2  # metadata changes don't bump generation
    rv = labelled["metadata"]["resourceVersion"]
    assert (
        http("PATCH", f"{GJ}/s", {"metadata": {"labels": {"a": "b"}}}, MERGE).json()["metadata"]["resourceVersion"]
        == rv
    )


def test_put_and_optimistic_concurrency(http: Http) -> None:
    obj = http("POST", GJ, gpujob("c")).json()
    obj["spec"]["gpus"] = 4
    updated = http("PUT", f"{GJ}/c", obj)
    assert updated.status_code == 200 and updated.json()["spec"]["gpus"] == 4
    stale = http("PUT", f"{GJ}/c", obj)  # still carries the old resourceVersion
    assert (stale.status_code, stale.json()["reason"]) == (409, "Conflict")
    old_rv = obj["metadata"]["resourceVersion"]
    assert (
        http("PATCH", f"{GJ}/c", {"metadata": {"resourceVersion": old_rv}, "spec": {"gpus": 5}}, MERGE).status_code
        == 409
    )


def test_json_patch_and_strategic_merge_patch(http: Http) -> None:
    http("POST", PODS, pod("p"))
    json_patch = {"Content-Type": "application/json-patch+json"}
    failed = http("PATCH", f"{PODS}/p", [{"op": "test", "path": "/metadata/name", "value": "other"}], json_patch)
    assert failed.status_code == 422
    ok = http("PATCH", f"{PODS}/p", [{"op": "add", "path": "/metadata/labels", "value": {"k": "v"}}], json_patch)
    assert ok.json()["metadata"]["labels"] == {"k": "v"}
    smp = {"Content-Type": "application/strategic-merge-patch+json"}
    patch = {"spec": {"containers": [{"name": "b", "image": "alpine", "env": [{"name": "Y", "value": "2"}]}]}}
    containers = http("PATCH", f"{PODS}/p", patch, smp).json()["spec"]["containers"]
    assert [c["name"] for c in containers] == ["a", "b"]
    assert containers[1]["image"] == "alpine" and [e["name"] for e in containers[1]["env"]] == ["X", "Y"]
    delete = {"spec": {"containers": [{"name": "a", "$patch": "delete"}]}}
    assert [c["name"] for c in http("PATCH", f"{PODS}/p", delete, smp).json()["spec"]["containers"]] == ["b"]


def test_delete_collection(http: Http) -> None:
    for name, app in [("d1", "x"), ("d2", "x"), ("d3", "y")]:
        http("POST", PODS, pod(name, labels={"app": app}))
    assert http("DELETE", PODS, labelSelector="app=x").status_code == 200
    assert [p["metadata"]["name"] for p in http("GET", PODS).json()["items"]] == ["d3"]


def test_finalizers_hold_deletion(http: Http) -> None:
    http("POST", PODS, pod("f", finalizers=["example.com/hold"]))
    deleting = http("DELETE", f"{PODS}/f").json()
    assert deleting["metadata"]["deletionTimestamp"]
    assert http("GET", f"{PODS}/f").status_code == 200  # kept while the finalizer is there
    assert http("PATCH", f"{PODS}/f", {"metadata": {"finalizers": None}}, MERGE).status_code == 200
    assert http("GET", f"{PODS}/f").status_code == 404


def test_owner_reference_garbage_collection(http: Http) -> None:
    owner = http("POST", GJ, gpujob("owner")).json()
    ref = {"apiVersion": owner["apiVersion"], "kind": "GpuJob", "name": "owner", "uid": owner["metadata"]["uid"]}
    http("POST", PODS, pod("child", ownerReferences=[ref]))
    held = {"ownerReferences": [ref], "finalizers": ["example.com/hold"]}
    http("POST", PODS, pod("held-child", **held))
    grand = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "child",
        "uid": http("GET", f"{PODS}/child").json()["metadata"]["uid"],
    }
    http(
        "POST",
        "/api/v1/namespaces/default/configmaps",
        {"metadata": {"name": "grandchild", "ownerReferences": [grand]}},
    )
    http("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "orphan", "ownerReferences": [ref]}})

    http("DELETE", f"{GJ}/owner")
    assert http("GET", f"{PODS}/child").status_code == 404
    assert http("GET", "/api/v1/namespaces/default/configmaps/grandchild").status_code == 404  # cascades
    assert http("GET", "/api/v1/namespaces/default/configmaps/orphan").status_code == 404
    assert http("GET", f"{PODS}/held-child").json()["metadata"]["deletionTimestamp"]  # finalizer respected

    second = http("POST", GJ, gpujob("owner2")).json()
    ref2 = {**ref, "name": "owner2", "uid": second["metadata"]["uid"]}
    http("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "kept", "ownerReferences": [ref2]}})
    http("DELETE", f"{GJ}/owner2", {"propagationPolicy": "Orphan"})
    assert http("GET", "/api/v1/namespaces/default/configmaps/kept").json()["metadata"]["ownerReferences"] == []


def test_discovery_and_lists(http: Http) -> None:
    assert http("GET", "/api").json()["versions"] == ["v1"]
    core = http("GET", "/api/v1").json()
    assert core["groupVersion"] == "v1"
    assert {"pods", "pods/status", "events", "namespaces"} <= {r["name"] for r in core["resources"]}
    groups = {g["name"] for g in http("GET", "/apis").json()["groups"]}
    assert {
        GROUP,
        "apps",
        "coordination.k8s.io",
        "events.k8s.io",
        "apiextensions.k8s.io",
        "rbac.authorization.k8s.io",
    } <= groups
    ours = http("GET", f"/apis/{GROUP}/{VERSION}").json()["resources"]
    by_name = {r["name"]: r for r in ours}
    assert set(by_name) == {PLURAL, f"{PLURAL}/status", "gpuqueues", "gpuqueues/status"}
    assert by_name[PLURAL]["shortNames"] == ["gj"] and by_name["gpuqueues"]["namespaced"] is False
    http("POST", GJ, gpujob("l"))
    listed = http("GET", GJ).json()
    assert listed["kind"] == "GpuJobList" and listed["apiVersion"] == f"{GROUP}/{VERSION}"
    assert int(listed["metadata"]["resourceVersion"]) >= int(listed["items"][0]["metadata"]["resourceVersion"])
    page = http("GET", "/api/v1/namespaces", limit=2).json()
    assert len(page["items"]) == 2 and page["metadata"]["continue"]
    rest = http("GET", "/api/v1/namespaces", limit=10, **{"continue": page["metadata"]["continue"]}).json()
    assert len(rest["items"]) == 2 and "continue" not in rest["metadata"]


def test_crd_registration_and_removal(http: Http) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Cluster",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "properties": {"size": {"type": "integer", "maximum": 3}}}
                    },
                }
            ],
        },
    }
    assert http("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd).status_code == 201
    widgets = "/apis/example.com/v1/widgets"
    assert (
        http(
            "POST", widgets, {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "size": 2}
        ).status_code
        == 201
    )
    assert http("POST", widgets, {"metadata": {"name": "big"}, "size": 9}).status_code == 422
    assert "example.com" in {g["name"] for g in http("GET", "/apis").json()["groups"]}
    http("DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com")
    assert http("GET", widgets).status_code == 404
    assert "example.com" not in {g["name"] for g in http("GET", "/apis").json()["groups"]}


def test_builtins_the_operator_needs(k8s_api: Any) -> None:
    core = kubernetes.client.CoreV1Api(k8s_api)
    core.create_namespaced_event(
        "default", {"metadata": {"generateName": "e-"}, "involvedObject": {"name": "x"}, "reason": "R"}
    )
    kubernetes.client.EventsV1Api(k8s_api).create_namespaced_event(
        "default", {"metadata": {"name": "e2"}, "eventTime": NOW, "reason": "R"}
    )
    lease = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "me"}}
    kubernetes.client.CoordinationV1Api(k8s_api).create_namespaced_lease("default", lease)
    core.create_node({"metadata": {"name": "n1"}, "status": {"capacity": {"nvidia.com/gpu": "4"}}})
    core.patch_node_status("n1", {"status": {"allocatable": {"nvidia.com/gpu": "4"}}})
    assert core.read_node("n1").status.allocatable == {"nvidia.com/gpu": "4"}
    created = core.create_namespaced_pod("default", pod("p"))
    assert created.status.phase == "Pending"
    core.patch_namespaced_pod_status("p", "default", {"status": {"phase": "Running"}})
    assert core.read_namespaced_pod("p", "default").status.phase == "Running"
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_pod("nope", "default")
    assert missing.value.status == 404


def test_request_log_and_faults(emulator: Any, http: Http) -> None:
    emulator.reset_counts()
    http("POST", GJ, gpujob("counted"))
    http("GET", f"{GJ}/counted")
    http("GET", "/api/v1/pods")
    counts = {(k.verb, k.resource, k.namespaced): v for k, v in emulator.request_counts().items()}
    assert counts == {("create", PLURAL, True): 1, ("get", PLURAL, True): 1, ("list", "pods", False): 1}
    assert http("GET", "/_sandbox/requests").json()["total"] >= 3

    assert http("POST", "/_sandbox/faults", {"error_429_rate": 1.0, "retry_after_seconds": 7}).status_code == 200
    throttled = http("GET", f"{GJ}/counted")
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
    assert http("GET", "/api/v1").status_code == 200  # discovery is never faulted
    emulator.set_faults(error_429_rate=0.0, status_conflict_rate=1.0)
    assert http("PATCH", f"{GJ}/counted/status", {"status": {"phase": "Running"}}, MERGE).status_code == 409
    assert http("PATCH", f"{GJ}/counted", {"metadata": {"labels": {"a": "b"}}}, MERGE).status_code == 200


def test_openapi_documents(http: Http) -> None:
    root = http("GET", "/openapi/v3").json()["paths"]
    document = http("GET", root[f"apis/{GROUP}/{VERSION}"]["serverRelativeURL"]).json()
    schema = document["components"]["schemas"][f"dev.gpujob.{VERSION}.GpuJob"]
    assert schema["x-kubernetes-group-version-kind"] == [{"group": GROUP, "version": VERSION, "kind": "GpuJob"}]
    assert schema["properties"]["spec"]["properties"]["gpus"]["description"]
    assert "io.k8s.api.core.v1.Pod" in http("GET", "/openapi/v2").json()["definitions"]
