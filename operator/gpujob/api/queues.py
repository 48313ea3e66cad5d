"""The GpuQueue resource (crds/gpuqueue.yaml): a share of the cluster's GPUs for some teams' GpuJobs."""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Annotated

from pydantic import Field, field_validator

from gpujob.api.models import DNS_LABEL_PATTERN, QUANTITY_PATTERN, WireModel
from gpujob.api.quantity import parse_quantity

QUEUE_PLURAL = "gpuqueues"
QUEUE_KIND = "GpuQueue"


class WithinQueue(StrEnum):
    NEVER = "Never"
    LOWER_PRIORITY = "LowerPriority"


class QueuePreemption(WireModel):
    within_queue: WithinQueue = WithinQueue.LOWER_PRIORITY
    reclaim: bool = True


class GpuQueueSpec(WireModel):
    quota: dict[str, Annotated[str, Field(pattern=QUANTITY_PATTERN)] | int] = Field(max_length=16)
    weight: int = Field(1, ge=1, le=1000)
    borrow: bool = True
    preemption: QueuePreemption = Field(default_factory=QueuePreemption)
    namespaces: list[Annotated[str, Field(max_length=63, pattern=DNS_LABEL_PATTERN)]] = Field(
        default_factory=list, max_length=256
    )

    @field_validator("quota")
    @classmethod
    def _amounts(cls, value: dict[str, str | int]) -> dict[str, str | int]:
        for name, amount in value.items():
            if parse_quantity(amount) < 0:
                raise ValueError(f"quota of {name} must not be negative")
        return value

    def amounts(self) -> dict[str, Decimal]:
        return {name: parse_quantity(amount) for name, amount in self.quota.items()}
