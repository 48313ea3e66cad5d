"""`gpujob watch` against a real redis-server: catch-up from the latest state, follow, drop what the catch-up
already showed, exit codes, and the progress bar on a terminal. Events are published the way the operator and
the worker publish them (SyncEventPublisher); the end-to-end version with the operator is in test_events.py."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import redis

from gpujob.events import SyncEventPublisher, make_event
from gpujob.settings import Settings


def watch(redis_url: str, *args: str, tty: bool = False) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_")}
    env["GPUJOB_REDIS_URL"] = redis_url
    argv = [sys.executable, "-m", "gpujob.cli", "watch", *args]
    if not tty:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdout=secondary, text=True)
    os.close(secondary)
    proc.pty = primary  # type: ignore[attr-defined]
    return proc


def publisher(redis_url: str, client: redis.Redis) -> SyncEventPublisher:
    return SyncEventPublisher(client, Settings(redis_url=redis_url))


def subscribed(client: redis.Redis, job_id: str, timeout: float = 10) -> None:
    """Wait until the watcher has subscribed (so what we publish next is live, not catch-up)."""
    deadline = time.monotonic() + timeout
    while not client.pubsub_numsub(f"gpujobs:progress:{job_id}")[0][1]:
        assert time.monotonic() < deadline, "the watcher never subscribed"
        time.sleep(0.02)


@pytest.mark.parametrize(("final", "code"), [("succeeded", 0), ("failed", 1), ("cancelled", 1)])
def test_a_finished_job_prints_its_final_state_and_exits_at_once(
    redis_url: str, redis_client: redis.Redis, final: str, code: int
) -> None:
    pub = publisher(redis_url, redis_client)
    pub.publish(make_event("done-1", "running", 50.0))
    pub.publish(make_event("done-1", final, 100.0 if final == "succeeded" else 50.0))
    proc = watch(redis_url, "done-1", "--json")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == code
    [event] = [json.loads(line) for line in out.splitlines()]
    assert event["status"] == final and event["seq"] == 2


def test_late_watcher_catches_up_then_follows_without_repeats(redis_url: str, redis_client: redis.Redis) -> None:
    pub = publisher(redis_url, redis_client)
    for status, progress in (("queued", 0.0), ("scheduled", 0.0), ("running", 30.0)):
        pub.publish(make_event("follow-1", status, progress))
    proc = watch(redis_url, "follow-1", "--json", "--timeout", "30")
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    assert (first["status"], first["seq"]) == ("running", 3), "only the latest state, not the history"
    subscribed(redis_client, "follow-1")
    redis_client.publish("gpujobs:progress:follow-1", json.dumps({**first, "progress": 99.0}))  # a repeat of seq 3
    pub.publish(make_event("follow-1", "running", 70.0, "Epoch 7/10"))
    pub.publish(make_event("follow-1", "succeeded", 100.0))
    rest = [json.loads(line) for line in proc.stdout]
    assert proc.wait(10) == 0
    assert [(e["status"], e["progress"], e["seq"]) for e in rest] == [("running", 70.0, 4), ("succeeded", 100.0, 5)]


def test_watching_a_job_with_no_events_yet_waits_for_them_and_times_out(
    redis_url: str, redis_client: redis.Redis
) -> None:
    proc = watch(redis_url, "not-yet", "--json", "--timeout", "1")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3 and out == ""


def test_progress_bar_on_a_terminal(redis_url: str, redis_client: redis.Redis) -> None:
    pub = publisher(redis_url, redis_client)
    pub.publish(make_event("tty-1", "running", 25.0, "Epoch 1/4"))
    proc = watch(redis_url, "tty-1", "--timeout", "30", tty=True)
    subscribed(redis_client, "tty-1")
    # The catch-up line must be on screen before the next event: otherwise the watcher may read the state after
    # it, show only the end, and rightly stop there.
    screen = b""
    deadline = time.monotonic() + 30
    while b"25.0%" not in screen:
        assert time.monotonic() < deadline, f"no catch-up line: {screen!r}"
        if select.select([proc.pty], [], [], 0.1)[0]:  # type: ignore[attr-defined]
            screen += os.read(proc.pty, 4096)  # type: ignore[attr-defined]
    pub.publish(make_event("tty-1", "succeeded", 100.0, "done"))
    assert proc.wait(30) == 0
    while True:
        try:
            chunk = os.read(proc.pty, 4096)  # type: ignore[attr-defined]
        except OSError:  # EIO: the watcher closed its end
            break
        if not chunk:
            break
        screen += chunk
    os.close(proc.pty)  # type: ignore[attr-defined]
    text = screen.decode()
    assert "\rtty-1 [#####..............." in text and "25.0%" in text and "Epoch 1/4" in text
    assert "\rtty-1 [####################] 100.0% succeeded" in text
