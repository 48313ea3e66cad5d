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
    """SIGTERM: a checkpoint was saved and the next attempt resumes from it."""

    exit_code = ExitCode.INTERRUPTED
