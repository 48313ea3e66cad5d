"""Which task types can run on CPU (spec.fallback, docs/queues.md): a job whose type cannot is never moved off
its GPU, however long it waits.

- `train_lora`, `train_voice`: yes. The worker trains on CPU when its Pod has no GPU (slower, same result: LoRA
  training is deterministic on a device, and checkpoints resume across devices).
- `render_video`: no. It stands in for video generation (a diffusion model), which is not usable on CPU: an
  attempt there would hold a node for hours and likely miss any deadline; better to wait for a GPU.
- `custom`: only the job knows; a `custom` job that sets `spec.fallback` says its command runs without a GPU.
"""

from __future__ import annotations

from typing import Final

from gpujob.api.constants import JobType
from gpujob.api.models import GpuJobSpec

RUNS_ON_CPU: Final[dict[JobType, bool]] = {
    JobType.TRAIN_LORA: True,
    JobType.TRAIN_VOICE: True,
    JobType.RENDER_VIDEO: False,
    JobType.CUSTOM: True,  # when it sets spec.fallback (it is the job's own statement)
}


def runs_on_cpu(spec: GpuJobSpec) -> bool:
    """May this job's attempts run on CPU? Only a job that asks (spec.fallback) and whose type can."""
    return spec.fallback is not None and RUNS_ON_CPU[spec.type]
