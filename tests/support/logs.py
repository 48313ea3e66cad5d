"""Reading what our code logs as records, not text: the production renderer writes JSON lines
(GPUJOB_LOG_FORMAT=json, see gpujob.logging), one event name and its keys per line (docs/architecture.md, Logs).

`records(text)` parses a subprocess's log file; the `json_logs` fixture renders this process's lines as JSON into
a buffer (for code run in-process, e.g. the bridge) and gives them back the same way.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from gpujob import logging as gjlog


def records(text: str, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON records in `text` (other lines, e.g. a traceback printed before logging was configured, are
    skipped), only those named `event` if given."""
    found = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (event is None or record.get("event") == event):
            found.append(record)
    return found


class JsonLogs:
    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        return records(self.stream.getvalue(), event)


@pytest.fixture
def json_logs() -> Iterator[JsonLogs]:
    """This process's log lines (ours and stdlib's) as JSON records, at DEBUG; logging is restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    gjlog.configure("json", "DEBUG", stream=stream)
    try:
        yield JsonLogs(stream)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
