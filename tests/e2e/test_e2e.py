"""End to end, on each backend: `gpujob sandbox` (API emulator or real control plane, kubelet, redis, S3) +
`gpujob operator` (with the bridge) + `gpujob worker` in every job Pod. Requests go in through the Redis stream
exactly as the backend sends them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpujob.sandbox.procs import wait_for
from gpujob.sandbox.stack import LocalStack, processes_under

pytestmark = pytest.mark.e2e

FAST_RETRY = {"limit": 1, "backoffSeconds": 1, "maxBackoffSeconds": 1}


@pytest.fixture(scope="module", params=["emulator", "kubernetes"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    workdir = tmp_path_factory.mktemp(f"e2e-{request.param}")
    with LocalStack(workdir, gpus=2, api=request.param) as running:
        from gpujob.worker.tiny_model import write_tiny_model

        write_tiny_model(running.models_dir / "tiny-llama")
        yield running
    assert not processes_under(workdir / "sandbox" / "pods"), "a job Pod's process outlived the sandbox"


def phase_of(stack: LocalStack, job_id: str) -> str | None:
    phase: str | None = ((stack.job(job_id) or {}).get("status") or {}).get("phase")
    return phase


def wait_phase(stack: LocalStack, job_id: str, *phases: str, timeout: float = 120) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status: dict[str, Any] = (stack.job(job_id) or {}).get("status") or {}
        return status if status.get("phase") in phases else None

    try:
        result: dict[str, Any] = wait_for(reached, timeout, 0.2, f"{job_id} to reach {phases}")
    except TimeoutError:  # what wait_for raises: say where the job got stuck
        status = (stack.job(job_id) or {}).get("status")
        raise AssertionError(
            f"{job_id} did not reach {phases}; status {json.dumps(status)}\n"
            f"operator log tail:\n{stack.operator.tail(15) if stack.operator else ''}"
        ) from None
    return result


def events_of(stack: LocalStack, job_id: str) -> list[dict[str, Any]]:
    entries = stack.redis().xrange(stack.settings.events_stream)
    return [json.loads(fields["event"]) for _, fields in entries if fields.get("jobId") == job_id]


def test_three_job_types_succeed_with_artifacts(stack: LocalStack) -> None:
    requests = [
        {
            "jobId": "e2e-lora",
            "type": "train_lora",
            "gpus": 1,
            "params": {"baseModel": "tiny-llama", "dataset": {"text": ["hello gpu", "lora in e2e"]}, "epochs": 3},
        },
        {"jobId": "e2e-voice", "type": "train_voice", "gpus": 1, "params": {"epochs": 2, "stepsPerEpoch": 5}},
        {"jobId": "e2e-video", "type": "render_video", "gpus": 1, "params": {"width": 64, "height": 64, "frames": 8}},
    ]
    for request in requests:
        stack.submit(request)
    prefixes = {"e2e-lora": "loras/e2e-lora/", "e2e-voice": "voices/e2e-voice/", "e2e-video": "videos/e2e-video/"}
    s3 = stack.s3()
    for job_id, prefix in prefixes.items():
        status = wait_phase(stack, job_id, "Succeeded", "Failed", timeout=240)
        assert status["phase"] == "Succeeded", status
        assert status["nodeName"] == "sandbox-node"
        artifacts = status["artifacts"]
        assert artifacts and all(a["key"].startswith(prefix) for a in artifacts)
        for artifact in artifacts:
            response = s3.get_object(stack.bucket, artifact["key"])
            data = response.read()
            response.close()
            assert len(data) == artifact["size"]
            assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
        statuses = [e["status"] for e in events_of(stack, job_id)]
        assert "running" in statuses and statuses[-1] == "succeeded", statuses
    table = stack.kubectl("get", "gj")
    assert table.returncode == 0 and "e2e-lora" in table.stdout and "Succeeded" in table.stdout


def test_failing_command_is_retried_then_fails_with_reason(stack: LocalStack) -> None:
    stack.submit(
        {
            "jobId": "e2e-exit3",
            "type": "custom",
            "gpus": 0,
            "command": ["sh", "-c", "echo something broke >&2; exit 3"],
            "retries": FAST_RETRY,
        }
    )
    status = wait_phase(stack, "e2e-exit3", "Failed", timeout=90)
    assert status["attempts"] == 2 and status["exitCode"] == 3
    assert status["reason"] == "Error"  # the last attempt's reason; the message says the limit was reached
    assert "retry limit 1 reached after 2 attempts" in status["message"]
    assert "something broke" in status["message"]
    assert len(stack.pods("e2e-exit3")) == 2


def test_cancel_through_the_stream_stops_the_running_job(stack: LocalStack, tmp_path: Path) -> None:
    marker = tmp_path / "sigterm"
    script = f"trap 'echo term > {marker}; exit 143' TERM; while true; do sleep 0.1; done"
    stack.submit({"jobId": "e2e-cancel", "type": "custom", "gpus": 1, "command": ["sh", "-c", script]})
    wait_phase(stack, "e2e-cancel", "Running", timeout=60)
    stack.submit({"jobId": "e2e-cancel"}, action="cancel")
    status = wait_phase(stack, "e2e-cancel", "Cancelled", timeout=60)
    assert status["phase"] == "Cancelled"
    wait_for(marker.exists, 30, what="the job's process to get SIGTERM")
    wait_for(lambda: not stack.pods("e2e-cancel"), 60, 0.2, "the cancelled job's Pod to go")
    assert "cancelled" in [e["status"] for e in events_of(stack, "e2e-cancel")]


def test_job_needing_more_gpus_than_the_node_fails_unschedulable(stack: LocalStack) -> None:
    stack.submit(
        {
            "jobId": "e2e-too-big",
            "type": "custom",
            "gpus": 4,
            "command": ["sh", "-c", "exit 0"],
            "pendingTimeoutSeconds": 3,
            "retries": {"limit": 0},
        }
    )
    pending = wait_for(lambda: stack.pods("e2e-too-big"), 30, 0.2, "the Pod")[0]
    assert not pending["spec"].get("nodeName")
    status = wait_phase(stack, "e2e-too-big", "Failed", timeout=60)
    assert status["reason"] == "Unschedulable", status
    assert "Insufficient nvidia.com/gpu" in status["message"]


def test_kubectl_logs_and_logs_follow_of_a_job_pod(stack: LocalStack) -> None:
    """`kubectl logs` (the real binary) of a job Pod: on the emulator from the kubelet's file, on the real control
    plane through kube-apiserver to the node agent `gpujob sandbox --api kubernetes` started."""
    script = "for i in 1 2 3 4 5 6; do echo job-line-$i; sleep 0.5; done; echo done >&2"
    stack.submit({"jobId": "e2e-logs", "type": "custom", "gpus": 1, "command": ["sh", "-c", script]})

    def running_pod() -> str | None:
        pods = stack.pods("e2e-logs")
        running = pods and (pods[0].get("status") or {}).get("phase") == "Running"
        return str(pods[0]["metadata"]["name"]) if running else None

    name = wait_for(running_pod, 120, 0.1, "the job's Pod to run")
    follow = stack.kubectl("logs", "-f", name, timeout=120)
    assert follow.returncode == 0, follow.stderr
    expected = "".join(f"job-line-{i}\n" for i in range(1, 7)) + "done\n"
    assert follow.stdout == expected
    wait_phase(stack, "e2e-logs", "Succeeded", timeout=120)
    logs = stack.kubectl("logs", name)
    assert logs.returncode == 0 and logs.stdout == expected, logs.stderr
    tail = stack.kubectl("logs", name, "--tail=1")
    assert tail.returncode == 0 and tail.stdout == "done\n", tail.stderr
