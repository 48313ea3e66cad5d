"""`gpujob bridge | submit | watch | schema`: the Redis side, for operators and for people."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import unicodedata
import uuid
from enum import IntEnum
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpujob.api.constants import Phase
from gpujob.api.events import FINAL_STATUSES, REJECTED, ProgressEvent
from gpujob.api.request import ENTRY_ACTION, ENTRY_JOB, Action, parse_entry, request_schema
from gpujob.events import async_client, sync_client
from gpujob.logging import configure, redact_text, register_secret
from gpujob.settings import Settings, get_settings


class Exit(IntEnum):
    """Exit codes of `gpujob submit`, `watch`, `bridge` and `schema` (README: exit codes; each command's --help)."""

    OK = 0
    FAILED = 1  # watch: the job failed or was cancelled
    USAGE = 2  # argparse's own code for bad arguments; also an invalid request, GPUJOB_REDIS_URL not set
    TIMEOUT = 3  # watch --timeout
    REJECTED = 4  # watch: the request was dead-lettered (sysexits-free range, below 64)
    UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: Redis cannot be reached or refused the command
    INTERRUPTED = 130  # 128 + SIGINT


SUBMIT_EXIT_CODES = """exit codes:
  0   the request is in the stream (its jobId is printed)
  2   bad arguments, an invalid request (the reason is printed), GPUJOB_REDIS_URL not set
  69  Redis cannot be reached or refused the XADD (one line on stderr)"""

WATCH_EXIT_CODES = """exit codes:
  0   the job succeeded
  1   the job failed or was cancelled
  2   bad arguments, GPUJOB_REDIS_URL not set
  3   --timeout passed before the job ended
  4   the request was rejected: dead-lettered by the operator, never a GpuJob (the reason is printed)
  69  Redis cannot be reached or the connection was lost (one line on stderr)
  130 interrupted (Ctrl-C)"""


def _redis_failure(prog: str, settings: Settings, exc: Exception) -> int:
    """One line on stderr (no traceback, no password) and Exit.UNAVAILABLE."""
    url = settings.redis_url.get_secret_value() if settings.redis_url else ""
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else "Redis"
    what = "cannot reach Redis" if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError) else "Redis"
    detail = " ".join(redact_text(_os_error(exc) or str(exc) or type(exc).__name__).split())
    print(f"{prog}: {what} at {where}: {detail}", file=sys.stderr)
    return Exit.UNAVAILABLE


def _os_error(exc: BaseException) -> str | None:
    """The system's words for the failure under a Redis error (`Connection refused`), when there is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and (current.strerror or current.errno):
            # asyncio words a refused connection as "Connect call failed (...)": the errno's own words are clearer
            code = current.errno
            return os.strerror(code) if isinstance(code, int) and code > 0 else current.strerror
        current = current.__cause__ or current.__context__
    return None


# --- gpujob bridge
def bridge_main(argv: list[str]) -> int:
    argparse.ArgumentParser(
        prog="gpujob bridge",
        description="Run only the stream intake (GPUJOB_* settings); Redis outages are retried, never fatal.",
        epilog="exit codes:\n  0   stopped (SIGTERM, SIGINT)\n  2   bad arguments, GPUJOB_REDIS_URL not set",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)
    settings = get_settings()
    configure(settings.log_format, settings.log_level)
    register_secret(settings.redis_url)
    if settings.redis_url is None:
        print("gpujob bridge: GPUJOB_REDIS_URL is not set", file=sys.stderr)
        return Exit.USAGE
    asyncio.run(_run_bridge(settings))
    return 0


async def _run_bridge(settings: Settings) -> None:
    from gpujob import kube
    from gpujob.bridge.intake import run_bridge

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_bridge(settings, stop)
    finally:
        await kube.close()


# --- gpujob submit
def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a bare string


def submit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpujob submit",
        description="XADD a job request to the stream; prints its jobId.",
        epilog=SUBMIT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--file", "-f", type=Path, help="request as JSON or YAML (flags below override its fields)")
    p.add_argument("--type", "-t", dest="type", help="train_lora | train_voice | render_video | custom")
    p.add_argument("--job-id", help="idempotency key (default: a new uuid)")
    p.add_argument("--param", "-p", action="append", type=_param, default=[], help="key=value (value as JSON)")
    p.add_argument("--params", help="all params as one JSON object")
    p.add_argument("--gpus", type=int)
    p.add_argument("--image")
    p.add_argument("--namespace", "-n")
    p.add_argument("--queue", help="GpuQueue name (spec.queue)")
    p.add_argument("--priority", type=int, help="order in the queue, higher first (spec.priority, default 0)")
    p.add_argument("--priority-class-name", help="Kubernetes PriorityClass of the job's Pods")
    p.add_argument("--cancel", metavar="JOBID", help="request the cancel of this job instead")
    return p


def build_request(args: argparse.Namespace) -> tuple[Action, dict[str, Any]]:
    if args.cancel:
        return Action.CANCEL, {"jobId": args.cancel, **({"namespace": args.namespace} if args.namespace else {})}
    data: dict[str, Any] = {}
    if args.file:
        loaded = yaml.safe_load(args.file.read_text())
        data = dict(loaded.get("spec", loaded)) if isinstance(loaded, dict) else {}
    params = dict(data.get("params") or {})
    if args.params:
        params.update(json.loads(args.params))
    params.update(dict(args.param))
    for key, value in (("type", args.type), ("gpus", args.gpus), ("image", args.image), ("namespace", args.namespace),
                       ("queue", args.queue), ("priority", args.priority),
                       ("priorityClassName", args.priority_class_name)):  # fmt: skip
        if value is not None:
            data[key] = value
    if params:
        data["params"] = params
    data["jobId"] = args.job_id or data.get("jobId") or f"job-{uuid.uuid4().hex[:12]}"
    return Action.SUBMIT, data


def submit_main(argv: list[str]) -> int:
    args = submit_parser().parse_args(argv)
    action, data = build_request(args)
    fields: dict[Any, Any] = {ENTRY_JOB: json.dumps(data), ENTRY_ACTION: action.value}
    try:
        parse_entry(fields)  # the bridge would dead-letter it: say why now
    except ValueError as exc:
        print(f"gpujob submit: {exc}", file=sys.stderr)
        return Exit.USAGE
    settings = get_settings()
    if settings.redis_url is None:
        print("gpujob submit: GPUJOB_REDIS_URL is not set", file=sys.stderr)
        return Exit.USAGE
    try:
        with contextlib.closing(sync_client(settings)) as client:
            client.xadd(settings.request_stream, fields)
    except (RedisError, OSError) as exc:
        return _redis_failure("gpujob submit", settings, exc)
    print(data["jobId"])
    return Exit.OK


# --- gpujob watch
def _cols(text: str) -> int:
    """Terminal columns of `text` (wide East Asian characters take two, combining marks none)."""
    return sum(_char_cols(c) for c in text)


def _char_cols(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def _clip(text: str, cols: int) -> str:
    """`text` cut to at most `cols` columns, with an ellipsis when cut."""
    if _cols(text) <= cols:
        return text
    out, used = [], 0
    for char in text:
        width = _char_cols(char)
        if used + width > cols - 1:
            break
        out.append(char)
        used += width
    return "".join(out) + "…" if cols > 0 else ""


def _one_line(text: str) -> str:
    """Control characters (newlines, escapes a publisher may send) as spaces: the bar stays one line."""
    return "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)


def shown_message(event: ProgressEvent) -> str:
    """What a line shows of the event: for a job waiting in its queue, its position (and the estimated start)
    first, then the message."""
    if event.position is None or not event.queue:
        return event.message
    where = f"#{event.position} in queue {event.queue}"
    if event.estimatedStart:
        where += f", starts ~{event.estimatedStart}"
    return f"{where} | {event.message}" if event.message else where


def bar_line(event: ProgressEvent, width: int) -> str:
    """`<jobId> [####....]  40.0% running    <message>` in at most width-1 columns (the last column makes some
    terminals wrap): the message is cut first, then the bar shrinks, then the jobId."""
    room = max(1, width - 1)
    job = _clip(_one_line(event.jobId), max(8, room // 3))
    tail = f" {event.progress:5.1f}% {_one_line(event.status):<10}"
    bar_cols = max(0, min(20, room - _cols(job) - _cols(tail) - 3))
    if bar_cols >= 5:
        filled = int(event.progress / 100 * bar_cols)
        line = f"{job} [{'#' * filled}{'.' * (bar_cols - filled)}]{tail}"
    else:
        line = f"{job}{tail}"
    message = _one_line(shown_message(event))
    if message and room - _cols(line) > 2:
        line = f"{line} {_clip(message, room - _cols(line) - 1)}"
    return _clip(line.rstrip(), room)


def final_line(event: ProgressEvent) -> str:
    """The whole final message (never cut: it holds the cause), with the reason when the message lacks it."""
    text = f"{event.status}: {event.message}" if event.message else event.status
    if event.reason and event.reason not in event.message:
        text += f" ({event.reason})"
    return text


def render(event: ProgressEvent, out: TextIO, tty: bool, as_json: bool, width: int | None = None) -> None:
    if as_json:
        out.write(event.to_json() + "\n")
    elif tty:
        columns = width or shutil.get_terminal_size().columns
        out.write(f"\r{bar_line(event, columns)}\x1b[K")  # rewrite the line, erase what a longer one left
        if event.status in FINAL_STATUSES:
            out.write(f"\n{final_line(event)}\n")
    else:
        out.write(f"{event.timestamp} {event.jobId} {event.status} {event.progress:.1f}% {shown_message(event)}\n")
    out.flush()


def exit_code(status: str) -> Exit:
    """What `gpujob watch` exits with once a job's final event came."""
    if status == Phase.SUCCEEDED.event_status:
        return Exit.OK
    return Exit.REJECTED if status == REJECTED else Exit.FAILED


def _event(raw: Any) -> ProgressEvent | None:
    """An event as published, or None for anything else on the channel (anyone who can PUBLISH can send junk)."""
    try:
        return ProgressEvent.model_validate_json(raw)
    except (ValidationError, ValueError):
        return None


async def watch(settings: Settings, job_id: str, as_json: bool, limit: float | None, out: TextIO) -> int:
    """Catch up from the latest state, then follow; returns an Exit code (0 succeeded, 1 failed or cancelled,
    3 timeout, 4 rejected). Redis errors go up."""
    client = async_client(settings)
    tty = out.isatty()
    try:
        async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(f"{settings.progress_channel_prefix}{job_id}")  # before reading the state
            latest = _event(await client.get(f"{settings.state_key_prefix}{job_id}") or "")
            seen = 0
            if latest is not None:
                seen = latest.seq or 0
                render(latest, out, tty, as_json)
                if latest.status in FINAL_STATUSES:
                    return exit_code(latest.status)
            async with asyncio.timeout(limit):
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    event = _event(message["data"])
                    if event is None or event.jobId != job_id or (event.seq or 0) <= seen:
                        continue  # junk, or already shown by the catch-up
                    seen = event.seq or seen
                    render(event, out, tty, as_json)
                    if event.status in FINAL_STATUSES:
                        return exit_code(event.status)
    except TimeoutError:
        return Exit.TIMEOUT
    finally:
        await client.aclose()
    return Exit.FAILED


def watch_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="gpujob watch",
        description="Follow a job's progress events until it ends: a progress bar that fits the terminal, then the "
        "full final message; one line per event when not a terminal; --json for JSON lines.",
        epilog=WATCH_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job_id", metavar="JOBID")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 3)")
    args = p.parse_args(argv)
    settings = get_settings()
    if settings.redis_url is None:
        print("gpujob watch: GPUJOB_REDIS_URL is not set", file=sys.stderr)
        return Exit.USAGE
    try:
        return asyncio.run(watch(settings, args.job_id, args.json, args.timeout, sys.stdout))
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except (RedisError, OSError) as exc:
        if sys.stdout.isatty():
            print(file=sys.stdout, flush=True)  # end the progress bar's line
        return _redis_failure("gpujob watch", settings, exc)


# --- gpujob schema
def schema_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="gpujob schema",
        description="Print the JSON Schema of a contract.",
        epilog="exit codes:\n  0   printed\n  2   bad arguments",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("which", choices=["request", "event"])
    args = p.parse_args(argv)
    schema = request_schema() if args.which == "request" else ProgressEvent.model_json_schema()
    print(json.dumps(schema, indent=2))
    return 0
