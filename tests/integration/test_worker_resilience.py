"""How an attempt ends when things go wrong: checkpoints of another run, S3 failing at resume or at a save,
SIGTERM during a save or inside a long C call, GPUs requested without CUDA, CUDA out of memory.

Real components throughout: SeaweedFS (stopped, or paused with SIGSTOP, to make an outage), torch, and
`gpujob worker` as a subprocess; a test task plug-in is installed the way any plug-in is (an entry point
in a dist-info directory on the worker's PYTHONPATH)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from minio import Minio

from gpujob.api import ExitCode
from gpujob.sandbox.procs import free_port
from gpujob.sandbox.s3_server import S3Server
from gpujob.settings import Settings
from gpujob.worker.artifacts import ArtifactStore, DirStore, make_client
from gpujob.worker.checkpoints import Checkpoints, check_loadable
from gpujob.worker.context import TaskContext
from gpujob.worker.devices import Devices
from gpujob.worker.env import WorkerEnv
from gpujob.worker.errors import Interrupted, TransientError
from gpujob.worker.progress import ProgressReporter
from gpujob.worker.runtime import run_key
from tests.integration.test_worker import TEXTS, models_dir, worker  # noqa: F401  (fixtures)
from tests.support.logs import records

PLUGIN = '''
import ctypes

import torch
from pydantic import BaseModel

from gpujob.worker import Task


class Params(BaseModel):
    pass


class StuckInC(Task[Params]):
    """Stands for a long CUDA call: blocked in C with the GIL released, never back in Python."""

    name = "stuck_in_c"
    params_model = Params

    def run(self, ctx, params):
        ctx.report_progress(1, "entering a long C call")
        mutex = ctypes.create_string_buffer(64)  # zeroed = PTHREAD_MUTEX_INITIALIZER, a normal mutex
        lock = ctypes.CDLL(None).pthread_mutex_lock
        lock(mutex)
        lock(mutex)  # relocking a normal mutex blocks for ever
        return {}


class OutOfMemoryTask(Task[Params]):
    name = "out_of_memory"
    params_model = Params

    def run(self, ctx, params):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("plugin")
    (root / "gpujob_test_tasks.py").write_text(PLUGIN)
    info = root / "gpujob_test_tasks-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gpujob-test-tasks\nVersion: 0\n")
    entry = "stuck_in_c = gpujob_test_tasks:StuckInC\nout_of_memory = gpujob_test_tasks:OutOfMemoryTask\n"
    (info / "entry_points.txt").write_text(f"[gpujob.tasks]\n{entry}")
    return os.pathsep.join(p for p in [str(root), os.environ.get("PYTHONPATH", "")] if p)


def wait_for_log(w: Any, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert w.proc.poll() is None, w.log_path.read_text()[-3000:]
        for line in w.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if predicate(record):
                return record
        time.sleep(0.05)  # polling interval, not a wait for something to happen
    raise TimeoutError(f"no such log record in {w.log_path}")


def progressed(record: dict[str, Any]) -> bool:
    return record.get("event") == "progress" and 1 < record.get("percent", 0) < 60


# --- the worker as a subprocess -------------------------------------------------------------------------


def test_gpus_requested_without_cuda_fail_at_once_with_a_clear_reason(worker: Any) -> None:  # noqa: F811
    dead_s3 = f"127.0.0.1:{free_port()}"  # never reached: the check comes before any network call
    params = {"epochs": 1, "stepsPerEpoch": 1}
    for env in ({"GPUJOB_GPUS": "2"}, {"NVIDIA_VISIBLE_DEVICES": "GPU-8a7c0e7e-1d2b-4f3e-9c1a-0123456789ab"}):
        done = worker("train_voice", params, GPUJOB_S3_ENDPOINT=dead_s3, **env).wait()
        assert done.code == ExitCode.GPU_UNAVAILABLE, done.log
        assert "GPU(s) requested but CUDA is unavailable" in done.result["error"]
        assert "CPU-only build" in done.result["error"] or "driver" in done.result["error"].lower()


def test_a_cpu_pod_runs_on_cpu_and_says_so(worker: Any) -> None:  # noqa: F811
    # CUDA base images set NVIDIA_VISIBLE_DEVICES=all in every container: that is not a GPU request.
    done = worker("train_voice", {"epochs": 1, "stepsPerEpoch": 2}, NVIDIA_VISIBLE_DEVICES="all").wait()
    assert done.code == ExitCode.OK, done.log
    assert done.result["device"] == {"type": "cpu", "count": 0, "names": [], "memoryGiB": []}
    assert done.result["metrics"]["gpuCount"] == 0


def test_cuda_out_of_memory_has_its_own_exit_code(worker: Any, plugin_path: str) -> None:  # noqa: F811
    done = worker("out_of_memory", {}, PYTHONPATH=plugin_path).wait()
    assert done.code == ExitCode.OUT_OF_MEMORY, done.log
    assert done.result["error"].startswith("CUDA out of memory (peak 0.00 GiB allocated): CUDA out of memory.")


def test_sigterm_inside_a_long_c_call_exits_143_within_the_grace_period(
    worker: Any,  # noqa: F811
    plugin_path: str,
) -> None:
    grace = 8.0  # the budget is the grace period less its margin: 8 - 8/4 = 6 s
    w = worker("stuck_in_c", {}, PYTHONPATH=plugin_path, GPUJOB_TERMINATION_GRACE_SECONDS=str(grace))
    wait_for_log(w, lambda r: r.get("message") == "entering a long C call")
    sent = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    done = w.wait(timeout=60)
    elapsed = time.monotonic() - sent
    assert done.code == ExitCode.INTERRUPTED, done.log
    assert "did not reach a step boundary within 6s of SIGTERM" in done.result["error"]
    stop = "stop requested; checkpoint at the next step boundary"
    assert records(done.log, stop)  # seen at once, by the watchdog thread, not after the call returned
    assert 5.5 < elapsed < grace


def test_a_recreated_job_never_resumes_the_old_run(
    worker: Any,  # noqa: F811
    s3_client: Minio,
    s3_bucket: str,
) -> None:
    params = {"baseModel": "tiny", "dataset": {"text": TEXTS}, "epochs": 400, "rank": 4}
    prefix = "loras/recreated/checkpoints/"

    def interrupted(pod: str, run_params: dict[str, Any]) -> dict[str, Any]:
        w = worker("train_lora", run_params, "recreated", GPUJOB_POD_NAME=pod)
        wait_for_log(w, progressed)
        w.proc.send_signal(signal.SIGTERM)
        done = w.wait(timeout=60)
        assert done.code == ExitCode.INTERRUPTED, done.log
        assert "checkpoint saved" in done.result["error"]
        return done.result["metrics"]

    def keys() -> list[str]:
        objects = s3_client.list_objects(s3_bucket, prefix=prefix, recursive=True)
        return sorted(o.object_name for o in objects if o.object_name)

    first = interrupted("recreated-aaaaa-1", params)
    assert "resumedFromStep" not in first
    saved = keys()
    assert len(saved) == 1
    # The GpuJob deleted and applied again (same name, same params, new uid): starts afresh.
    again = interrupted("recreated-bbbbb-1", params)
    assert "resumedFromStep" not in again and again["ignoredCheckpoints"] == 1
    # The first GpuJob's next attempt still finds its own run.
    resumed = interrupted("recreated-aaaaa-2", params)
    assert resumed["resumedFromStep"] == int(saved[0].rsplit("-", 1)[1].removesuffix(".pt"))
    # New params under the old uid (rank changed): a new run, not a load error; success clears every run.
    done = worker("train_lora", {**params, "epochs": 1, "rank": 8}, "recreated", GPUJOB_POD_NAME="recreated-aaaaa-3")
    finished = done.wait()
    assert finished.code == ExitCode.OK, finished.log
    assert "resumedFromStep" not in finished.result["metrics"]
    assert finished.result["metrics"]["ignoredCheckpoints"] == 3
    assert keys() == []


def test_video_checkpoints_upload_only_the_new_segment(worker: Any, s3_client: Minio, s3_bucket: str) -> None:  # noqa: F811
    import av

    params = {"width": 64, "height": 64, "frames": 300}
    w = worker("render_video", params, "segments", GPUJOB_CHECKPOINT_EVERY_SECONDS="0.2")
    saved = wait_for_log(w, lambda r: r.get("event") == "checkpoint saved" and r.get("step", 0) > 1)
    progress = wait_for_log(w, lambda r: r.get("event") == "progress")
    for line in (saved, progress):  # each line of an attempt names it, also from the saver's and reporter's threads
        assert (line["job_id"], line["attempt"]) == ("segments", 1), line
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait(timeout=60).code == ExitCode.INTERRUPTED
    objects = list(s3_client.list_objects(s3_bucket, prefix="videos/segments/checkpoints/", recursive=True))
    segments = [o for o in objects if "/blobs/segment-" in (o.object_name or "")]
    steps = [o for o in objects if (o.object_name or "").endswith(".pt")]
    assert len(segments) >= 2 and steps
    assert all((o.size or 0) < 4096 for o in steps)  # a checkpoint names segments, it does not carry them
    done = worker("render_video", params, "segments", GPUJOB_ATTEMPT="2").wait()
    assert done.code == ExitCode.OK, done.log
    response = s3_client.get_object(s3_bucket, "videos/segments/video.mp4")
    with av.open(io.BytesIO(response.read())) as container:
        assert sum(1 for _ in container.decode(video=0)) == 300


def test_the_worker_runs_against_a_local_directory_store(
    worker: Any,  # noqa: F811
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    done = worker("train_voice", {"epochs": 1, "stepsPerEpoch": 2}, GPUJOB_S3_ENDPOINT=f"file://{tmp_path}").wait()
    assert done.code == ExitCode.OK, done.log
    assert len(done.result["artifacts"]) == 3
    for artifact in done.result["artifacts"]:
        data = (tmp_path / s3_bucket / artifact["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"] and len(data) == artifact["size"]


# --- in-process, against a SeaweedFS of the test's own (it gets stopped or paused) ----------------------


@pytest.fixture
def own_s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


def store_of(server: S3Server, attempts: int = 1) -> ArtifactStore:
    settings = Settings(**{k.removeprefix("GPUJOB_").lower(): v for k, v in server.env("ckpt").items()})
    store = ArtifactStore(make_client(settings), "ckpt", attempts=attempts)
    store.ensure_bucket()
    return store


def context(store: Any, tmp_path: Path, checkpoint_every: float = 3600.0) -> TaskContext:
    return TaskContext(
        job_id="j",
        job_type="train_voice",
        attempt=1,
        params={},
        devices=Devices(torch.device("cpu")),
        models_dir=tmp_path,
        workdir=tmp_path,
        prefix="voices/j/",
        store=store,
        reporter=ProgressReporter("j", 1, None),
        stop_event=threading.Event(),
        checkpoint_every=checkpoint_every,
        checkpoints=Checkpoints(store, "voices/j/checkpoints/", "run-a"),
    )


def test_run_key_changes_with_params_base_model_and_job_uid() -> None:
    base = run_key("train_lora", {"rank": 8}, "model-1", "aaaaa")
    assert base == run_key("train_lora", {"rank": 8}, "model-1", "aaaaa")
    others = [
        run_key("train_lora", {"rank": 4}, "model-1", "aaaaa"),
        run_key("train_lora", {"rank": 8}, "model-2", "aaaaa"),
        run_key("train_lora", {"rank": 8}, "model-1", "bbbbb"),
        run_key("train_voice", {"rank": 8}, "model-1", "aaaaa"),
    ]
    assert base not in others and len(set(others)) == 4
    assert WorkerEnv(pod_name="my-job-with-a-long-name-3f2a1-12").job_uid == "3f2a1"
    assert WorkerEnv(pod_name=None).job_uid == ""


def test_an_s3_outage_during_resume_is_transient_never_no_checkpoint(own_s3: S3Server) -> None:
    checkpoints = Checkpoints(store_of(own_s3), "voices/j/checkpoints/", "run-a")
    checkpoints.save(10, {"w": torch.ones(3)})
    newest = checkpoints.candidates()
    assert checkpoints.load(newest[0]) is not None
    own_s3.process.stop(grace=1.0)  # S3 goes away between the listing and the download
    with pytest.raises(TransientError, match="S3 get"):
        checkpoints.load(newest[0])
    with pytest.raises(TransientError):
        checkpoints.latest()


def test_pruning_keeps_what_a_resumed_run_writes(own_s3: S3Server) -> None:
    checkpoints = Checkpoints(store_of(own_s3), "voices/j/checkpoints/", "run-a")
    for step in (5, 50):
        checkpoints.save(step, {"value": step})
    checkpoints.store.put_bytes(checkpoints.key(900), b"torn")  # cut short by a SIGKILL
    assert checkpoints.latest() == {"value": 50, "step": 50, "run": "run-a"}  # the torn one is skipped
    checkpoints.save(60, {"value": 60})  # the resumed run's next save stays; the torn higher step goes
    assert checkpoints.store.list_keys("voices/j/") == [checkpoints.key(50), checkpoints.key(60)]
    other = Checkpoints(checkpoints.store, "voices/j/checkpoints/", "run-b")
    assert other.latest() is None and other.ignored == [checkpoints.key(50), checkpoints.key(60)]


def test_sigterm_during_a_periodic_save_does_not_save_twice(own_s3: S3Server, tmp_path: Path) -> None:
    store = store_of(own_s3)
    ctx = context(store, tmp_path, checkpoint_every=0.0)
    calls = []

    def state() -> dict[str, Any]:
        calls.append(1)
        return {"w": torch.full((1024,), float(len(calls)))}

    pid = own_s3.process.proc.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)  # S3 hangs: the periodic save below stays in flight
    try:
        ctx.step_boundary(1, state)
        assert ctx.saver.busy()
        ctx.stop_event.set()  # SIGTERM arrives while that save is being written
        ended: list[BaseException] = []
        stopper = threading.Thread(target=lambda: _catch(ended, ctx.step_boundary, 2, state))
        stopper.start()
    finally:
        os.kill(pid, signal.SIGCONT)
    stopper.join(60)
    assert len(ended) == 1 and isinstance(ended[0], Interrupted)
    assert "checkpoint of step 1 saved (it was being written when the signal came)" in str(ended[0])
    assert calls == [1]  # the state was taken once: no second full save
    assert store.list_keys("voices/j/checkpoints/") == [ctx.checkpoints.key(1)]


def _catch(into: list[BaseException], func: Callable[..., None], *args: Any) -> None:
    try:
        func(*args)
    except BaseException as exc:
        into.append(exc)


def test_exit_143_never_claims_a_checkpoint_that_was_not_written(own_s3: S3Server, tmp_path: Path) -> None:
    ctx = context(store_of(own_s3), tmp_path)
    ctx.save_checkpoint(3, {"w": torch.ones(2)})
    own_s3.process.stop(grace=1.0)
    ctx.stop_event.set()
    with pytest.raises(Interrupted) as info:
        ctx.step_boundary(7, lambda: {"w": torch.ones(2)})
    assert "after step 7; checkpoint NOT saved" in str(info.value)
    assert "the newest checkpoint is of step 3" in str(info.value)


def test_a_failed_cleanup_after_the_upload_does_not_fail_the_job(own_s3: S3Server, tmp_path: Path) -> None:
    ctx = context(store_of(own_s3), tmp_path)
    ctx.save_checkpoint(3, {"w": torch.ones(2)})
    own_s3.process.stop(grace=1.0)
    ctx.finish_checkpoints()  # no exception
    assert ctx.metrics["checkpointCleanupFailed"] == 1.0


def test_a_checkpoint_that_could_not_be_loaded_back_fails_when_saved(tmp_path: Path) -> None:
    state = {"adapter": {"w": torch.ones(2)}, "rng": {"numpy": np.random.get_state()}}
    buf = io.BytesIO()
    torch.save(state, buf)
    with pytest.raises(Exception, match="Weights only load failed"):  # what the next attempt would have met
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    with pytest.raises(TypeError, match=r"state\.rng\.numpy\[1\]: a numpy\.ndarray is not loadable"):
        check_loadable(state)
    ctx = context(DirStore(tmp_path / "store", "b"), tmp_path, checkpoint_every=0.0)
    with pytest.raises(TypeError, match="not loadable"):
        ctx.step_boundary(1, lambda: state)
    check_loadable({"ok": [torch.ones(1), 1, 2.0, "x", None, (torch.float32, torch.Size([2]))]})
