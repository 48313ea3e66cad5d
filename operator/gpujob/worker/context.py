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
from gpujob.worker.artifacts import ArtifactStore
from gpujob.worker.checkpoints import Checkpoints
from gpujob.worker.errors import Interrupted
from gpujob.worker.paths import model_dir
from gpujob.worker.progress import ProgressReporter

log = get_logger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TaskContext:
    job_id: str
    job_type: str
    attempt: int
    params: Mapping[str, Any]
    device: torch.device
    models_dir: Path
    workdir: Path
    prefix: str  # "<prefix>/<jobId>/": every key this job writes starts with it
    store: ArtifactStore
    reporter: ProgressReporter
    stop_event: threading.Event
    checkpoint_every: float
    artifacts: list[Artifact] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    _last_checkpoint: float = field(default_factory=time.monotonic)

    @property
    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.store, f"{self.prefix}checkpoints/")

    def report_progress(self, percent: float, message: str = "") -> None:
        self.reporter.report(percent, message)

    def should_stop(self) -> bool:
        return self.stop_event.is_set()

    def model_path(self, base_model: str) -> Path:
        """A model directory inside the models volume (BadInput if it leaves it or holds no model)."""
        return model_dir(self.models_dir, base_model)

    def read_object(self, key: str) -> bytes:
        return self.store.get_bytes(key)

    def upload(self, path: Path, name: str, content_type: str = "application/octet-stream") -> Artifact:
        artifact = self.store.upload(path, f"{self.prefix}{name}", content_type)
        self.artifacts.append(artifact)
        return artifact

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint of this job (any earlier attempt), or None; records where it resumed."""
        state = self.checkpoints.latest()
        if state is not None:
            self.metrics["resumedFromStep"] = float(state["step"])
            log.info("resuming from checkpoint", step=state["step"], attempt=self.attempt)
        return state

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        self.checkpoints.save(step, state)
        self._last_checkpoint = time.monotonic()

    def step_boundary(self, step: int, state: Callable[[], dict[str, Any]]) -> None:
        """Call between steps (`step` = steps done). Saves a checkpoint when one is due, and on SIGTERM
        saves one and raises Interrupted. `state` is called only then, so it may be costly."""
        if self.stop_event.is_set():
            self.save_checkpoint(step, state())
            raise Interrupted(f"stopped by SIGTERM after step {step}; checkpoint saved")
        if time.monotonic() - self._last_checkpoint >= self.checkpoint_every:
            self.save_checkpoint(step, state())
