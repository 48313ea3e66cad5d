"""The emulator checked against the real control plane: the same request on both backends, the same answer.

Where they agreed only after a fix, the test is the regression guard. The gaps left on purpose (see
operator/gpujob/sandbox/EMULATOR.md) have a test each that shows the difference, so a change on either side is
noticed.
"""

from __future__ import annotations

import copy
import json
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpujob.sandbox.realcluster import HttpError, Rest
from tests.support.kubernetes import ApiTarget, restricted_container
from tests.support.operator import wait_for

CRD = Path(__file__).resolve().parents[2] / "crds" / "gpujob.yaml"


@pytest.fixture
def rest(api: ApiTarget) -> Rest:
    return Rest(api.kubeconfig)


def a_pod(name: str, **spec: Any) -> dict[str, Any]:
    container = restricted_container(["true"])
    # A nodeSelector no Node has: on the real control plane no node agent runs it.
    body = {"restartPolicy": "Never", "containers": [container], "nodeSelector": {"parity": "no-node"}, **spec}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": body}


def status_of(exc: HttpError) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(str(exc).split(": ", 1)[1]) if "{" in str(exc) else {}
    return result


def test_crd_schema_may_not_describe_metadata(rest: Rest) -> None:
    crd = copy.deepcopy(yaml.safe_load(CRD.read_text()))
    suffix = uuid.uuid4().hex[:8]
    crd["spec"]["group"] = f"parity{suffix}.test"
    crd["spec"]["names"] = {**crd["spec"]["names"], "shortNames": []}
    crd["metadata"] = {"name": f"gpujobs.parity{suffix}.test"}
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["metadata"] = {"type": "object", "description": "Standard object metadata."}
    with pytest.raises(HttpError) as refused:
        rest.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert refused.value.status == 422
    assert "must not specify anything other than name and generateName" in str(refused.value)


def test_label_values_longer_than_63_characters_are_refused(rest: Rest, api: ApiTarget) -> None:
    pod = a_pod("long-label")
    pod["metadata"]["labels"] = {"gpujob.dev/job-id": "x" * 64}
    with pytest.raises(HttpError) as refused:
        rest.request("POST", f"/api/v1/namespaces/{api.namespace}/pods", pod)
    assert refused.value.status == 422 and "must be no more than 63 bytes" in str(refused.value)


def test_eviction_marks_the_pod_disruption_target_before_deleting_it(rest: Rest, api: ApiTarget) -> None:
    name = f"evictee-{uuid.uuid4().hex[:6]}"
    rest.request("POST", f"/api/v1/namespaces/{api.namespace}/pods", a_pod(name))
    seen: list[dict[str, Any]] = []
    path = f"/api/v1/namespaces/{api.namespace}/pods?watch=true&fieldSelector=metadata.name%3D{name}&timeoutSeconds=30"
    headers = {"Authorization": f"Bearer {rest.token}"}
    response = urllib.request.urlopen(
        urllib.request.Request(rest.server + path, headers=headers), timeout=40, context=rest.context
    )

    def read() -> None:
        for line in response:
            event = json.loads(line)
            seen.append(event)
            if event["type"] == "DELETED":
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}}
    rest.request("POST", f"/api/v1/namespaces/{api.namespace}/pods/{name}/eviction", eviction)
    wait_for(lambda: any(e["type"] == "DELETED" for e in seen), 30 * api.slowdown, what="the evicted pod's DELETED")
    response.close()
    last = next(e["object"] for e in seen if e["type"] == "DELETED")
    conditions = {c["type"]: c for c in last["status"].get("conditions") or []}
    assert conditions["DisruptionTarget"]["status"] == "True"
    assert conditions["DisruptionTarget"]["reason"] == "EvictionByEvictionAPI"


def test_gap_deleting_a_bound_pod_is_graceful_only_on_the_real_control_plane(rest: Rest, api: ApiTarget) -> None:
    """A documented gap: the real apiserver marks a bound Pod terminating and waits for its kubelet; the emulator
    removes it at once (its kubelet stops the process on the DELETED event)."""
    name = f"bound-{uuid.uuid4().hex[:6]}"
    pod = a_pod(name, nodeName="parity-node-without-agent")
    del pod["spec"]["nodeSelector"]
    base = f"/api/v1/namespaces/{api.namespace}/pods"
    rest.request("POST", base, pod)
    rest.request("DELETE", f"{base}/{name}")
    after = rest.get(f"{base}/{name}")
    if api.backend == "kubernetes":
        assert after is not None and after["metadata"]["deletionTimestamp"]
        assert after["metadata"]["deletionGracePeriodSeconds"] == 30
        rest.request("DELETE", f"{base}/{name}", {"gracePeriodSeconds": 0})
    else:
        assert after is None
