"""A resumed `gpujob worker` continues from the saved weights, not only from the saved step count.

LoRA training here is deterministic (seeded init and batch order, no dropout, CPU): an attempt stopped by SIGTERM
and resumed from its checkpoint must end with the very same adapter, byte for byte, as one run without a stop.
A resume that restored the step but not the adapter (or the optimizer) ends with other weights.

No timing window: SIGTERM is sent once the worker has said it started (its stop signals are handled from then on),
so it stops at its first step boundary, whatever the machine's load, with the checkpoint of step 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from minio import Minio

from gpujob.api import ExitCode
from gpujob.worker.tiny_model import write_tiny_model

GPUJOB = str(Path(sys.executable).parent / "gpujob")
TEXTS = ["the quick brown fox", "hello world", "low rank adapters", "a gpu job reports progress"] * 2
# 8 texts in batches of 4: 2 steps an epoch.
PARAMS = {"baseModel": "tiny", "dataset": {"text": TEXTS}, "epochs": 8, "rank": 4}
TOTAL_STEPS = 16
ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root / "tiny")
    return root


class Worker:
    """One `gpujob worker` process with the env an operator-made Pod would have."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.termination = tmp_path / f"termination-{time.monotonic_ns()}"
        self.log_path = self.termination.with_suffix(".log")
        env = {**os.environ, **env, "GPUJOB_TERMINATION_MESSAGE_PATH": str(self.termination)}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([GPUJOB, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 300) -> tuple[int, dict[str, Any], str]:
        code = self.proc.wait(timeout)
        result = json.loads(self.termination.read_text()) if self.termination.exists() else {}
        return code, result, self.log_path.read_text()


@pytest.fixture
def start_worker(tmp_path: Path, models_dir: Path, s3_env: dict[str, str], redis_url: str) -> Iterator[Any]:
    started: list[Worker] = []

    def start(job_id: str, attempt: int) -> Worker:
        env = {**s3_env, "GPUJOB_MODELS_DIR": str(models_dir), "GPUJOB_JOB_ID": job_id, "GPUJOB_REDIS_URL": redis_url}
        env |= {"GPUJOB_JOB_TYPE": "train_lora", "GPUJOB_JOB_PARAMS": json.dumps(PARAMS)}
        env |= {"GPUJOB_ATTEMPT": str(attempt), "GPUJOB_LOG_FORMAT": "json"}
        env["GPUJOB_CHECKPOINT_EVERY_SECONDS"] = "3600"  # no periodic checkpoint: only the one SIGTERM makes
        started.append(Worker(tmp_path, env))
        return started[-1]

    yield start
    for w in started:  # a failed assertion must not leave a worker behind
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def adapter_sha256(client: Minio, bucket: str, job_id: str, result: dict[str, Any]) -> str:
    """The adapter's sha256, computed here from the object in S3 (and matching what the worker reported)."""
    key = f"loras/{job_id}/{ADAPTER}"
    response = client.get_object(bucket, key)
    try:
        digest = hashlib.sha256(response.read()).hexdigest()
    finally:
        response.close()
        response.release_conn()
    [reported] = [a["sha256"] for a in result["artifacts"] if a["key"] == key]
    assert reported == digest
    return digest


def checkpoint_steps(client: Minio, bucket: str, job_id: str) -> list[int]:
    prefix = f"loras/{job_id}/checkpoints/"
    keys = [o.object_name or "" for o in client.list_objects(bucket, prefix=prefix, recursive=True)]
    return sorted(int(m.group(1)) for k in keys if (m := re.search(r"step-(\d+)\.pt$", k)))


def wait_for_message(pubsub: Any, text: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] == "message" and text in (event := json.loads(message["data"]))["message"]:
            return event
    raise TimeoutError(f"no progress event with {text!r} within {timeout:g}s")


def test_resumed_lora_ends_with_the_same_adapter_as_an_uninterrupted_run(
    start_worker: Any, s3_client: Minio, s3_bucket: str, redis_client: redis.Redis
) -> None:
    code, straight, log = start_worker("lora-straight", 1).wait()
    assert code == ExitCode.OK, log
    assert straight["metrics"]["steps"] == TOTAL_STEPS and "resumedFromStep" not in straight["metrics"]
    expected = adapter_sha256(s3_client, s3_bucket, "lora-straight", straight)

    pubsub = redis_client.pubsub()
    pubsub.subscribe("gpujobs:progress:lora-resumed")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # subscribed before the worker publishes
    first = start_worker("lora-resumed", 1)
    started = wait_for_message(pubsub, "attempt 1 started")
    assert started["progress"] == 0
    pubsub.close()
    first.proc.send_signal(signal.SIGTERM)
    code, stopped, log = first.wait()
    assert code == ExitCode.INTERRUPTED, f"the first attempt did not stop on SIGTERM ({code}):\n{log}"
    assert stopped["exitCode"] == ExitCode.INTERRUPTED and "SIGTERM" in stopped["error"]
    assert checkpoint_steps(s3_client, s3_bucket, "lora-resumed") == [1], log

    code, resumed, log = start_worker("lora-resumed", 2).wait()
    assert code == ExitCode.OK, log
    assert resumed["metrics"]["resumedFromStep"] == 1
    assert resumed["metrics"]["steps"] == TOTAL_STEPS
    assert checkpoint_steps(s3_client, s3_bucket, "lora-resumed") == []
    assert adapter_sha256(s3_client, s3_bucket, "lora-resumed", resumed) == expected, (
        "resumed from step 1, the adapter differs from an uninterrupted run's"
    )
