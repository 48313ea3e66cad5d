"""Evictions by kind (issue 12 item 5): the kubelet's storage-limit eviction is the job's own failure; its
admission refusals (UnexpectedAdmissionError, OutOf<resource>) and the node's pressure are not."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from gpujob.api.constants import ConditionType, Label, Phase, Reason
from gpujob.operator.conventions import iso
from gpujob.operator.podview import (
    PodView,
    pod_view,
    rejected_by_node,
    stopped_by_disruption,
    storage_limit_exceeded,
)
from tests.unit.test_status import T0, job, pod, step

# The kubelet eviction manager's messages for a Pod over its own limits (no DisruptionTarget condition).
STORAGE_MESSAGES = [
    'Usage of EmptyDir volume "scratch" exceeds the limit "1Gi". ',
    "Pod ephemeral local storage usage exceeds the total limit of containers 8Gi. ",
    'Container worker exceeded its local ephemeral storage limit "4Gi". ',
]


def _kubelet_pod(status: dict[str, Any], exit_code: int | None = 137) -> PodView:
    """A Pod as the API server returns it after the kubelet ended it (evicted: SIGKILL, exit 137)."""
    meta = {"name": "j-1", "labels": {Label.ATTEMPT: "1"}, "creationTimestamp": iso(T0)}
    container: dict[str, Any] = {"name": "worker", "state": {"waiting": {"reason": "ContainerCreating"}}}
    if exit_code is not None:
        container["state"] = {"terminated": {"exitCode": exit_code, "reason": "Error"}}
    return pod_view(
        {
            "metadata": meta,
            "spec": {"nodeName": "gpu-1"},
            "status": {"phase": "Failed", "containerStatuses": [container], **status},
        }
    )


@pytest.mark.parametrize("message", STORAGE_MESSAGES, ids=["emptydir", "pod-total", "container"])
def test_eviction_for_the_jobs_own_storage_limit_is_counted_with_backoff(message: str) -> None:
    body = job({"retries": {"limit": 2, "backoffSeconds": 10}})
    step(body, [])
    step(body, [pod(1, "Running", node_name="gpu-1")])
    evicted = _kubelet_pod({"reason": "Evicted", "message": message})
    assert storage_limit_exceeded(evicted)
    d = step(body, [evicted], T0 + timedelta(seconds=5))
    assert d.status.phase is Phase.RETRYING and d.create_attempt is None
    assert d.status.failures == 1 and d.status.reason == Reason.EPHEMERAL_STORAGE_EXCEEDED
    assert message.strip() in (d.status.message or "") and d.requeue_after == 10


def test_storage_evictions_end_in_failed_never_an_endless_loop() -> None:
    body = job({"retries": {"limit": 2, "backoffSeconds": 1, "maxBackoffSeconds": 1}})
    now = T0
    step(body, [], now)
    for attempt in (1, 2, 3):
        evicted = _kubelet_pod({"reason": "Evicted", "message": STORAGE_MESSAGES[1]})
        evicted = PodView(**{**evicted.__dict__, "name": f"j-{attempt}", "attempt": attempt})
        now += timedelta(seconds=5)
        d = step(body, [evicted], now)
        if attempt < 3:
            now += timedelta(seconds=5)
            assert step(body, [evicted], now).create_attempt == attempt + 1
    assert d.status.phase is Phase.FAILED and d.status.failures == 3
    assert d.status.reason == Reason.EPHEMERAL_STORAGE_EXCEEDED


def test_a_storage_eviction_is_not_a_success_though_the_worker_exits_0_on_sigterm() -> None:
    body = job({"retries": {"limit": 0}})
    step(body, [])
    d = step(body, [_kubelet_pod({"reason": "Evicted", "message": STORAGE_MESSAGES[2]}, exit_code=0)])
    assert d.status.phase is Phase.FAILED and d.status.reason == Reason.EPHEMERAL_STORAGE_EXCEEDED


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        (
            "UnexpectedAdmissionError",
            "Allocate failed due to no healthy devices present; cannot allocate unhealthy "
            "devices nvidia.com/gpu, which is unexpected",
        ),
        (
            "OutOfnvidia.com/gpu",
            "Pod was rejected: Node didn't have enough resource: nvidia.com/gpu, requested: 1, used: 4, capacity: 4",
        ),
        (
            "OutOfcpu",
            "Pod was rejected: Node didn't have enough resource: cpu, requested: 8000, used: 60000, capacity: 64000",
        ),
    ],
    ids=["unexpected-admission", "out-of-gpu", "out-of-cpu"],
)
def test_a_pod_the_kubelet_refuses_to_admit_is_the_nodes_doing_with_its_message_kept(reason: str, message: str) -> None:
    body = job({"retries": {"limit": 0, "backoffSeconds": 60}})
    step(body, [])
    rejected = _kubelet_pod({"reason": reason, "message": message}, exit_code=None)
    assert rejected_by_node(rejected) and not storage_limit_exceeded(rejected)
    d = step(body, [rejected], T0 + timedelta(seconds=2))
    assert d.create_attempt == 2 and d.status.failures == 0 and d.status.phase is Phase.SCHEDULED
    assert d.status.reason == Reason.NODE_REJECTED and d.requeue_after is None
    assert reason in (d.status.message or "") and message in (d.status.message or "")
    assert "gpu-1" in (d.status.message or "")
    [running] = [c for c in d.status.conditions if c.type == ConditionType.RUNNING]
    assert (running.status, running.reason) == ("False", Reason.NODE_REJECTED) and message in running.message
    assert d.delete_pods == ["j-1"]


def test_an_eviction_for_the_nodes_own_pressure_is_still_not_counted() -> None:
    """Node-pressure eviction of the same resource: the node ran low, the kubelet marks it DisruptionTarget."""
    body = job({"retries": {"limit": 0}})
    step(body, [])
    message = (
        "The node was low on resource: ephemeral-storage. Threshold quantity: 10Gi, available: 9Gi. "
        "Container worker was using 20Gi, request is 0, has larger consumption of ephemeral-storage. "
    )
    disruption = [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}]
    evicted = _kubelet_pod({"reason": "Evicted", "message": message, "conditions": disruption})
    assert not storage_limit_exceeded(evicted)
    d = step(body, [evicted])
    assert d.create_attempt == 2 and d.status.failures == 0 and d.status.reason == Reason.EVICTED


def _drained_pod(finished: timedelta, marked: timedelta | None, deleting: bool = True) -> PodView:
    """A Pod whose worker exited 0, as a real kubelet reports it (phase Succeeded: every container exited 0, even
    when the Pod was being deleted), with the Eviction API's DisruptionTarget mark at T0 + `marked`."""
    meta: dict[str, Any] = {"name": "j-1", "labels": {Label.ATTEMPT: "1"}, "creationTimestamp": iso(T0)}
    if deleting:
        meta["deletionTimestamp"] = iso(T0 + timedelta(seconds=60))
    term = {"exitCode": 0, "reason": "Completed", "finishedAt": iso(T0 + finished)}
    conditions = []
    if marked is not None:
        conditions.append(
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "lastTransitionTime": iso(T0 + marked),
            }
        )
    return pod_view(
        {
            "metadata": meta,
            "spec": {"nodeName": "gpu-1"},
            "status": {
                "phase": "Succeeded",
                "conditions": conditions,
                "containerStatuses": [{"name": "worker", "state": {"terminated": term}}],
            },
        }
    )


@pytest.mark.parametrize("after", [0, 3], ids=["same-second", "after"])
def test_a_worker_that_exits_0_when_drained_is_not_the_jobs_success(after: int) -> None:
    """Item 5: a custom image that exits 0 on SIGTERM. Its Pod ends Succeeded with DisruptionTarget; the work was
    cut short, so a new attempt starts, uncounted, even with retries.limit 0."""
    body = job({"retries": {"limit": 0}})
    step(body, [])
    drained = _drained_pod(finished=timedelta(seconds=10 + after), marked=timedelta(seconds=10))
    assert stopped_by_disruption(drained)
    d = step(body, [drained], T0 + timedelta(seconds=12 + after))
    assert d.create_attempt == 2 and d.status.failures == 0 and d.status.phase is not Phase.SUCCEEDED
    assert d.status.reason == Reason.EVICTED and "EvictionByEvictionAPI" in (d.status.message or "")
    assert d.delete_pods == []  # already being deleted by the eviction


def test_a_pod_evicted_after_its_worker_finished_did_succeed() -> None:
    """The mark came after the worker's exit (a drain reaching a completed Pod): the job's success stands."""
    body = job({"retries": {"limit": 0}})
    step(body, [])
    done = _drained_pod(finished=timedelta(seconds=10), marked=timedelta(seconds=11))
    assert not stopped_by_disruption(done)
    d = step(body, [done], T0 + timedelta(seconds=12))
    assert d.status.phase is Phase.SUCCEEDED and d.create_attempt is None
    no_mark = _drained_pod(finished=timedelta(seconds=10), marked=None, deleting=False)
    assert not stopped_by_disruption(no_mark)
