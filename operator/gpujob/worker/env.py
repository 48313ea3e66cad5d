"""Worker settings beyond gpujob.settings.Settings (GPUJOB_*), read once per process."""

from __future__ import annotations

import os
import re

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpujob.api.constants import POD_TERMINATION_GRACE_SECONDS

STOP_MARGIN_SECONDS = 10.0  # of the grace period, kept for writing the result and exiting
_POD_UID = re.compile(r"-([0-9a-f]{5})-\d+$")  # pod_name(): <job>-<uid5>-<attempt>
# NVIDIA_VISIBLE_DEVICES values that name no GPU. "all" is what CUDA base images set for every container,
# GPU or not: it says nothing about what the device plugin gave this Pod.
_NO_GPUS = frozenset({"", "void", "none", "nodevfiles", "all"})


class WorkerEnv(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPUJOB_", extra="ignore")

    gpus: int | None = Field(None, ge=0, description="GPUs the Pod was given (the GpuJob's spec.gpus).")
    pod_name: str | None = Field(None, description="From the downward API: <job>-<uid5>-<attempt>.")
    termination_grace_seconds: float = Field(
        POD_TERMINATION_GRACE_SECONDS, gt=0, description="The Pod's terminationGracePeriodSeconds."
    )

    @property
    def stop_budget(self) -> float:
        """Seconds from SIGTERM to the worker's own forced exit: inside the grace period, with a margin."""
        grace = self.termination_grace_seconds
        return max(1.0, grace - min(STOP_MARGIN_SECONDS, grace / 4))

    @property
    def job_uid(self) -> str:
        """The GpuJob uid's first 5 hex digits, from the Pod name ('' outside a Pod)."""
        match = _POD_UID.search(self.pod_name or "")
        return match.group(1) if match else ""

    def requested_gpus(self) -> int | None:
        """GPUs this Pod was given: GPUJOB_GPUS when set, else the device plugin's NVIDIA_VISIBLE_DEVICES
        (a list of GPU UUIDs or indices), else None (unknown: a CPU run is not an error then)."""
        if self.gpus is not None:
            return self.gpus
        visible = os.environ.get("NVIDIA_VISIBLE_DEVICES")
        if visible is None or visible.strip().lower() in _NO_GPUS:
            return None
        return len([d for d in visible.split(",") if d.strip()])
