"""The in-Pod worker runtime: `gpujob worker`, the task plug-in point and progress reporting.

Task code imports what it needs from here: `Task`, `TaskContext`, `BadInput`, `report_progress`.
"""

from gpujob.worker.errors import BadInput, Interrupted, TransientError, WorkerError
from gpujob.worker.progress import report_progress
from gpujob.worker.task import Task

__all__ = ["BadInput", "Interrupted", "Task", "TaskContext", "TransientError", "WorkerError", "report_progress"]


def __getattr__(name: str) -> object:
    # TaskContext pulls in torch; plain `report_progress` users shouldn't pay for that.
    if name == "TaskContext":
        from gpujob.worker.context import TaskContext

        return TaskContext
    raise AttributeError(name)
