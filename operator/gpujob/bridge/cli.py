"""`gpujob bridge | submit | watch | schema`: the Redis side, for operators and for people."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, TextIO

import yaml

from gpujob.api.constants import Phase
from gpujob.api.events import ProgressEvent
from gpujob.api.request import ENTRY_ACTION, ENTRY_JOB, Action, parse_entry, request_schema
from gpujob.events import async_client, sync_client
from gpujob.logging import configure, register_secret
from gpujob.settings import Settings, get_settings

TERMINAL = {p.event_status: p for p in Phase if p.terminal}


# --- gpujob bridge
def bridge_main(argv: list[str]) -> int:
    argparse.ArgumentParser(
        prog="gpujob bridge", description="Run only the stream intake (GPUJOB_* settings)."
    ).parse_args(argv)
    settings = get_settings()
    configure(settings.log_format, settings.log_level)
    register_secret(settings.redis_url)
    if settings.redis_url is None:
        print("gpujob bridge: GPUJOB_REDIS_URL is not set", file=sys.stderr)
        return 2
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
    p = argparse.ArgumentParser(prog="gpujob submit", description="XADD a job request to the stream; prints its jobId.")
    p.add_argument("--file", "-f", type=Path, help="request as JSON or YAML (flags below override its fields)")
    p.add_argument("--type", "-t", dest="type", help="train_lora | train_voice | render_video | custom")
    p.add_argument("--job-id", help="idempotency key (default: a new uuid)")
    p.add_argument("--param", "-p", action="append", type=_param, default=[], help="key=value (value as JSON)")
    p.add_argument("--params", help="all params as one JSON object")
    p.add_argument("--gpus", type=int)
    p.add_argument("--image")
    p.add_argument("--namespace", "-n")
    p.add_argument("--priority")
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
    for key, value in (("type", args.type), ("gpus", args.gpus), ("image", args.image),
                       ("namespace", args.namespace), ("priority", args.priority)):  # fmt: skip
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
        return 2
    settings = get_settings()
    if settings.redis_url is None:
        print("gpujob submit: GPUJOB_REDIS_URL is not set", file=sys.stderr)
        return 2
    with contextlib.closing(sync_client(settings)) as client:
        client.xadd(settings.request_stream, fields)
    print(data["jobId"])
    return 0


# --- gpujob watch
def render(event: ProgressEvent, out: TextIO, tty: bool, as_json: bool) -> None:
    if as_json:
        out.write(event.to_json() + "\n")
    elif tty:
        filled = int(event.progress / 5)
        out.write(f"\r{event.jobId} [{'#' * filled}{'.' * (20 - filled)}] {event.progress:5.1f}% "
                  f"{event.status:<10} {event.message[:60]:<60}")  # fmt: skip
        if event.status in TERMINAL:
            out.write("\n")
    else:
        out.write(f"{event.timestamp} {event.jobId} {event.status} {event.progress:.1f}% {event.message}\n")
    out.flush()


async def watch(settings: Settings, job_id: str, as_json: bool, limit: float | None, out: TextIO) -> int:
    """Catch up from the latest state, then follow; returns 0 succeeded, 1 failed/cancelled, 3 timeout."""
    client = async_client(settings)
    tty = out.isatty()
    try:
        async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(f"{settings.progress_channel_prefix}{job_id}")  # before reading the state
            raw = await client.get(f"{settings.state_key_prefix}{job_id}")
            seen = 0
            if raw:
                latest = ProgressEvent.model_validate_json(raw)
                seen = latest.seq or 0
                render(latest, out, tty, as_json)
                if latest.status in TERMINAL:
                    return 0 if latest.status == Phase.SUCCEEDED.event_status else 1
            async with asyncio.timeout(limit):
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    event = ProgressEvent.model_validate_json(message["data"])
                    if (event.seq or 0) <= seen:
                        continue  # already shown by the catch-up
                    seen = event.seq or seen
                    render(event, out, tty, as_json)
                    if event.status in TERMINAL:
                        return 0 if event.status == Phase.SUCCEEDED.event_status else 1
    except TimeoutError:
        return 3
    finally:
        await client.aclose()
    return 1


def watch_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpujob watch", description="Follow a job's progress events until it ends.")
    p.add_argument("job_id", metavar="JOBID")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 3)")
    args = p.parse_args(argv)
    settings = get_settings()
    if settings.redis_url is None:
        print("gpujob watch: GPUJOB_REDIS_URL is not set", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(watch(settings, args.job_id, args.json, args.timeout, sys.stdout))
    return 130


# --- gpujob schema
def schema_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpujob schema", description="Print the JSON Schema of a contract.")
    p.add_argument("which", choices=["request", "event"])
    args = p.parse_args(argv)
    schema = request_schema() if args.which == "request" else ProgressEvent.model_json_schema()
    print(json.dumps(schema, indent=2))
    return 0
