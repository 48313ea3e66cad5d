"""`gpujob watch` against a real redis-server: catch-up from the latest state, follow, drop what the catch-up
already showed, exit codes, and the progress bar on a terminal. Events are published the way the operator and
the worker publish them (SyncEventPublisher); the end-to-end version with the operator is in test_events.py."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import time

import pytest
import redis

from gpujob.events import SyncEventPublisher, make_event
from gpujob.settings import Settings


def watch(redis_url: str, *args: str, tty: bool = False, columns: int = 0) -> subprocess.Popen[str]:
    """`gpujob watch` as a subprocess; with `tty`, on a pseudo-terminal `columns` wide (0: the pty's default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_") and k not in {"COLUMNS", "LINES"}}
    env["GPUJOB_REDIS_URL"] = redis_url
    argv = [sys.executable, "-m", "gpujob.cli", "watch", *args]
    if not tty:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    primary, secondary = pty.openpty()
    if columns:
        fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
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


# --- issue 13 item 8: the CLI fails like a tool; issue 13 item 4: `rejected` ends a watch


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gpujob(*args: str, redis_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_")}
    if redis_url:
        env["GPUJOB_REDIS_URL"] = redis_url
    argv = [sys.executable, "-m", "gpujob.cli", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [("submit", "--cancel", "j1"), ("watch", "j1"), ("watch", "j1", "--json")])
def test_unreachable_redis_is_one_error_line_and_exit_69(args: tuple[str, ...]) -> None:
    url = f"redis://backend:s3cret-Passw0rd@127.0.0.1:{closed_port()}/0"
    done = gpujob(*args, redis_url=url)
    assert done.returncode == 69, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"gpujob {args[0]}: cannot reach Redis at 127.0.0.1:") and "refused" in line, line
    assert "s3cret" not in done.stderr


def test_watch_exits_4_on_a_rejected_request_live_or_caught_up(redis_url: str, redis_client: redis.Redis) -> None:
    pub = publisher(redis_url, redis_client)
    proc = watch(redis_url, "rej-1", "--timeout", "30")
    subscribed(redis_client, "rej-1")
    reason = "invalid request: gpus: Input should be greater than or equal to 0"
    pub.publish(make_event("rej-1", "rejected", 0.0, f"request rejected: {reason}", reason=reason))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 4
    assert out.rstrip().endswith(f"rej-1 rejected 0.0% request rejected: {reason}")
    again = watch(redis_url, "rej-1", "--json")  # late: the state is final already
    out, _ = again.communicate(timeout=30)
    assert again.returncode == 4 and json.loads(out)["reason"] == reason


def test_watch_skips_what_is_not_an_event(redis_url: str, redis_client: redis.Redis) -> None:
    proc = watch(redis_url, "junk-1", "--json", "--timeout", "30")
    subscribed(redis_client, "junk-1")
    for junk in ("{", "[]", json.dumps({"jobId": "junk-1"}), "\xff"):
        redis_client.publish("gpujobs:progress:junk-1", junk)
    publisher(redis_url, redis_client).publish(make_event("junk-1", "succeeded", 100.0))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and [json.loads(line)["status"] for line in out.splitlines()] == ["succeeded"]


def read_screen(fd: int, until: bytes, timeout: float = 30) -> bytes:
    screen = b""
    deadline = time.monotonic() + timeout
    while until not in screen:
        assert time.monotonic() < deadline, f"not on screen: {until!r} in {screen!r}"
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the watcher closed its end
                break
            screen += chunk
    return screen


def visible_lines(screen: str) -> list[str]:
    """What a terminal shows of each line: the text after the last carriage return, escapes removed."""
    return [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line.rsplit("\r", 1)[-1]) for line in screen.split("\n")]


@pytest.mark.parametrize("columns", [80, 40])
def test_the_progress_bar_fits_the_terminal_and_the_final_message_is_whole(
    redis_url: str, redis_client: redis.Redis, columns: int
) -> None:
    job_id = "order-2026-11-22-customer-7781-lora"
    pub = publisher(redis_url, redis_client)
    pub.publish(make_event(job_id, "running", 40.0, "Epoch 2/5 — loss=0.34, " + "lr=2e-4 " * 20))
    proc = watch(redis_url, job_id, "--timeout", "30", tty=True, columns=columns)
    fd: int = proc.pty  # type: ignore[attr-defined]
    subscribed(redis_client, job_id)
    screen = read_screen(fd, b"40.0%")
    cause = ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity; 77.80 GiB already "
             "allocated); micro-batch 1 still does not fit: lower maxSeqLen or use a larger GPU")  # fmt: skip
    pub.publish(make_event(job_id, "failed", 40.0, cause, reason="OutOfMemory"))
    assert proc.wait(30) == 1
    while select.select([fd], [], [], 0.5)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(fd)
    text = screen.decode().replace("\r\n", "\n")  # the pty's line discipline turns \n into \r\n
    bars = [segment for segment in re.split(r"[\r\n]", text) if "%" in segment]
    assert len(bars) == 2, text
    for bar in bars:
        shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", bar)
        assert len(shown) < columns, f"{len(shown)} columns: {shown!r}"
    assert "40.0% running" in bars[0] and "40.0% failed" in bars[1]
    assert f"failed: {cause} (OutOfMemory)" in visible_lines(text), "the whole final message, on its own"
