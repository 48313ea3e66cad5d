"""The JSON the operator reads from the termination message (Kubernetes keeps at most 4096 bytes)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gpujob.api import Artifact

MAX_BYTES = 4096
MAX_ERROR_CHARS = 1024


def render(
    artifacts: Sequence[Artifact],
    metrics: Mapping[str, float],
    error: str | None = None,
    exit_code: int | None = None,
    device: Mapping[str, Any] | None = None,
) -> str:
    """Compact JSON under MAX_BYTES: artifacts are dropped from the end (counted in
    `artifactsOmitted`) before anything else; the full list is always in the bucket under the prefix."""
    doc: dict[str, Any] = {
        "artifacts": [a.wire() for a in artifacts],
        # NaN/inf are not JSON: a metric that never got a value is left out.
        "metrics": {k: round(v, 6) for k, v in metrics.items() if math.isfinite(v)},
    }
    if device is not None:  # what the attempt ran on: {"type","count","names","memoryGiB"}
        doc["device"] = dict(device)
    if error is not None:
        doc["error"] = error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 1] + "…"
        doc["exitCode"] = exit_code
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    while len(text.encode()) > MAX_BYTES and doc["artifacts"]:
        doc["artifacts"].pop()
        doc["artifactsOmitted"] = len(artifacts) - len(doc["artifacts"])
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > MAX_BYTES:  # only absurd metrics get here
        doc["metrics"] = {}
        doc.pop("device", None)
        text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return text


def write(path: str, text: str) -> None:
    # Outside a Pod the default /dev/termination-log may not be writable: the logs carry the result then.
    with contextlib.suppress(OSError):
        Path(path).write_text(text)
