"""One attempt of one job: parse, set up, run the task, map every way it can end to an AttemptOutcome."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpujob.api import Artifact, ExitCode
from gpujob.logging import bind_job, get_logger
from gpujob.settings import Settings
from gpujob.worker import devices as devices_mod
from gpujob.worker.artifacts import store_from_settings
from gpujob.worker.checkpoints import Checkpoints
from gpujob.worker.context import TaskContext
from gpujob.worker.env import WorkerEnv
from gpujob.worker.errors import BadInput, Interrupted, OutOfMemory, WorkerError
from gpujob.worker.progress import ProgressReporter, set_current
from gpujob.worker.task import Task, load_task

log = get_logger("gpujob.worker")


@dataclass
class AttemptOutcome:
    exit_code: int
    artifacts: list[Artifact] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    device: dict[str, Any] | None = None


def job_params(settings: Settings) -> dict[str, Any]:
    try:
        raw = json.loads(settings.job_params)
    except json.JSONDecodeError as exc:
        raise BadInput(f"GPUJOB_JOB_PARAMS is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BadInput("GPUJOB_JOB_PARAMS must be a JSON object")
    return raw


def job_task(settings: Settings) -> tuple[str, Task[Any]]:
    if not settings.job_id:
        raise BadInput("GPUJOB_JOB_ID is not set")
    if not settings.job_type:
        raise BadInput("GPUJOB_JOB_TYPE is not set")
    return settings.job_id, load_task(settings.job_type)


def run_key(job_type: str, params: dict[str, Any], identity: str, job_uid: str) -> str:
    """The checkpoint run: a different job type, params, base model or GpuJob uid never resumes this one."""
    doc = json.dumps([job_type, params, identity, job_uid], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def out_of_memory(exc: BaseException) -> OutOfMemory:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    peak = devices_mod.peak_memory_gib()
    return OutOfMemory(f"CUDA out of memory (peak {peak:.2f} GiB allocated): {first}")


def run_job(settings: Settings, stop: threading.Event, env: WorkerEnv | None = None) -> AttemptOutcome:
    """One attempt; every line it logs (ours, the libraries') carries its job_id and attempt."""
    if not settings.job_id:
        return _run_job(settings, stop, env)  # fails as bad input, with nothing to bind
    with bind_job(settings.job_id, settings.attempt):
        return _run_job(settings, stop, env)


def _run_job(settings: Settings, stop: threading.Event, env: WorkerEnv | None) -> AttemptOutcome:
    env = env or WorkerEnv()
    ctx: TaskContext | None = None
    reporter: ProgressReporter | None = None
    devices: devices_mod.Devices | None = None
    workdir = Path(tempfile.mkdtemp(prefix="gpujob-worker-"))
    try:
        # Input first, without touching the network: bad input must not look like an outage.
        job_id, task = job_task(settings)
        params = task.parse_params(job_params(settings))
        models_dir = Path(settings.models_dir)
        run = run_key(task.name, params.model_dump(mode="json"), task.identity(models_dir, params), env.job_uid)
        devices = devices_mod.select(env.requested_gpus())
        log.info("run", job_id=job_id, run=run, cuda=torch.cuda.is_available(), job_uid=env.job_uid or None)
        reporter = ProgressReporter.from_settings(settings, job_id)
        set_current(reporter)
        store = store_from_settings(settings)
        store.ensure_bucket()
        prefix = f"{task.prefix}/{job_id}/"
        ctx = TaskContext(
            job_id=job_id,
            job_type=task.name,
            attempt=settings.attempt,
            params=params.model_dump(),
            devices=devices,
            models_dir=models_dir,
            workdir=workdir,
            prefix=prefix,
            store=store,
            reporter=reporter,
            stop_event=stop,
            checkpoint_every=settings.checkpoint_every_seconds,
            checkpoints=Checkpoints(store, f"{prefix}checkpoints/", run),
        )
        where = f"{devices.count} x {devices.names[0]}" if devices.count else "cpu"
        ctx.report_progress(0, f"attempt {settings.attempt} started on {where}")
        ctx.metrics.update(task.run(ctx, params))
        ctx.metrics.update(devices.metrics())
        ctx.finish_checkpoints()  # done: a re-run of the same jobId starts afresh
        ctx.report_progress(100, "done")
        log.info("job succeeded", job_id=job_id, artifacts=len(ctx.artifacts), metrics=ctx.metrics)
        return AttemptOutcome(ExitCode.OK, ctx.artifacts, ctx.metrics, device=devices.describe())
    except WorkerError as exc:
        level = "warning" if isinstance(exc, Interrupted) else "error"
        getattr(log, level)("job ended", exit_code=exc.exit_code, error=str(exc))
        return _failed(ctx, devices, exc.exit_code, str(exc))
    except torch.OutOfMemoryError as exc:  # anywhere the task did not handle it (model load, eval, ...)
        oom = out_of_memory(exc)
        log.error("job ended", exit_code=oom.exit_code, error=str(oom))
        return _failed(ctx, devices, oom.exit_code, str(oom))
    except Exception as exc:  # the task's own failure: the operator retries it within the job's limit
        log.exception("task failed")
        return _failed(ctx, devices, ExitCode.TASK_FAILED, f"{type(exc).__name__}: {exc}")
    finally:
        if ctx is not None:
            ctx.close()
        if reporter is not None:
            reporter.close()
            set_current(None)
        shutil.rmtree(workdir, ignore_errors=True)


def _failed(ctx: TaskContext | None, devices: devices_mod.Devices | None, code: int, error: str) -> AttemptOutcome:
    device = devices.describe() if devices is not None else None
    if ctx is None:
        return AttemptOutcome(code, error=error, device=device)
    if devices is not None:
        ctx.metrics.update(devices.metrics())
    return AttemptOutcome(code, ctx.artifacts, ctx.metrics, error, device)
