"""The README's Node client (tests/node/client.mjs, issue 13 item 4): the README.md block is that file, and it
survives a lost connection: node-redis reconnects and subscribes again by itself, and the client catches up from
gpujobs:state with what was published while it was away. The whole flow against the operator is in
test_events.py (tests/node/backend.test.mjs)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import redis

from gpujob.events import SyncEventPublisher, make_event
from gpujob.settings import Settings
from tests.support.node import NODE_DIR, lines_until_ready, node_backend

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_shows_the_tested_node_client() -> None:
    blocks = re.findall(r"```js\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    tested = (NODE_DIR / "client.mjs").read_text().split("\n", 1)[1]  # without the header comment
    assert tested in blocks, "README.md's Node backend block is tests/node/client.mjs"
    assert '"rejected"' in tested and "reconnectStrategy" in tested and "unsubscribe" in tested


def test_the_node_client_catches_up_after_its_connection_is_killed(redis_url: str, redis_client: redis.Redis) -> None:
    publisher = SyncEventPublisher(redis_client, Settings(redis_url=redis_url))
    publisher.publish(make_event("cut-js", "running", 40.0, phase="Running", attempt=1))
    backend = node_backend("catchup.test.mjs", REDIS_URL=redis_url, JOB_ID="cut-js", TIMEOUT_MS="30000")
    try:
        lines = lines_until_ready(backend)
        # Kill the client's Pub/Sub connection and publish the job's end while it is away (not subscribed).
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "could not catch the client between connections"
            redis_client.client_kill_filter(_type="pubsub")
            if publisher.client.pubsub_numsub("gpujobs:progress:cut-js")[0][1] == 0:
                publisher.publish(make_event("cut-js", "succeeded", 100.0, phase="Succeeded", attempt=1))
                break
        rest, _ = backend.communicate(timeout=30)
    finally:
        backend.kill()
    assert backend.returncode == 0, "\n".join(lines) + rest
    events = [json.loads(line) for line in [*lines, *rest.splitlines()] if line.startswith("{")]
    assert [(e["status"], e["seq"]) for e in events] == [("running", 1), ("succeeded", 2)]
    assert rest.strip().endswith("DONE")
