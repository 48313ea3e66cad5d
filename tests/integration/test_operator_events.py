"""What a user sees with kubectl on a real control plane (issue 13 items 5 and 7): the operator's Events in
`kubectl describe gj` and `kubectl get events`, aggregated into series; the phase of a job whose Pod the real
scheduler cannot place; whole-percent progress from the start; `cancel: true` final by the CRD's CEL rule; a spec
change under a waiting attempt explained. Each runs the real kubectl binary against the real kube-apiserver."""

from __future__ import annotations

import pytest
from kubernetes import client

from gpujob.api.constants import GROUP, PLURAL, VERSION, Phase, Reason
from gpujob.sandbox.realcluster import run_kubectl
from tests.support.kubernetes import ApiTarget
from tests.support.operator import Cluster, OperatorProcess

pytestmark = pytest.mark.backends("kubernetes")
FAST_RETRY = {"limit": 2, "backoffSeconds": 1, "maxBackoffSeconds": 1}


def kubectl(api: ApiTarget, *args: str) -> str:
    result = run_kubectl(api.kubeconfig, "--namespace", api.namespace, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def describe_once(api: ApiTarget, cluster: Cluster, name: str, needle: str, what: str) -> str:
    """`kubectl describe gj <name>` once its Events section holds `needle` (Events are posted asynchronously)."""

    def seen() -> str | None:
        out = kubectl(api, "describe", "gj", name)
        return out if needle in out.split("Events:")[-1] else None

    described: str = cluster.wait_until(seen, what=what)
    return described


def test_unschedulable_job_is_pending_and_describe_says_why(
    api: ApiTarget, operator: OperatorProcess, cluster: Cluster
) -> None:
    # The test's jobs carry a nodeSelector no Node has: the real scheduler marks the Pod PodScheduled=False.
    cluster.create_job("stuck", {"type": "custom", "gpus": 1, "image": "img:1"})
    status = cluster.wait_phase("stuck", Phase.PENDING)
    assert status["reason"] == Reason.UNSCHEDULABLE and "nodes are available" in status["message"], status
    [row] = kubectl(api, "get", "gj", "stuck", "--no-headers").splitlines()
    assert row.split()[:6] == ["stuck", "custom", "Pending", "0", "1", "1"], row  # progress 0 from the start
    described = describe_once(api, cluster, "stuck", "Waiting", "the operator's Events in kubectl describe")
    assert "AttemptStarted" in described and "attempt 1: created Pod stuck-" in described, described
    assert "Unschedulable: 0/2 nodes are available" in described, described
    # A spec change while it waits: said, not silently ignored.
    cluster.patch_spec("stuck", {"image": "img:2"})
    described = describe_once(api, cluster, "stuck", "SpecChanged", "the SpecChanged Event")
    assert "applies to the next attempt" in " ".join(described.split()), described
    # kubectl get events lists them, reported by the operator (events.k8s.io/v1 fields).
    listed = kubectl(api, "get", "events", "--field-selector", "involvedObject.name=stuck")
    assert "AttemptStarted" in listed and "Waiting" in listed and "SpecChanged" in listed, listed
    events = client.EventsV1Api(cluster.custom.api_client).list_namespaced_event(api.namespace).items
    ours = [e for e in events if e.regarding.kind == "GpuJob" and e.regarding.name == "stuck"]
    assert ours and {e.reporting_controller for e in ours} == {"gpujob.dev/operator"}
    assert all(e.reporting_instance and e.regarding.uid == cluster.job("stuck")["metadata"]["uid"] for e in ours)


def test_progress_column_is_whole_percent(api: ApiTarget, operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("third", {"type": "custom", "gpus": 0, "image": "img:1"})
    cluster.wait_until(lambda: cluster.status("third").get("progress"), what="progress in status")
    cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, api.namespace, PLURAL, "third", {"status": {"progress": {"percent": 33.3333333333}}}
    )
    [row] = kubectl(api, "get", "gj", "third", "--no-headers").splitlines()
    assert row.split()[3] == "33", row


def test_retry_failure_and_success_are_events_with_reasons(
    api: ApiTarget, operator: OperatorProcess, cluster: Cluster
) -> None:
    cluster.create_job("flaky", {"type": "custom", "gpus": 0, "image": "img:1", "retries": FAST_RETRY})
    cluster.run_pod("flaky", 1, exit_code=1)
    cluster.run_pod("flaky", 2, exit_code=0)
    cluster.wait_phase("flaky", Phase.SUCCEEDED)
    described = describe_once(api, cluster, "flaky", "Succeeded", "the Succeeded Event")
    events = " ".join(described.split("Events:")[-1].split())
    assert "Retrying" in events and "Error: attempt 1 failed with exit code 1; attempt 2 in 1s" in events, events
    assert "attempt 2: created Pod flaky-" in events and "(retrying after 1 failed attempt(s))" in events, events
    assert "attempt 2 succeeded" in events, events


def test_repeated_events_are_one_series(api: ApiTarget, operator: OperatorProcess, cluster: Cluster) -> None:
    """Suspend, resume, suspend: the second Suspended Event bumps the first one's series.count (x2 in
    kubectl describe), as the core controllers' recorder does."""
    cluster.create_job("pausable", {"type": "custom", "gpus": 0, "image": "img:1"})
    cluster.wait_pod("pausable", 1)
    for suspend in (True, False, True):
        cluster.patch_spec("pausable", {"suspend": suspend})
        cluster.wait_phase("pausable", Phase.SUSPENDED if suspend else Phase.PENDING)
    described = describe_once(api, cluster, "pausable", "(x2 over", "a series of two Suspended Events")
    [line] = [line for line in described.splitlines() if "Suspended" in line and "(x2 over" in line]
    assert "spec.suspend is true: Pod deleted" in line, described
    events = client.EventsV1Api(cluster.custom.api_client).list_namespaced_event(api.namespace).items
    suspended = [e for e in events if e.regarding.name == "pausable" and e.reason == "Suspended"]
    assert [e.series.count for e in suspended] == [2]


def test_cancel_is_final(api: ApiTarget, operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("final", {"type": "custom", "gpus": 0, "image": "img:1"})
    cluster.patch_spec("final", {"cancel": True})
    cluster.wait_phase("final", Phase.CANCELLED)
    with pytest.raises(client.ApiException) as refused:
        cluster.patch_spec("final", {"cancel": False})
    assert refused.value.status == 422 and "cancel is final" in str(refused.value.body)
    result = run_kubectl(
        api.kubeconfig, "-n", api.namespace, "patch", "gj", "final", "--type", "merge", "-p", '{"spec":{"cancel":null}}'
    )
    assert result.returncode != 0 and "cancel is final" in result.stderr, result  # removing it re-defaults false
    assert cluster.job("final")["spec"]["cancel"] is True
