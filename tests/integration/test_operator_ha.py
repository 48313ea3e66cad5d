"""Two operator replicas under kopf peering (issue 12 item 10): the paused one writes nothing, its own timers
included, and on resume passes every job again. The test plays the kubelet (its Pods stay Pending)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from gpujob.api.constants import Phase, Reason
from gpujob.operator.handlers import peering_priority
from tests.support.operator import Cluster, wait_for

PEERING_CRDS = Path(__file__).resolve().parents[2] / "charts" / "gpujob-operator" / "crds" / "kopf-peering.yaml"
PEERING = "gpujob-ha"
ACTIVE, STANDBY = "replica-b0", "replica-a"  # pod names: the first has the higher peering priority


def install_peering(cluster: Cluster) -> None:
    extensions = client.ApiextensionsV1Api(cluster.core.api_client)
    for crd in yaml.safe_load_all(PEERING_CRDS.read_text()):
        if crd:
            try:
                extensions.create_custom_resource_definition(crd)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
    body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}
    try:
        cluster.custom.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise


# The real control plane's test operator is namespaced (KopfPeering) and logs in with the chart's cluster-mode
# RBAC, which grants the ClusterKopfPeering of the release only: peering is kopf's, the same on both backends.
@pytest.mark.backends("emulator")
def test_a_paused_replica_writes_nothing_its_timers_included_and_passes_every_job_on_resume(
    operator_factory: Any, cluster: Cluster
) -> None:
    assert peering_priority(ACTIVE) > peering_priority(STANDBY)
    install_peering(cluster)
    args = ("--peering", PEERING)
    standby = operator_factory(extra_env={"POD_ID": STANDBY}, args=args)
    pending = 30  # the job's pendingTimeoutSeconds: a timer of the first replica that comes due while it pauses
    cluster.create_job("ha", {"type": "train_lora", "pendingTimeoutSeconds": pending, "retries": {"limit": 1}})
    pod = cluster.wait_pod("ha", 1).metadata.name
    due = time.time() + pending
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no GPU"}
    cluster.core.patch_namespaced_pod_status(pod, cluster.namespace, {"status": {"conditions": [unschedulable]}})
    cluster.wait_phase("ha", Phase.PENDING)  # seen by the first replica: its pending-timeout timer is set

    active = operator_factory(extra_env={"POD_ID": ACTIVE}, args=args)  # a higher priority: the first pauses
    wait_for(lambda: "paused by peering" in standby.logs(), what="the first replica to pause")
    assert active.proc is not None
    active.proc.send_signal(signal.SIGSTOP)  # alive in the peering (its heartbeat fresh), doing nothing
    try:
        assert time.time() < due, "the second replica started too late for this test"
        wait_for(lambda: time.time() > due + 1, timeout=pending + 5, what="the pending timeout to come due")
        wait_for(
            lambda: (
                "pass deferred until resumed" in standby.logs().split("paused by peering", 1)[1]
                or cluster.status("ha").get("phase") != Phase.PENDING
            ),
            what="the paused replica's timer to fire (and be deferred)",
        )
        # The timer fired on a paused replica: nothing written (it used to fail the attempt and delete its Pod).
        status = cluster.status("ha")
        assert status["phase"] == Phase.PENDING and status.get("failures", 0) == 0
        assert [p.metadata.name for p in cluster.pods("ha")] == [pod]
    finally:
        active.proc.send_signal(signal.SIGKILL)
        active.proc.send_signal(signal.SIGCONT)
    # kopf drops a dead peer once its lifetime is over; here at once, as its cleanup would.
    dead = f"{ACTIVE}/{active.proc.pid}"
    cluster.custom.patch_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", PEERING, {"status": {dead: None}}
    )
    wait_for(lambda: "resumed by peering" in standby.logs(), what="the first replica to resume")
    retrying = cluster.wait_phase("ha", Phase.RETRYING, timeout=30)  # every job passed again: its timeout acted
    assert retrying["reason"] == Reason.UNSCHEDULABLE and "pendingTimeoutSeconds" in retrying["message"]
    assert retrying["failures"] == 1
