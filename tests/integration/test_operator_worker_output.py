"""The real operator against each API backend, on what comes back from a job's Pod and what goes into it (issue 12
items 7, 15, 16, 18): a sidecar's status beside the worker's, a hostile termination message, params too large for
the worker's env, and the TTL delete of a job re-created under the same name. The test plays the kubelet."""

from __future__ import annotations

import json
import signal
import time

from gpujob.api.constants import MAX_METRICS, MAX_PARAMS_BYTES, Phase, Reason
from tests.support.operator import Cluster, OperatorProcess

SHA = "ab" * 32


def finish_pod(cluster: Cluster, pod_name: str, phase: str, containers: list[tuple[str, int, str]]) -> None:
    """Write a finished Pod's status as a kubelet would, with one terminated status per (container, exit
    code, termination message), in the kubelet's order (sorted by name)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    statuses = [
        {
            "name": name,
            "ready": False,
            "restartCount": 0,
            "image": "x",
            "imageID": "",
            "state": {
                "terminated": {
                    "exitCode": code,
                    "reason": "Completed" if code == 0 else "Error",
                    "message": message,
                    "startedAt": now,
                    "finishedAt": now,
                }
            },
        }
        for name, code, message in sorted(containers)
    ]
    cluster.core.patch_namespaced_pod_status(
        pod_name, cluster.namespace, {"status": {"phase": phase, "containerStatuses": statuses}}
    )


def test_an_injected_sidecars_exit_code_never_replaces_the_workers(operator: OperatorProcess, cluster: Cluster) -> None:
    """Item 7: the kubelet lists container statuses sorted by name; a sidecar after `worker` (or before it) that
    failed made the job fail with the sidecar's exit code, though the worker succeeded."""
    cluster.create_job("sidecar", {"type": "render_video", "gpus": 0, "retries": {"limit": 0}})
    pod = cluster.wait_pod("sidecar", 1)
    cluster.set_pod(pod.metadata.name, "Running")
    cluster.wait_phase("sidecar", Phase.RUNNING)
    result = {"artifacts": [{"key": "videos/sidecar/out.mp4", "size": 7, "sha256": SHA}]}
    containers = [("worker", 0, json.dumps(result)), ("zz-log-shipper", 2, "shipper: lost its upstream")]
    finish_pod(cluster, pod.metadata.name, "Failed", [*containers, ("envoy", 137, "proxy killed")])
    status = cluster.wait_phase("sidecar", Phase.SUCCEEDED)
    assert status["exitCode"] == 0 and status["failures"] == 0 and status["artifacts"] == result["artifacts"]


def test_a_hostile_termination_message_never_blocks_the_status(operator: OperatorProcess, cluster: Cluster) -> None:
    """Item 15: 200 metrics (the schema allows 64), NaN/Infinity and a size beyond int64 made every status write
    fail (422, or JSON the API server cannot read): the job stayed Running after its Pod had succeeded."""
    cluster.create_job("hostile", {"type": "train_lora", "gpus": 0})
    pod = cluster.wait_pod("hostile", 1)
    cluster.set_pod(pod.metadata.name, "Running")
    cluster.wait_phase("hostile", Phase.RUNNING)
    metrics = ", ".join(f'"m{i:03d}": {i}' for i in range(200))
    message = (
        '{"metrics": {"loss": NaN, "gain": Infinity, ' + metrics + "}, "
        '"artifacts": [{"key": "loras/hostile/a", "size": 18446744073709551616, "sha256": "' + SHA + '"}, '
        '{"key": "loras/hostile/ok", "size": 1, "sha256": "' + SHA + '"}]}'
    )
    finish_pod(cluster, pod.metadata.name, "Succeeded", [("worker", 0, message)])
    status = cluster.wait_phase("hostile", Phase.SUCCEEDED)
    assert [a["key"] for a in status["artifacts"]] == ["loras/hostile/ok"]
    assert len(status["metrics"]) == MAX_METRICS and "loss" not in status["metrics"]


def test_params_too_large_for_the_env_fail_the_job_before_any_pod(operator: OperatorProcess, cluster: Cluster) -> None:
    """Item 16: GPUJOB_JOB_PARAMS over Linux's per-string limit (128 KiB) and the container cannot start; a
    GpuJob applied with params over MAX_PARAMS_BYTES fails at once with InvalidSpec and never gets a Pod."""
    cluster.create_job("fat-params", {"type": "custom", "params": {"blob": "x" * (MAX_PARAMS_BYTES + 1)}})
    cluster.create_job("fine-params", {"type": "custom", "params": {"blob": "x" * (MAX_PARAMS_BYTES - 100)}})
    cluster.wait_pod("fine-params", 1)
    status = cluster.wait_phase("fat-params", Phase.FAILED)
    assert status["reason"] == Reason.INVALID_SPEC and str(MAX_PARAMS_BYTES) in status["message"]
    assert status["attempts"] == 0 and not cluster.pods("fat-params")


def test_the_ttl_delete_never_deletes_a_gpujob_recreated_under_the_same_name(
    operator: OperatorProcess, cluster: Cluster
) -> None:
    """Item 18: the TTL delete carries the finished job's uid as a precondition. The operator is paused (SIGSTOP)
    between the old job's finish and its TTL; meanwhile the job is deleted and created again under its name. On
    resume its TTL timer fires before the watch events are handled: without the precondition it deleted the
    new job."""
    ttl = 3
    cluster.create_job("reborn", {"type": "train_lora", "ttlSecondsAfterFinished": ttl})
    cluster.run_pod("reborn", 1)
    cluster.wait_phase("reborn", Phase.SUCCEEDED)
    old_uid = cluster.job("reborn")["metadata"]["uid"]
    paused = time.monotonic()
    assert operator.proc is not None
    operator.proc.send_signal(signal.SIGSTOP)
    try:
        cluster.delete_job("reborn")
        cluster.wait_until(lambda: cluster.job("reborn") is None, what="the old job to be gone")
        new_uid = cluster.create_job("reborn", {"type": "train_lora"})["metadata"]["uid"]
        assert new_uid != old_uid
        time.sleep(max(0.0, paused + ttl + 1 - time.monotonic()))  # the operator is stopped: its TTL is due
    finally:
        operator.proc.send_signal(signal.SIGCONT)
    cluster.wait_until(
        lambda: any(p.metadata.owner_references[0].uid == new_uid for p in cluster.pods("reborn")),
        timeout=30,
        what="the new job's Pod",
    )
    status = cluster.wait_phase("reborn", cluster.resting_phase)
    job = cluster.job("reborn")
    assert job is not None and job["metadata"]["uid"] == new_uid and status["attempts"] == 1
