"""Worker pieces in-process: params models, path checks, result JSON, progress reporter, artifact store."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import redis
from minio import Minio

from gpujob.api import Artifact, ExitCode, JobType
from gpujob.events import SyncEventPublisher
from gpujob.sandbox.s3_server import S3Server
from gpujob.settings import Settings
from gpujob.worker import BadInput, Task
from gpujob.worker.artifacts import PART_SIZE, ArtifactStore, make_client
from gpujob.worker.checkpoints import Checkpoints
from gpujob.worker.paths import model_dir, resolve_in
from gpujob.worker.progress import ProgressReporter
from gpujob.worker.result import MAX_BYTES, render
from gpujob.worker.task import available, load_task
from gpujob.worker.tasks.lora import LoraParams, TrainLora
from gpujob.worker.tasks.video import VideoParams
from gpujob.worker.tasks.voice import VoiceParams

LORA_OK = {"baseModel": "tiny", "dataset": {"text": ["a", "b"]}, "epochs": 2}


def test_every_job_type_with_a_reference_task_is_registered() -> None:
    assert {JobType.TRAIN_LORA, JobType.TRAIN_VOICE, JobType.RENDER_VIDEO} <= set(available())
    for name in available():
        task = load_task(name)
        assert isinstance(task, Task)
        assert task.name == name


def test_unknown_job_type_is_bad_input() -> None:
    with pytest.raises(BadInput, match="unknown job type 'paint_fence'"):
        load_task("paint_fence")


def test_lora_params_camel_case_and_defaults() -> None:
    params = TrainLora().parse_params({**LORA_OK, "learningRate": 0.01, "maxLength": 64})
    assert (params.base_model, params.learning_rate, params.max_length, params.rank) == ("tiny", 0.01, 64, 8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"baseModel": "../../etc"}, "baseModel: Value error, must be a relative path"),
        ({"baseModel": "/etc"}, "baseModel: Value error, must be a relative path"),
        ({"dataset": None}, "dataset"),
        ({"dataset": {"text": ["x"], "s3Key": "d.jsonl"}}, "exactly one of dataset.text or dataset.s3Key"),
        ({"dataset": {}}, "exactly one"),
        ({"epochs": 0}, "epochs: Input should be greater than or equal to 1"),
    ],
)
def test_lora_params_rejected_with_a_clear_message(change: dict[str, object], message: str) -> None:
    raw = {**LORA_OK, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(BadInput, match="invalid params for train_lora") as info:
        TrainLora().parse_params(raw)
    assert message in str(info.value)


def test_voice_and_video_params() -> None:
    assert VoiceParams.model_validate({"sampleRate": 22050}).sample_rate == 22050
    with pytest.raises(ValueError, match="must be even"):
        VideoParams.model_validate({"width": 101})
    with pytest.raises(ValueError, match="Extra inputs"):
        VideoParams.model_validate({"fpss": 3})


def test_paths_stay_inside_the_models_dir(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "org" / "m").mkdir(parents=True)
    (root / "org" / "m" / "config.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    assert model_dir(root, "org/m") == (root / "org" / "m").resolve()
    for bad in ["../outside", "/etc", "", "org/../../outside", "escape"]:
        with pytest.raises(BadInput):
            resolve_in(root, bad)
    with pytest.raises(BadInput, match="no model at"):
        model_dir(root, "org")


def test_result_fits_the_termination_message_limit() -> None:
    artifacts = [Artifact(key=f"loras/j/file-{i:04d}.bin", size=i, sha256="ab" * 32) for i in range(200)]
    text = render(artifacts, {"loss": 0.5, "nan": float("nan")}, "x" * 5000, ExitCode.TASK_FAILED)
    doc = json.loads(text)
    assert len(text.encode()) <= MAX_BYTES
    assert doc["artifactsOmitted"] == 200 - len(doc["artifacts"]) > 0
    assert doc["metrics"] == {"loss": 0.5}
    assert doc["exitCode"] == ExitCode.TASK_FAILED and len(doc["error"]) <= 1024
    assert set(doc["artifacts"][0]) == {"key", "size", "sha256"}


def test_progress_reporter_rate_limits_and_never_goes_back(redis_url: str, redis_client: redis.Redis) -> None:
    settings = Settings(redis_url=redis_url)
    pubsub = redis_client.pubsub()
    pubsub.subscribe("gpujobs:progress:unit-job")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    publisher = SyncEventPublisher(redis.Redis.from_url(redis_url, decode_responses=True), settings)
    reporter = ProgressReporter("unit-job", 2, publisher, min_interval=0.2)
    for i in range(10_000):
        reporter.report(i / 100, f"step {i}")
    reporter.report(5, "late and lower")  # clamped: progress never goes backwards
    reporter.report(100, "done")
    reporter.close()
    events = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        events.append(json.loads(message["data"]))
    assert 1 <= len(events) <= 5  # 10,002 reports within well under a second
    assert events[-1]["progress"] == 100 and events[-1]["message"] == "done"
    assert [e["progress"] for e in events] == sorted(e["progress"] for e in events)
    assert {(e["status"], e["phase"], e["attempt"]) for e in events} == {("running", "Running", 2)}
    assert reporter.published == len(events)


def test_progress_without_redis_or_with_redis_down_never_raises() -> None:
    dead = Settings(redis_url="redis://127.0.0.1:1/0")
    for reporter in [ProgressReporter("j", 1, None), ProgressReporter.from_settings(dead, "j")]:
        reporter.report(50, "half")
        reporter.close(timeout=10)
        assert reporter.published == 0


def test_artifact_upload_multipart_with_sha256(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    settings = Settings(**{k.removeprefix("GPUJOB_").lower(): v for k, v in s3_server.env(s3_bucket).items()})
    store = ArtifactStore(make_client(settings), s3_bucket)
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * (PART_SIZE // 256 + 4096))  # > one part: multipart
    artifact = store.upload(path, "loras/j/big.bin")
    data = path.read_bytes()
    assert artifact == Artifact(key="loras/j/big.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    client: Minio = store.client
    stat = client.stat_object(s3_bucket, "loras/j/big.bin")
    assert stat.size == len(data)
    assert stat.metadata["x-amz-meta-sha256"] == artifact.sha256
    assert stat.etag is not None and "-" in stat.etag  # a multipart ETag
    assert store.get_bytes("loras/j/big.bin") == data
    with pytest.raises(BadInput, match="does not exist"):
        store.get_bytes("loras/j/missing.jsonl")


def test_checkpoints_newest_wins_and_old_ones_are_pruned(s3_server: S3Server, s3_bucket: str) -> None:
    settings = Settings(**{k.removeprefix("GPUJOB_").lower(): v for k, v in s3_server.env(s3_bucket).items()})
    store = ArtifactStore(make_client(settings), s3_bucket)
    store.ensure_bucket()
    checkpoints = Checkpoints(store, "voices/j/checkpoints", "run-1")
    assert checkpoints.latest() is None
    for step in (5, 50, 500):
        checkpoints.save(step, {"value": step * 2})
    assert store.list_keys("voices/j/checkpoints/") == [checkpoints.key(50), checkpoints.key(500)]
    assert checkpoints.key(500) == "voices/j/checkpoints/run-1/step-000000000500.pt"
    store.put_bytes(checkpoints.key(900), b"torn")  # cut short by a SIGKILL: skipped
    assert checkpoints.latest() == {"value": 1000, "step": 500, "run": "run-1"}
    checkpoints.clear()
    assert store.list_keys("voices/j/") == []


def test_report_progress_helper_is_thread_safe() -> None:
    from gpujob.worker import progress

    reporter = ProgressReporter("j", 1, None)
    progress.set_current(reporter)
    start = threading.Barrier(20)

    def report(percent: int) -> None:
        start.wait()  # all 20 threads report at once
        progress.report_progress(percent, f"step {percent}")

    threads = [threading.Thread(target=report, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        # No report lost to a race: the high-water mark is the highest percent any thread sent.
        assert reporter._high == 19.0
        assert progress._current is reporter
    finally:
        reporter.close()
        progress.set_current(None)


def test_lora_params_model_is_exported() -> None:
    assert TrainLora.params_model is LoraParams
