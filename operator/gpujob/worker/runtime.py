"""One attempt of one job: parse, set up, run the task, map every way it can end to an Outcome."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpujob.api import Artifact, ExitCode
from gpujob.logging import get_logger
from gpujob.settings import Settings
from gpujob.worker.artifacts import ArtifactStore
from gpujob.worker.context import TaskContext, pick_device
from gpujob.worker.errors import BadInput, Interrupted, WorkerError
from gpujob.worker.progress import ProgressReporter, set_current
from gpujob.worker.task import Task, load_task

log = get_logger("gpujob.worker")


@dataclass
class Outcome:
    exit_code: int
    artifacts: list[Artifact] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


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


def run_job(settings: Settings, stop: threading.Event) -> Outcome:
    ctx: TaskContext | None = None
    reporter: ProgressReporter | None = None
    workdir = Path(tempfile.mkdtemp(prefix="gpujob-worker-"))
    try:
        # Input first, without touching the network: bad input must not look like an outage.
        job_id, task = job_task(settings)
        params = task.parse_params(job_params(settings))
        device = pick_device()
        log.info("device selected", device=str(device), cuda=torch.cuda.is_available(), job_id=job_id)
        reporter = ProgressReporter.from_settings(settings, job_id)
        set_current(reporter)
        store = ArtifactStore.from_settings(settings)
        store.ensure_bucket()
        ctx = TaskContext(
            job_id=job_id,
            job_type=task.name,
            attempt=settings.attempt,
            params=params.model_dump(),
            device=device,
            models_dir=Path(settings.models_dir),
            workdir=workdir,
            prefix=f"{task.prefix}/{job_id}/",
            store=store,
            reporter=reporter,
            stop_event=stop,
            checkpoint_every=settings.checkpoint_every_seconds,
        )
        ctx.report_progress(0, f"attempt {settings.attempt} started on {device.type}")
        ctx.metrics.update(task.run(ctx, params))
        ctx.checkpoints.clear()  # done: a re-run of the same jobId starts afresh
        ctx.report_progress(100, "done")
        log.info("job succeeded", job_id=job_id, artifacts=len(ctx.artifacts), metrics=ctx.metrics)
        return Outcome(ExitCode.OK, ctx.artifacts, ctx.metrics)
    except WorkerError as exc:
        level = "warning" if isinstance(exc, Interrupted) else "error"
        getattr(log, level)("job ended", exit_code=exc.exit_code, error=str(exc))
        return _failed(ctx, exc.exit_code, str(exc))
    except Exception as exc:  # the task's own failure: the operator retries it within the job's limit
        log.exception("task failed")
        return _failed(ctx, ExitCode.TASK_FAILED, f"{type(exc).__name__}: {exc}")
    finally:
        if reporter is not None:
            reporter.close()
            set_current(None)
        shutil.rmtree(workdir, ignore_errors=True)


def _failed(ctx: TaskContext | None, code: int, error: str) -> Outcome:
    if ctx is None:
        return Outcome(code, error=error)
    return Outcome(code, ctx.artifacts, ctx.metrics, error)
