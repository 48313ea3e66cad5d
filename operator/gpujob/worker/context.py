"""What a running task gets: device, identity, params, progress, stop flag, checkpoints and uploads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpujob.api import Artifact
from gpujob.logging import get_logger
from gpujob.worker.artifacts import Store
from gpujob.worker.checkpoints import Checkpoints, Saver, check_loadable, snapshot
from gpujob.worker.devices import Devices
from gpujob.worker.errors import Interrupted
from gpujob.worker.paths import model_dir
from gpujob.worker.progress import ProgressReporter

log = get_logger(__name__)


@dataclass
class TaskContext:
    job_id: str
    job_type: str
    attempt: int
    params: Mapping[str, Any]
    devices: Devices
    models_dir: Path
    workdir: Path
    prefix: str  # "<prefix>/<jobId>/": every key this job writes starts with it
    store: Store
    reporter: ProgressReporter
    stop_event: threading.Event
    checkpoint_every: float
    checkpoints: Checkpoints
    artifacts: list[Artifact] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    _last_checkpoint: float = field(default_factory=time.monotonic)
    _saver: Saver | None = None

    @property
    def device(self) -> torch.device:
        return self.devices.device

    @property
    def saver(self) -> Saver:
        if self._saver is None:
            self._saver = Saver(self.checkpoints)
        return self._saver

    def report_progress(self, percent: float, message: str = "") -> None:
        self.reporter.report(percent, message)

    def should_stop(self) -> bool:
        return self.stop_event.is_set()

    def model_path(self, base_model: str) -> Path:
        """A model directory inside the models volume (BadInput if it leaves it or holds no model)."""
        return model_dir(self.models_dir, base_model)

    def read_object(self, key: str) -> bytes:
        return self.store.get_bytes(key)

    def download(self, key: str, name: str) -> Path:
        """The object into the workdir (BadInput if it does not exist); for inputs too big for memory."""
        path = self.workdir / name
        self.store.download(key, path)
        return path

    def upload(self, path: Path, name: str, content_type: str = "application/octet-stream") -> Artifact:
        artifact = self.store.upload(path, f"{self.prefix}{name}", content_type)
        self.artifacts.append(artifact)
        return artifact

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint of this run (any earlier attempt), or None; records where it resumed.
        TransientError (exit 75) when S3 fails: an outage never restarts the job from step 0."""
        state = self.checkpoints.latest()
        if self.checkpoints.ignored:
            self.metrics["ignoredCheckpoints"] = float(len(self.checkpoints.ignored))
        if state is not None:
            self.metrics["resumedFromStep"] = float(state["step"])
            log.info("resuming from checkpoint", step=state["step"], attempt=self.attempt)
        return state

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        """Save now, on this thread (waits for a background save in flight first)."""
        self.saver.wait()
        self.saver.save_now(step, snapshot(state))
        self._last_checkpoint = time.monotonic()

    def step_boundary(self, step: int, state: Callable[[], dict[str, Any]]) -> None:
        """Call between steps (`step` = steps done). Starts a background checkpoint when one is due, and on
        SIGTERM saves one and raises Interrupted. `state` is called only then, so it may be costly: its
        tensors are copied off the GPU here, serialized and uploaded on the saver's thread."""
        if self.stop_event.is_set():
            self._stop(step, state)
        saver = self.saver
        if saver.busy():
            return
        saver.wait()  # collect a finished save: its error (S3 down) ends the attempt here
        if time.monotonic() - self._last_checkpoint >= self.checkpoint_every:
            current = state()
            check_loadable(current)  # a state that could not be loaded back fails now, on this thread
            saver.submit(step, snapshot(current))
            self._last_checkpoint = time.monotonic()

    def _stop(self, step: int, state: Callable[[], dict[str, Any]]) -> None:
        saver = self.saver
        try:
            inflight = saver.busy()
            saved = saver.wait()
            if inflight and saved is not None:  # SIGTERM during a periodic save: that one is the checkpoint
                raise Interrupted(
                    f"stopped by SIGTERM after step {step}; checkpoint of step {saved.step} saved "
                    "(it was being written when the signal came)"
                )
            if saved is None or saved.step != step:
                saved = saver.save_now(step, snapshot(state()))
        except Interrupted:
            raise
        except Exception as exc:
            last = f"; the newest checkpoint is of step {saver.last.step}" if saver.last else ""
            raise Interrupted(f"stopped by SIGTERM after step {step}; checkpoint NOT saved: {exc}{last}") from exc
        raise Interrupted(f"stopped by SIGTERM after step {step}; checkpoint saved")

    def finish_checkpoints(self) -> None:
        """After the task returned: let a background save end, then delete every checkpoint of the job.
        A failure here is logged, never the job's failure: its artifacts are already uploaded."""
        try:
            if self._saver is not None:
                self._saver.wait()
            self.checkpoints.clear()
        except Exception as exc:
            self.metrics["checkpointCleanupFailed"] = 1.0
            log.warning("checkpoints not deleted; they are ignored by any other run", error=str(exc))

    def close(self) -> None:
        if self._saver is not None:
            self._saver.close()
