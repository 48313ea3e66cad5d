"""The real operator process against each API backend (the emulator, a real control plane) over HTTP; Pods
driven through their phases as a kubelet would (status subresource writes)."""

from __future__ import annotations

import json
from typing import Any

from gpujob.api.constants import Label, Phase, Reason
from tests.support.logs import records
from tests.support.operator import Cluster, OperatorProcess, wait_for

FAST_RETRY = {"limit": 2, "backoffSeconds": 1, "maxBackoffSeconds": 1}


def test_gpujob_becomes_gpu_pod_with_spec(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("lora", {"type": "train_lora", "gpus": 2, "params": {"epochs": 2}, "gpuProduct": "NVIDIA-L4"})
    pod = cluster.wait_pod("lora", 1)
    [c] = pod.spec.containers
    assert c.resources.limits == {"nvidia.com/gpu": "2"}
    assert c.image == "registry.test/gpujob-worker:test"
    assert cluster.without_pen(pod.spec.node_selector) == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert pod.spec.restart_policy == "Never" and pod.spec.automount_service_account_token is False
    assert pod.metadata.labels[Label.JOB_ID] == "lora" and pod.metadata.labels[Label.TYPE] == "train_lora"
    [owner] = pod.metadata.owner_references
    assert owner.kind == "GpuJob" and owner.controller is True and owner.uid == cluster.job("lora")["metadata"]["uid"]
    env = {e.name: e.value for e in c.env}
    assert json.loads(env["GPUJOB_JOB_PARAMS"])["epochs"] == 2 and env["GPUJOB_ATTEMPT"] == "1"
    status = cluster.wait_phase("lora", cluster.resting_phase)
    assert status["attempts"] == 1 and status["podName"] == pod.metadata.name


def test_any_valid_gpujob_name_gives_a_valid_pod(operator: OperatorProcess, cluster: Cluster) -> None:
    # 253 characters with dots (a DNS subdomain), cut so that the Pod name would end a segment in '.'.
    name = ("a" * 50 + ".") + "b" * 60 + "." + "c" * (253 - 112)
    cluster.create_job(name, {"type": "train_lora"})
    pod = cluster.wait_pod(name, 1)  # the API server accepted the Pod: name and every label valid
    assert len(pod.metadata.name) <= 63 and ".-" not in pod.metadata.name
    assert len(pod.metadata.labels[Label.JOB_NAME]) <= 63
    assert pod.metadata.labels[Label.JOB_NAME] != name[:63]  # hashed, so two long names never share a label
    assert cluster.wait_phase(name, cluster.resting_phase)["podName"] == pod.metadata.name


def test_success_is_mirrored_into_status(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("ok", {"type": "render_video", "gpus": 0})
    pod = cluster.wait_pod("ok", 1)
    cluster.set_pod(pod.metadata.name, "Running")
    running = cluster.wait_phase("ok", Phase.RUNNING)
    assert running["startTime"]
    result = {"artifacts": [{"key": "videos/ok/out.mp4", "size": 1234, "sha256": "c" * 64}], "metrics": {"frames": 48}}
    cluster.set_pod(pod.metadata.name, "Succeeded", exit_code=0, message=json.dumps(result))
    status = cluster.wait_phase("ok", Phase.SUCCEEDED)
    assert status["artifacts"] == result["artifacts"]
    assert status["progress"]["percent"] == 100 and status["completionTime"]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Complete"] == ("True", Reason.SUCCEEDED)


def test_failure_is_retried_after_backoff_then_fails_with_reason(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("flaky", {"type": "custom", "gpus": 1, "retries": FAST_RETRY})
    for attempt in (1, 2, 3):
        cluster.run_pod("flaky", attempt, exit_code=1, message='{"error": "boom"}')
        if attempt < 3:
            retrying = cluster.wait_phase("flaky", Phase.RETRYING) if attempt == 1 else None
            if retrying:
                assert retrying["reason"] == Reason.ERROR and retrying["nextAttemptTime"]
    status = cluster.wait_phase("flaky", Phase.FAILED)
    assert status["reason"] == Reason.ERROR and "boom" in status["message"]
    assert status["attempts"] == 3 and status["failures"] == 3 and status["exitCode"] == 1
    assert len(cluster.pods("flaky")) == 3


def test_non_retryable_exit_code_fails_at_once(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("bad-input", {"type": "train_lora", "retries": {"limit": 5, "nonRetryableExitCodes": [64]}})
    cluster.run_pod("bad-input", 1, exit_code=64)
    status = cluster.wait_phase("bad-input", Phase.FAILED)
    assert status["reason"] == Reason.NON_RETRYABLE_EXIT_CODE and status["attempts"] == 1


def test_pending_timeout_fails_with_unschedulable(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("stuck", {"type": "train_lora", "gpus": 8, "pendingTimeoutSeconds": 2, "retries": {"limit": 0}})
    pod = cluster.wait_pod("stuck", 1)
    cluster.core.patch_namespaced_pod_status(
        pod.metadata.name,
        cluster.namespace,
        {
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/1 nodes: Insufficient nvidia.com/gpu",
                    }
                ],
            }
        },
    )
    status = cluster.wait_phase("stuck", Phase.FAILED, timeout=20)
    assert status["reason"] == Reason.UNSCHEDULABLE and "pendingTimeoutSeconds=2" in status["message"]
    cluster.wait_until(lambda: not cluster.pods("stuck"), what="the pending pod to be deleted")


def test_external_pod_deletion_starts_new_attempt_not_counted(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("evicted", {"type": "train_voice", "retries": {"limit": 0}})
    pod = cluster.wait_pod("evicted", 1)
    cluster.set_pod(pod.metadata.name, "Running")
    cluster.wait_phase("evicted", Phase.RUNNING)
    cluster.core.delete_namespaced_pod(pod.metadata.name, cluster.namespace)
    cluster.run_pod("evicted", 2, exit_code=0)
    status = cluster.wait_phase("evicted", Phase.SUCCEEDED)
    assert status["attempts"] == 2 and status["failures"] == 0


def test_suspend_deletes_pod_and_resume_starts_new_attempt(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("pausable", {"type": "train_lora"})
    pod = cluster.wait_pod("pausable", 1)
    cluster.set_pod(pod.metadata.name, "Running")
    cluster.wait_phase("pausable", Phase.RUNNING)
    cluster.patch_spec("pausable", {"suspend": True})
    cluster.wait_phase("pausable", Phase.SUSPENDED)
    cluster.wait_until(lambda: not cluster.pods("pausable"), what="the suspended job's pod to go")
    cluster.patch_spec("pausable", {"suspend": False})
    cluster.run_pod("pausable", 2)
    assert cluster.wait_phase("pausable", Phase.SUCCEEDED)["attempts"] == 2


def test_cancel_stops_the_job(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("cancel-me", {"type": "train_lora"})
    pod = cluster.wait_pod("cancel-me", 1)
    cluster.set_pod(pod.metadata.name, "Running")
    cluster.patch_spec("cancel-me", {"cancel": True})
    status = cluster.wait_phase("cancel-me", Phase.CANCELLED)
    assert status["reason"] == Reason.CANCELLED
    cluster.wait_until(lambda: not cluster.pods("cancel-me"), what="the cancelled job's pod to go")


def test_deleting_the_gpujob_removes_its_pod(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("gone", {"type": "train_lora"})
    cluster.wait_pod("gone", 1)
    cluster.delete_job("gone")
    cluster.wait_until(lambda: not cluster.pods("gone") and cluster.job("gone") is None, what="job and pod gone")


def test_recreated_job_with_same_name_gets_fresh_pod(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("again", {"type": "train_lora"})
    first = cluster.wait_pod("again", 1).metadata.name
    cluster.delete_job("again")
    cluster.wait_until(lambda: cluster.job("again") is None, what="deletion")
    cluster.create_job("again", {"type": "train_lora"})
    second = cluster.wait_until(lambda: [p for p in cluster.pods("again") if p.metadata.name != first], what="new pod")
    assert second[0].metadata.name != first


def test_ttl_after_finished_deletes_the_job(operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.create_job("short-lived", {"type": "train_lora", "ttlSecondsAfterFinished": 1})
    cluster.run_pod("short-lived", 1)
    cluster.wait_until(lambda: cluster.job("short-lived") is None, timeout=20, what="ttl deletion")


def test_restart_resyncs_without_rewriting_status(operator: OperatorProcess, cluster: Cluster, emulator: Any) -> None:
    for i in range(5):
        cluster.create_job(f"steady-{i}", {"type": "train_lora"})
    for i in range(5):
        cluster.wait_phase(f"steady-{i}", Phase.SCHEDULED)
    versions = {i: cluster.job(f"steady-{i}")["metadata"]["resourceVersion"] for i in range(5)}
    operator.stop()
    operator.start()
    cluster.create_job("marker", {"type": "train_lora"})
    cluster.wait_phase("marker", Phase.SCHEDULED)
    assert {i: cluster.job(f"steady-{i}")["metadata"]["resourceVersion"] for i in range(5)} == versions
    assert all(len(cluster.pods(f"steady-{i}")) == 1 for i in range(5))


def test_metrics_and_health_endpoints_follow_a_real_run(operator: OperatorProcess, cluster: Cluster) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"{operator.metrics_url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    with urllib.request.urlopen(f"{operator.metrics_url}/readyz", timeout=5) as resp:
        assert json.loads(resp.read())["checks"] == {"kubernetes": True}
    cluster.create_job("m-ok", {"type": "train_voice", "retries": FAST_RETRY})
    cluster.create_job("m-bad", {"type": "train_voice", "retries": {"limit": 0}})
    cluster.run_pod("m-ok", 1, exit_code=0)
    cluster.run_pod("m-bad", 1, exit_code=2)
    cluster.wait_phase("m-ok", Phase.SUCCEEDED)
    cluster.wait_phase("m-bad", Phase.FAILED)

    def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        samples = scrape()
        done = samples.get(("gpu_worker_jobs_total", (("status", "failed"), ("type", "train_voice"))), 0)
        return samples if done == 1 else None

    samples = wait_for(counted, what="the failed job to be counted")
    assert samples[("gpu_worker_jobs_total", (("status", "succeeded"), ("type", "train_voice")))] == 1
    assert samples[("gpu_worker_job_errors_total", (("reason", "Error"), ("type", "train_voice")))] == 1
    assert samples[("gpu_worker_job_duration_seconds_count", (("type", "train_voice"),))] == 2
    assert samples[("gpujob_queue_wait_seconds_count", (("type", "train_voice"),))] == 2


def test_operator_starts_and_works_while_the_api_throttles_it(
    operator_factory: Any, cluster: Cluster, emulator: Any
) -> None:
    # Regression (found by the chaos suite): a 429 on the start-up Pod list failed kopf's startup activity,
    # which kopf retries only after 60 s.
    emulator.set_faults(
        error_429_rate=0.5, retry_after_seconds=0, resources=["pods"], agents=["gpujob-operator"], seed=3
    )
    operator_factory()
    cluster.create_job("throttled", {"type": "train_lora"})
    cluster.run_pod("throttled", 1)
    cluster.wait_phase("throttled", Phase.SUCCEEDED)
    assert emulator.thread.emulator.faults.injected["429"] > 0, "the run was throttled"


def test_a_failed_start_up_list_is_retried_and_readiness_waits_for_the_watchers(
    operator_factory: Any, cluster: Cluster, emulator: Any
) -> None:
    # Regression (issue 12 item 11): a start-up Pod list that failed (a 403 while RBAC settles) failed kopf's
    # startup handler, whose retry (60 s later) bound the metrics port again (EADDRINUSE) and failed for good,
    # while /healthz and /readyz stayed green and no watcher ran.
    import urllib.error
    import urllib.request

    def get(op: OperatorProcess, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"{op.metrics_url}{path}", timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def answers(op: OperatorProcess, path: str) -> tuple[int, Any] | None:
        try:
            return get(op, path)
        except OSError:  # not listening yet
            return None

    emulator.set_faults(error_403_rate=1.0, resources=["pods"], agents=["gpujob-operator"])
    op = operator_factory(run=False).start(wait=False)
    assert wait_for(lambda: answers(op, "/healthz"), what="/healthz") == (200, {"alive": True})
    wait_for(lambda: emulator.thread.emulator.faults.injected["403"] >= 2, what="the start-up list retried")
    assert get(op, "/readyz") == (503, {"ready": False, "checks": {"kubernetes": False}})
    assert not records(op.logs(), "operator started")

    emulator.set_faults(error_403_rate=0.0)
    op.wait_started()
    wait_for(lambda: get(op, "/readyz")[0] == 200, what="/readyz once the watchers run")
    cluster.create_job("after-403", {"type": "train_lora"})
    cluster.run_pod("after-403", 1)
    cluster.wait_phase("after-403", Phase.SUCCEEDED)
    logs = op.logs().lower()
    assert "address already in use" not in logs and "eaddrinuse" not in logs
