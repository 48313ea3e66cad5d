"""The progress event published on `gpujobs:progress:<jobId>` and appended to `gpujobs:events`."""

from __future__ import annotations

from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from gpujob.api.constants import TERMINAL_PHASES

# A request that never became a GpuJob (dead-lettered by the intake): the event status is not a phase, since no
# GpuJob has one. Its `reason` is the dead letter's; final like the terminal phases.
REJECTED: Final = "rejected"
# A job moved to CPU (spec.fallback): sent just before the `scheduled` event of its first CPU attempt; not final.
FALLBACK: Final = "fallback"
# Every event status after which nothing more comes for the job (what `gpujob watch` and a backend stop on).
FINAL_STATUSES: Final = frozenset({*(p.event_status for p in TERMINAL_PHASES), REJECTED})


class ProgressEvent(BaseModel):
    """JSON event for the backend (README: the event contract). `status` is the lower-case phase; progress updates
    inside an attempt are `running` events with a new `progress`."""

    model_config = ConfigDict(extra="allow")

    jobId: str
    status: str
    progress: float = Field(ge=0, le=100)
    message: str = ""
    timestamp: str
    phase: str | None = None
    attempt: int | None = None
    seq: int | None = None
    reason: str | None = None
    artifacts: list[dict[str, Any]] | None = None
    source: str | None = None  # "operator" for phase transitions; absent for the worker's own progress
    # While the job waits for its queue's admission (README, "GPU queues"): the queue, the 1-based position
    # (exact for the first GPUJOB_QUEUE_EXACT_POSITIONS, an upper bound behind them) and, once the queue's recent
    # durations allow it, the estimated start (ISO 8601, UTC).
    queue: str | None = None
    position: int | None = Field(default=None, ge=0)
    estimatedStart: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)
