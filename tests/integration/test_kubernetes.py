"""The real control plane and the node agents: the binaries are the ones built from Go modules, the nodes are
registered and kept Ready, kube-scheduler binds and the node agent runs Pods as a kubelet reports them
(logs through the apiserver, graceful deletion, eviction with DisruptionTarget, a lost node)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from gpujob.sandbox.controlplane import KUBERNETES_VERSION
from gpujob.sandbox.realcluster import Rest, node_ready, run_kubectl
from tests.support.kubernetes import KubeSession, restricted_container
from tests.support.operator import wait_for

GPU = "nvidia.com/gpu"


@pytest.fixture
def ns(kube_session: KubeSession, kube_namespace: str) -> str:
    return kube_namespace


@pytest.fixture
def rest(kube_session: KubeSession) -> Rest:
    return kube_session.sandbox.rest()


def kubectl(session: KubeSession, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = run_kubectl(session.sandbox.kubeconfig, *args, timeout=timeout)
    assert proc.returncode == 0, f"kubectl {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}"
    return proc


def pod(name: str, script: str, *, gpus: int = 0, grace: int = 30, node: str | None = None) -> dict[str, Any]:
    """A Pod that passes the restricted Pod Security profile; its command runs as a local process."""
    container = restricted_container(["/bin/sh", "-c", script])
    if gpus:
        container["resources"] = {"limits": {GPU: str(gpus)}}
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace,
        "automountServiceAccountToken": False,
        "containers": [container],
    }
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def get_pod(rest: Rest, ns: str, name: str) -> dict[str, Any] | None:
    return rest.get(f"/api/v1/namespaces/{ns}/pods/{name}")


def phase(rest: Rest, ns: str, name: str) -> str | None:
    return ((get_pod(rest, ns, name) or {}).get("status") or {}).get("phase")


class PodWatch:
    """Every version of one Pod the API served, from a watch started before the action under test."""

    def __init__(self, session: KubeSession, ns: str, name: str) -> None:
        rest = session.sandbox.rest()
        path = f"/api/v1/namespaces/{ns}/pods?watch=true&fieldSelector=metadata.name%3D{name}&timeoutSeconds=120"
        request = urllib.request.Request(rest.server + path, headers={"Authorization": f"Bearer {rest.token}"})
        self.response = urllib.request.urlopen(request, timeout=130, context=rest.context)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # closed by stop()
            for line in self.response:
                event = json.loads(line)
                self.events.append((event["type"], event["object"]))
                if event["type"] == "DELETED":
                    return  # the Pod's last version: stop() need not wait for the server to end the watch

    def stop(self) -> None:
        self.response.close()


@pytest.fixture
def watches() -> Iterator[list[PodWatch]]:
    started: list[PodWatch] = []
    yield started
    for watch in started:
        watch.stop()


def test_binaries_are_the_official_release_built_here(kube_session: KubeSession) -> None:
    version = json.loads(kubectl(kube_session, "version", "-o", "json").stdout)["serverVersion"]
    assert version["gitVersion"] == KUBERNETES_VERSION
    assert version["major"] == "1" and version["minor"] == KUBERNETES_VERSION.split(".")[1]


def test_nodes_are_registered_ready_with_gpus_and_loopback_only(kube_session: KubeSession, rest: Rest) -> None:
    nodes = {n["metadata"]["name"]: n for n in (rest.get("/api/v1/nodes") or {})["items"]}
    assert set(nodes) == set(kube_session.sandbox.node_names())
    for node in nodes.values():
        assert node_ready(node), node["status"]["conditions"]
        assert node["status"]["allocatable"][GPU] == "2"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"]
        assert [a for a in node["status"]["addresses"] if a["type"] == "InternalIP"] == [
            {"type": "InternalIP", "address": "127.0.0.1"}
        ]
        lease = rest.get(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node['metadata']['name']}")
        assert lease is not None and lease["spec"]["holderIdentity"] == node["metadata"]["name"]


def test_scheduler_binds_and_the_node_agent_runs_the_pod_and_serves_its_logs(
    kube_session: KubeSession, rest: Rest, ns: str
) -> None:
    rest.request(
        "POST", f"/api/v1/namespaces/{ns}/pods", pod("hello", "echo hello from $HOSTNAME; echo line-2", gpus=1)
    )
    wait_for(lambda: phase(rest, ns, "hello") == "Succeeded", 60, what="the pod to succeed")
    done = get_pod(rest, ns, "hello") or {}
    assert done["spec"]["nodeName"] in kube_session.sandbox.node_names()
    [status] = done["status"]["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 0 and status["state"]["terminated"]["reason"] == "Completed"
    assert set(status["state"]) == {"terminated"}
    logs = kubectl(kube_session, "logs", "-n", ns, "hello").stdout
    assert logs == "hello from hello\nline-2\n"


def test_kubectl_logs_follow_streams_until_the_container_ends(kube_session: KubeSession, rest: Rest, ns: str) -> None:
    script = "for i in 1 2 3 4 5; do echo tick-$i; sleep 0.4; done"
    rest.request("POST", f"/api/v1/namespaces/{ns}/pods", pod("ticker", script))
    wait_for(lambda: phase(rest, ns, "ticker") == "Running", 60, what="the pod to run")
    follow = kubectl(kube_session, "logs", "-f", "-n", ns, "ticker", timeout=60).stdout
    assert follow.split() == [f"tick-{i}" for i in range(1, 6)]


def test_unschedulable_gpu_request_stays_pending_with_the_schedulers_reason(rest: Rest, ns: str) -> None:
    rest.request("POST", f"/api/v1/namespaces/{ns}/pods", pod("too-big", "true", gpus=8))

    def unschedulable() -> Any:
        conditions = ((get_pod(rest, ns, "too-big") or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "PodScheduled" and c["status"] == "False"), None)

    condition = wait_for(unschedulable, 60, what="PodScheduled=False")
    assert condition["reason"] == "Unschedulable" and GPU in condition["message"]


@pytest.mark.parametrize(("exit_code", "ended"), [(143, "Failed"), (0, "Succeeded")], ids=["killed", "exits-0"])
def test_an_evicted_pod_ends_with_disruption_target_before_it_is_removed(
    kube_session: KubeSession, rest: Rest, ns: str, watches: list[PodWatch], exit_code: int, ended: str
) -> None:
    """The process gets SIGTERM and its grace period. As a real kubelet's getPhase (pkg/kubelet/kubelet_pods.go):
    a Pod being deleted whose containers all exit 0 is Succeeded, not Failed, DisruptionTarget or not (the
    operator must not read that as the job's success: it ended at or after the mark)."""
    script = f"trap 'echo got TERM; exit {exit_code}' TERM; echo started; while true; do sleep 0.1; done"
    rest.request("POST", f"/api/v1/namespaces/{ns}/pods", pod("victim", script, grace=20))
    wait_for(lambda: phase(rest, ns, "victim") == "Running", 60, what="the pod to run")
    watch = PodWatch(kube_session, ns, "victim")
    watches.append(watch)
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "victim", "namespace": ns}}
    rest.request("POST", f"/api/v1/namespaces/{ns}/pods/victim/eviction", eviction)
    wait_for(lambda: get_pod(rest, ns, "victim") is None, 60, what="the evicted pod to be removed")
    wait_for(lambda: any(t == "DELETED" for t, _ in watch.events), 10, what="the DELETED event")
    last = next(obj for t, obj in watch.events if t == "DELETED")
    conditions = {c["type"]: c for c in last["status"].get("conditions") or []}
    assert last["status"]["phase"] == ended
    assert conditions["DisruptionTarget"]["status"] == "True"
    assert conditions["DisruptionTarget"]["reason"] == "EvictionByEvictionAPI"
    [status] = last["status"]["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == exit_code
    assert status["state"]["terminated"]["finishedAt"] >= conditions["DisruptionTarget"]["lastTransitionTime"]


def test_a_lost_node_goes_not_ready_and_its_pods_are_evicted(kube_session: KubeSession, rest: Rest, ns: str) -> None:
    sandbox = kube_session.sandbox
    agent = sandbox.agents[-1]
    rest.request("POST", f"/api/v1/namespaces/{ns}/pods", pod("stranded", "sleep 600", node=agent.name))
    wait_for(lambda: phase(rest, ns, "stranded") == "Running", 60, what="the pod to run")
    agent.kill()
    try:

        def node_not_ready() -> bool:
            return not node_ready(rest.get(f"/api/v1/nodes/{agent.name}") or {})

        wait_for(node_not_ready, 90, 0.5, what="the node-lifecycle controller to mark the node NotReady")

        def evicted() -> Any:
            found = get_pod(rest, ns, "stranded") or {}
            return found.get("metadata", {}).get("deletionTimestamp") and found

        stranded = wait_for(evicted, 90, 0.5, what="taint-based eviction of the pod")
        conditions = {c["type"]: c for c in stranded["status"].get("conditions") or []}
        assert conditions["DisruptionTarget"]["reason"] == "DeletionByTaintManager"
    finally:
        agent.start()  # the node comes back: the agent finishes the deletion it missed
        sandbox.wait_nodes_ready(90)
    wait_for(lambda: get_pod(rest, ns, "stranded") is None, 60, what="the stranded pod to be removed")
