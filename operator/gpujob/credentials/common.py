"""What a credential is made for: one GpuJob object (namespace, name, uid) and its jobId, type and inputs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpujob.api.constants import ARTIFACT_PREFIX, JobType
from gpujob.api.naming import job_id_of


@dataclass(frozen=True)
class JobRef:
    namespace: str
    name: str
    uid: str
    job_id: str
    job_type: str = JobType.CUSTOM.value
    input_keys: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> JobRef:
        """From a GpuJob body: inputs are every `s3Key` string anywhere in `spec.params`."""
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            job_id=job_id_of(body),
            job_type=str(spec.get("type") or JobType.CUSTOM.value),
            input_keys=tuple(sorted(set(_s3_keys(spec.get("params"))))),
        )

    @property
    def artifact_prefix(self) -> str:
        """`<loras|voices|videos|jobs>/<jobId>/`: artifacts and checkpoints (`…/checkpoints/<run>/`) of this job."""
        try:
            top = ARTIFACT_PREFIX[JobType(self.job_type)]
        except ValueError:
            top = ARTIFACT_PREFIX[JobType.CUSTOM]
        return f"{top}/{self.job_id}/"

    def check(self) -> None:
        if not (self.namespace and self.name and self.uid and self.job_id):
            raise ValueError(f"a job credential needs namespace, name, uid and jobId: {self}")


def _s3_keys(value: Any) -> Iterator[str]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "s3Key" and isinstance(item, str) and item:
                yield item
            else:
                yield from _s3_keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _s3_keys(item)
