"""The worker's own exit codes for GPU trouble get reasons of their own in GpuJob.status (pure status logic)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gpujob.api import ExitCode, Phase, Reason
from gpujob.operator.podview import PodView
from gpujob.operator.status import decide
from tests.support.bridge import with_valid_params

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("code", "reason", "error"),
    [
        (ExitCode.OUT_OF_MEMORY, Reason.OUT_OF_MEMORY, "CUDA out of memory (peak 78.20 GiB allocated): ..."),
        (ExitCode.GPU_UNAVAILABLE, Reason.GPU_UNAVAILABLE, "1 GPU(s) requested but CUDA is unavailable: no driver"),
        (ExitCode.TASK_FAILED, Reason.ERROR, "ValueError: boom"),
    ],
)
def test_worker_exit_codes_map_to_reasons(code: int, reason: Reason, error: str) -> None:
    body = {
        "metadata": {"name": "j", "uid": "u-1", "generation": 1},
        "spec": with_valid_params({"type": "train_lora"}),
        "status": {},
    }
    body["status"] = decide(body, [], T0).status.wire()
    result = json.dumps({"artifacts": [], "metrics": {}, "error": error, "exitCode": code})
    pod = PodView(name="j-1", attempt=1, phase="Failed", created=T0, exit_code=code, result=result)
    d = decide(body, [pod], T0)
    assert d.status.phase is Phase.RETRYING  # retried by default; nonRetryableExitCodes can list them
    assert d.status.reason == reason and error in d.status.message
    assert d.status.exit_code == code
