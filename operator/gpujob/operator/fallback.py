"""CPU fallback (pure; docs/queues.md): when a GPU job that waited too long for a GPU runs its next attempt on CPU.

A job with `spec.fallback` whose type can run on CPU (`gpujob.api.fallback.RUNS_ON_CPU`) and that asks for GPUs is
moved when it has waited `cpuAfterSeconds`:
- for its queue's admission: since its `Admitted` condition turned False (the first plan that left it waiting, or
  its preemption), whatever the reason (QuotaExceeded, QueueNotFound, NamespaceNotAllowed, Preempted);
- or with its attempt's Pod unschedulable: since the Pod was created (the scheduler, or the sandbox's kubelet,
  found no node with a free GPU).
Once moved it stays on CPU (`status.fallback`): its later attempts (retries, a resume) run there too, and it holds
no queue admission, so it counts against no GPU quota. `decide()` applies these; the builder makes the CPU Pod.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from gpujob.api.constants import ConditionType
from gpujob.api.fallback import RUNS_ON_CPU, runs_on_cpu
from gpujob.api.models import GpuJobSpec, GpuJobStatus
from gpujob.operator.conventions import parse_time


@dataclass(frozen=True)
class Verdict:
    move: bool  # run the next attempt on CPU now
    due: datetime | None = None  # when it will be moved if it still waits (None: never)


NEVER = Verdict(False)


def after_waiting(spec: GpuJobSpec, since: datetime | None, now: datetime) -> Verdict:
    """The verdict for a GPU job that has waited for a GPU since `since` (None: not waiting, or not known yet)."""
    if since is None or spec.gpus <= 0 or spec.fallback is None or not runs_on_cpu(spec):
        return NEVER
    due = since + timedelta(seconds=spec.fallback.cpu_after_seconds)
    return Verdict(now >= due, due)


def not_admitted_since(status: GpuJobStatus) -> datetime | None:
    """Since when the job's queue has not admitted it: its Admitted condition's last turn to False."""
    held = next((c for c in status.conditions if c.type == ConditionType.ADMITTED), None)
    if held is None or held.status != "False":
        return None
    return parse_time(held.last_transition_time)


def unsupported(spec: GpuJobSpec) -> str | None:
    """Why a job that asks for fallback is never moved (its type cannot run on CPU); None when it is not so."""
    if spec.fallback is None or spec.gpus <= 0 or RUNS_ON_CPU[spec.type]:
        return None
    return f"{spec.type.value} cannot run on CPU: spec.fallback is ignored, the job waits for a GPU"
