"""The README's Node client (tests/node/client.mjs) against a real redis-server: a backend that connects late
catches up from the latest state, then follows, without duplicates or gaps; and the README shows that code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import redis

from gpujob.events import SyncEventPublisher, make_event
from gpujob.settings import Settings
from tests.support.node import NODE_DIR, lines_until_ready, node_backend

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "operator" / "gpujob" / "bridge" / "README.md"


def test_readme_shows_the_tested_node_client() -> None:
    match = re.search(r"### Example: a Node backend[^\n]*\n\n```js\n(.*?)```", README.read_text(), re.S)
    assert match, "the README's JS example"
    tested = (NODE_DIR / "client.mjs").read_text().split("\n", 1)[1]  # without the header comment
    assert match.group(1) == tested


def test_late_node_backend_catches_up_then_follows(redis_url: str, redis_client: redis.Redis) -> None:
    publisher = SyncEventPublisher(redis_client, Settings(redis_url=redis_url))
    for status, progress in (("queued", 0.0), ("scheduled", 0.0), ("running", 40.0)):
        publisher.publish(make_event("late-js", status, progress, phase=status.capitalize(), attempt=1))
    backend = node_backend("catchup.test.mjs", REDIS_URL=redis_url, JOB_ID="late-js", TIMEOUT_MS="30000")
    try:
        lines = lines_until_ready(backend)
        [(_, fields)] = redis_client.xrange("gpujobs:requests")
        assert json.loads(fields["job"])["jobId"] == "late-js", "the backend submitted after catching up"
        publisher.publish(make_event("late-js", "running", 60.0, "Epoch 2/2", phase="Running", attempt=1))
        publisher.publish(make_event("late-js", "succeeded", 100.0, phase="Succeeded", attempt=1))
        rest, _ = backend.communicate(timeout=30)
    finally:
        backend.kill()
    assert backend.returncode == 0, "\n".join(lines) + rest
    events = [json.loads(line) for line in [*lines, *rest.splitlines()] if line.startswith("{")]
    assert [(e["status"], e["progress"], e["seq"]) for e in events] == [
        ("running", 40.0, 3),  # the catch-up: only the latest state, not the history
        ("running", 60.0, 4),
        ("succeeded", 100.0, 5),
    ]
    assert rest.strip().endswith("DONE")
