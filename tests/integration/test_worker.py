"""`gpujob worker` as a subprocess, as in a Pod: real torch on CPU, real SeaweedFS, real Redis.

Each job type runs to exit 0 with its artifacts in S3 (size and sha256 checked after download) and a correct
termination message; progress arrives on Redis; SIGTERM saves a checkpoint (exit 143) and the next attempt
resumes from it; bad input exits 64 and an unreachable S3 exits 75.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from minio import Minio

from gpujob.api import ExitCode
from gpujob.sandbox.procs import free_port
from gpujob.worker.tiny_model import write_tiny_model
from tests.support.logs import records

GPUJOB = str(Path(sys.executable).parent / "gpujob")
TEXTS = ["the quick brown fox", "hello world", "low rank adapters", "a gpu job reports progress"] * 2


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root / "tiny")
    return root


@dataclass
class Finished:
    code: int
    result: dict[str, Any]
    log: str


class Worker:
    """One `gpujob worker` process with the env an operator-made Pod would have."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.termination = tmp_path / f"termination-{time.monotonic_ns()}"
        self.log_path = self.termination.with_suffix(".log")
        env = {**os.environ, **env, "GPUJOB_TERMINATION_MESSAGE_PATH": str(self.termination)}
        env["GPUJOB_LOG_FORMAT"] = "json"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([GPUJOB, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 180) -> Finished:
        code = self.proc.wait(timeout)
        result = json.loads(self.termination.read_text()) if self.termination.exists() else {}
        return Finished(code, result, self.log_path.read_text())


@pytest.fixture
def worker(tmp_path: Path, models_dir: Path, s3_env: dict[str, str]) -> Iterator[Any]:
    started: list[Worker] = []

    def start(job_type: str, params: dict[str, Any], job_id: str = "job-1", **env: str) -> Worker:
        base = {**s3_env, "GPUJOB_MODELS_DIR": str(models_dir), "GPUJOB_JOB_ID": job_id}
        base |= {"GPUJOB_JOB_TYPE": job_type, "GPUJOB_JOB_PARAMS": json.dumps(params)}
        started.append(Worker(tmp_path, {**base, **env}))
        return started[-1]

    yield start
    for w in started:  # a failed assertion must not leave a worker behind
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def subscribe(client: redis.Redis, job_id: str) -> Any:
    pubsub = client.pubsub()
    pubsub.subscribe(f"gpujobs:progress:{job_id}")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    return pubsub


def drain(pubsub: Any) -> list[dict[str, Any]]:
    events = []
    while (message := pubsub.get_message(timeout=1.0)) is not None:
        events.append(json.loads(message["data"]))
    return events


def wait_for_event(pubsub: Any, predicate: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is not None and predicate(event := json.loads(message["data"])):
            return event
    raise TimeoutError("no such progress event")


def check_artifacts(client: Minio, bucket: str, result: dict[str, Any], expected: set[str]) -> dict[str, bytes]:
    artifacts = {a["key"]: a for a in result["artifacts"]}
    assert set(artifacts) == expected
    blobs = {}
    for key, artifact in artifacts.items():
        response = client.get_object(bucket, key)
        data = response.read()
        response.close()
        assert len(data) == artifact["size"] > 0
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
        blobs[key] = data
    return blobs


def checkpoint_keys(client: Minio, bucket: str, prefix: str) -> list[str]:
    return sorted(o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True) if o.object_name)


def test_train_lora_from_an_s3_dataset(
    worker: Any, s3_client: Minio, s3_bucket: str, redis_url: str, redis_client: redis.Redis
) -> None:
    s3_client.make_bucket(s3_bucket)
    lines = "\n".join(json.dumps({"text": t}) for t in TEXTS).encode()
    s3_client.put_object(s3_bucket, "datasets/d.jsonl", io.BytesIO(lines), len(lines))
    pubsub = subscribe(redis_client, "lora-1")
    params = {"baseModel": "tiny", "dataset": {"s3Key": "datasets/d.jsonl"}, "epochs": 5, "rank": 4}
    done = worker("train_lora", params, "lora-1", GPUJOB_REDIS_URL=redis_url, GPUJOB_ATTEMPT="3").wait()
    assert done.code == ExitCode.OK, done.log
    expected = {"loras/lora-1/adapter_model.safetensors", "loras/lora-1/adapter_config.json"}
    blobs = check_artifacts(s3_client, s3_bucket, done.result, expected)
    assert json.loads(blobs["loras/lora-1/adapter_config.json"])["r"] == 4
    assert done.result["metrics"]["steps"] == 10 and done.result["metrics"]["finalLoss"] > 0
    assert "error" not in done.result and '"device": "cpu"' in done.log
    events = drain(pubsub)
    percents = [e["progress"] for e in events]
    assert percents == sorted(percents) and percents[-1] == 100
    assert events[0]["message"] == "attempt 3 started on cpu"
    assert all(e["attempt"] == 3 and e["phase"] == "Running" for e in events)
    assert any(e["message"].startswith("Epoch ") and "loss=" in e["message"] for e in events)
    assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})


def test_train_voice_writes_a_model_and_a_wav(worker: Any, s3_client: Minio, s3_bucket: str) -> None:
    params = {"epochs": 4, "stepsPerEpoch": 5, "seconds": 0.5}
    done = worker("train_voice", params, "voice-1", GPUJOB_CHECKPOINT_EVERY_SECONDS="0.05").wait()
    assert done.code == ExitCode.OK, done.log
    keys = {f"voices/voice-1/{name}" for name in ("model.safetensors", "config.json", "sample.wav")}
    blobs = check_artifacts(s3_client, s3_bucket, done.result, keys)
    with wave.open(io.BytesIO(blobs["voices/voice-1/sample.wav"])) as wav:
        assert (wav.getframerate(), wav.getnframes(), wav.getsampwidth()) == (16_000, 8_000, 2)
    assert records(done.log, "checkpoint saved")  # periodic checkpoints ran ...
    assert checkpoint_keys(s3_client, s3_bucket, "voices/voice-1/checkpoints/") == []  # ... and went on success


def test_render_video_encodes_an_mp4(worker: Any, s3_client: Minio, s3_bucket: str) -> None:
    import av

    done = worker("render_video", {"width": 96, "height": 64, "frames": 30, "fps": 15}, "video-1").wait()
    assert done.code == ExitCode.OK, done.log
    blobs = check_artifacts(s3_client, s3_bucket, done.result, {"videos/video-1/video.mp4"})
    with av.open(io.BytesIO(blobs["videos/video-1/video.mp4"])) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 96, 64)
        assert sum(1 for _ in container.decode(video=0)) == 30
        assert container.duration is not None and abs(container.duration / 1e6 - 2.0) < 0.1


@pytest.mark.parametrize(
    ("job_type", "params", "expected_keys", "total"),
    [
        ("train_lora", {"baseModel": "tiny", "dataset": {"text": TEXTS}, "epochs": 400}, 2, 800),
        ("render_video", {"width": 64, "height": 64, "frames": 400}, 1, 400),
    ],
)
def test_sigterm_saves_a_checkpoint_and_the_next_attempt_resumes(
    worker: Any,
    s3_client: Minio,
    s3_bucket: str,
    redis_url: str,
    redis_client: redis.Redis,
    job_type: str,
    params: dict[str, Any],
    expected_keys: int,
    total: int,
) -> None:
    job_id = f"resume-{job_type}"
    prefix = f"{'loras' if job_type == 'train_lora' else 'videos'}/{job_id}/"
    pubsub = subscribe(redis_client, job_id)
    first = worker(job_type, params, job_id, GPUJOB_REDIS_URL=redis_url)
    wait_for_event(pubsub, lambda e: 2 < e["progress"] < 50)
    first.proc.send_signal(signal.SIGTERM)
    stopped = first.wait(timeout=30)
    assert stopped.code == ExitCode.INTERRUPTED, stopped.log
    assert stopped.result["exitCode"] == ExitCode.INTERRUPTED and "SIGTERM" in stopped.result["error"]
    saved = checkpoint_keys(s3_client, s3_bucket, f"{prefix}checkpoints/")
    assert saved, stopped.log
    saved_step = int(saved[-1].rsplit("-", 1)[1].removesuffix(".pt"))
    assert 0 < saved_step < total

    second = worker(job_type, params, job_id, GPUJOB_REDIS_URL=redis_url, GPUJOB_ATTEMPT="2").wait()
    assert second.code == ExitCode.OK, second.log
    assert second.result["metrics"]["resumedFromStep"] == saved_step
    assert len(check_artifacts(s3_client, s3_bucket, second.result, _keys(second.result))) == expected_keys
    assert checkpoint_keys(s3_client, s3_bucket, f"{prefix}checkpoints/") == []
    if job_type == "render_video":  # every frame is in the file exactly once, across both attempts
        import av

        response = s3_client.get_object(s3_bucket, f"{prefix}video.mp4")
        with av.open(io.BytesIO(response.read())) as container:
            assert sum(1 for _ in container.decode(video=0)) == total
    else:
        assert second.result["metrics"]["steps"] == total
    attempt_two = [e for e in drain(pubsub) if e.get("attempt") == 2]
    assert attempt_two[-1]["progress"] == 100


def _keys(result: dict[str, Any]) -> set[str]:
    return {a["key"] for a in result["artifacts"]}


@pytest.mark.parametrize(
    ("job_type", "params", "message"),
    [
        ("train_lora", {"baseModel": "tiny", "dataset": {"text": ["x"]}, "colour": 1}, "colour: Extra inputs"),
        ("train_lora", {"baseModel": "../../etc", "dataset": {"text": ["x"]}}, "baseModel: Value error"),
        ("train_lora", {"baseModel": "tiny"}, "dataset: Field required"),
        ("train_lora", {"baseModel": "nope", "dataset": {"text": ["x"]}}, "baseModel 'nope': no model at"),
        ("train_lora", {"baseModel": "tiny", "dataset": {"s3Key": "missing.jsonl"}}, "missing.jsonl does not exist"),
        ("paint_fence", {}, "unknown job type 'paint_fence'"),
    ],
)
def test_bad_input_exits_64_with_a_clear_error(
    worker: Any, job_type: str, params: dict[str, Any], message: str
) -> None:
    done = worker(job_type, params).wait()
    assert done.code == ExitCode.BAD_INPUT, done.log
    assert message in done.result["error"]
    assert done.result["exitCode"] == ExitCode.BAD_INPUT and done.result["artifacts"] == []


def test_unreachable_s3_exits_75(worker: Any) -> None:
    params = {"epochs": 1, "stepsPerEpoch": 1}
    done = worker("train_voice", params, GPUJOB_S3_ENDPOINT=f"127.0.0.1:{free_port()}").wait()
    assert done.code == ExitCode.TRANSIENT, done.log
    assert "S3" in done.result["error"] and done.result["exitCode"] == ExitCode.TRANSIENT


def test_wrong_s3_secret_exits_75(worker: Any) -> None:
    done = worker("train_voice", {"epochs": 1}, GPUJOB_S3_SECRET_KEY="not-the-secret").wait()
    assert done.code == ExitCode.TRANSIENT, done.log
    assert "SignatureDoesNotMatch" in done.result["error"]


def test_redis_down_does_not_fail_the_job(worker: Any) -> None:
    params = {"epochs": 2, "stepsPerEpoch": 2, "seconds": 0.2}
    done = worker("train_voice", params, GPUJOB_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0").wait()
    assert done.code == ExitCode.OK, done.log
    assert "progress publish failed" in done.log
