"""Failures the worker maps to exit codes (gpujob.api.ExitCode); anything else a task raises exits 70."""

from __future__ import annotations

from gpujob.api import ExitCode


class WorkerError(Exception):
    exit_code: int = ExitCode.TASK_FAILED


class BadInput(WorkerError):
    """The job can never succeed as submitted (unknown type, invalid params, missing base model): no retry."""

    exit_code = ExitCode.BAD_INPUT


class TransientError(WorkerError):
    """An outside service failed (S3 unreachable, ...): another attempt may succeed."""

    exit_code = ExitCode.TRANSIENT


class Interrupted(WorkerError):
    """SIGTERM: the next attempt resumes from the newest checkpoint (the message says which one, if any)."""

    exit_code = ExitCode.INTERRUPTED


class GpuUnavailable(WorkerError):
    """The Pod was given GPUs but CUDA is not usable: fail now instead of training on CPU for hours."""

    exit_code = ExitCode.GPU_UNAVAILABLE


class OutOfMemory(WorkerError):
    """CUDA ran out of memory where the task could not adapt (e.g. already at micro-batch 1)."""

    exit_code = ExitCode.OUT_OF_MEMORY
