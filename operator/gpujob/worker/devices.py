"""Which device a job runs on, chosen at run time; a Pod given GPUs never trains on CPU silently."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gpujob.logging import get_logger
from gpujob.worker.errors import GpuUnavailable

GIB = 1024**3
log = get_logger(__name__)


@dataclass
class Devices:
    device: torch.device  # where a single-device task puts its tensors (cuda:0 or cpu)
    names: list[str] = field(default_factory=list)  # every visible CUDA device
    memory_gib: list[float] = field(default_factory=list)
    bf16: bool = False

    @property
    def count(self) -> int:
        return len(self.names)

    def metrics(self) -> dict[str, float]:
        out = {"gpuCount": float(self.count)}
        if self.count:
            out["gpuMemoryGiB"] = round(self.memory_gib[0], 2)
            out["peakGpuMemoryGiB"] = round(peak_memory_gib(), 3)
        return out

    def describe(self) -> dict[str, Any]:
        """For the termination message: the operator keeps metrics, people read this in the Pod's status."""
        return {"type": self.device.type, "count": self.count, "names": self.names, "memoryGiB": self.memory_gib}


def peak_memory_gib() -> float:
    if not torch.cuda.is_available():
        return 0.0
    return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / GIB


def cuda_problem() -> str:
    """Why CUDA is not usable here, in words."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    try:
        torch.cuda.init()  # type: ignore[no-untyped-call]
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    return f"torch.cuda.is_available() is False (device_count={torch.cuda.device_count()})"


def select(requested: int | None) -> Devices:
    """cuda:0 with every visible GPU described, or cpu. GpuUnavailable when GPUs were requested and CUDA
    is unusable (no driver, wrong runtime class, a CPU build of torch): no silent CPU run."""
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        props = [torch.cuda.get_device_properties(i) for i in range(count)]
        devices = Devices(
            torch.device("cuda:0"),
            [p.name for p in props],
            [round(p.total_memory / GIB, 2) for p in props],
            bf16=torch.cuda.is_bf16_supported(),
        )
        # TF32 matmuls on Ampere and newer: ~8x the fp32 throughput for what fp32 is still used for.
        torch.set_float32_matmul_precision("high")
        if requested is not None and requested != count:
            log.warning("visible GPUs differ from the GPUs requested", requested=requested, visible=count)
        log.info("device selected", device="cuda", count=count, names=devices.names, memory_gib=devices.memory_gib)
        return devices
    if requested:
        raise GpuUnavailable(f"{requested} GPU(s) requested but CUDA is unavailable: {cuda_problem()}")
    log.info("device selected", device="cpu", count=0, threads=torch.get_num_threads())
    return Devices(torch.device("cpu"))
