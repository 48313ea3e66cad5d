"""The plug-in point: a Task parses its params (pydantic) and runs with a TaskContext.

Tasks are found through the `gpujob.tasks` entry-point group, so a package of its own can add job types
(see README.md in this folder).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from gpujob.api import ARTIFACT_PREFIX, JobType
from gpujob.worker.errors import BadInput

if TYPE_CHECKING:
    from gpujob.worker.context import TaskContext

ENTRY_POINT_GROUP = "gpujob.tasks"
ParamsT = TypeVar("ParamsT", bound=BaseModel)


class Task(Generic[ParamsT]):
    """Subclass with `params_model` (pydantic, extra="forbid" advised) and `run()`, which returns
    final metrics (numbers). Upload outputs with `ctx.upload()`; call `ctx.step_boundary()` between steps."""

    name: ClassVar[str] = "custom"
    prefix: ClassVar[str] = ARTIFACT_PREFIX[JobType.CUSTOM]  # artifacts go to <prefix>/<jobId>/
    params_model: type[ParamsT]

    def parse_params(self, raw: Mapping[str, Any]) -> ParamsT:
        try:
            return self.params_model.model_validate(raw)
        except ValidationError as exc:
            raise BadInput(f"invalid params for {self.name}: {describe(exc)}") from exc

    def identity(self, models_dir: Path, params: ParamsT) -> str:
        """What else, besides the params, makes this run's result: e.g. a fingerprint of the base model.
        Part of the checkpoint run key, so a changed input never resumes an old run. Called before the
        task runs; may raise BadInput."""
        return ""

    def run(self, ctx: TaskContext, params: ParamsT) -> dict[str, float]:
        raise NotImplementedError


def describe(exc: ValidationError) -> str:
    """One line per problem, e.g. `dataset: Field required; extraField: Extra inputs are not permitted`."""
    parts = [f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()]
    return "; ".join(parts)


def available() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_task(job_type: str) -> Task[Any]:
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == job_type]
    if not matches:
        raise BadInput(f"unknown job type {job_type!r}; installed: {', '.join(available()) or 'none'}")
    cls = matches[0].load()
    task = cls()
    if not isinstance(task, Task):
        raise TypeError(f"entry point {job_type} = {matches[0].value} is not a gpujob.worker.Task")
    return task
