#!/usr/bin/env python3
"""`make demo`: the whole pipeline on this machine, in one command.

Starts `gpujob sandbox` (API emulator + local kubelet with a fake 2-GPU node + redis + S3) and `gpujob operator`
(with the Redis bridge), writes a tiny base model into the sandbox's models dir, submits a train_lora, a
train_voice and a render_video job through the Redis stream exactly as the Node backend does, shows live
progress, then prints `kubectl get gj`, the artifacts in S3 and a few lines of the operator's /metrics.
Exits 0 when all three succeeded; non-zero with the reason otherwise. Leaves no process behind.

    .venv/bin/python hack/demo.py [--gpus 2] [--timeout 300] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from gpujob.api.request import JobRequest
from gpujob.sandbox.stack import LocalStack, processes_under

TERMINAL = {"succeeded", "failed", "cancelled"}
BAR = 30

REQUESTS: list[dict[str, Any]] = [
    {
        "jobId": "demo-lora",
        "type": "train_lora",
        "gpus": 1,
        "params": {
            "baseModel": "tiny-llama",
            "dataset": {"text": ["the quick brown fox", "gpu jobs on a laptop", "low rank adapters", "hello world"]},
            "epochs": 20,
        },
    },
    {"jobId": "demo-voice", "type": "train_voice", "gpus": 1, "params": {"epochs": 8, "stepsPerEpoch": 10}},
    {"jobId": "demo-video", "type": "render_video", "gpus": 1, "params": {"width": 160, "height": 120, "frames": 48}},
]


class Stopped(Exception):
    """SIGTERM/SIGINT: clean up and leave."""


def _raise_stop(signum: int, _: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def validate(request: dict[str, Any]) -> dict[str, Any]:
    """Check a request against the stream contract (gpujob.api.request), as the backend can with its JSON Schema."""
    JobRequest.model_validate(request)
    return request


class Board:
    """Progress bars from the Pub/Sub events, redrawn in place on a terminal, one line per change otherwise."""

    def __init__(self, job_ids: list[str]) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        for job in job_ids:
            self.state[job] = {"status": "submitted", "progress": 0.0, "message": ""}
        self.tty = sys.stdout.isatty()
        self.drawn = 0
        self.last_line: dict[str, str] = {}
        self.lock = threading.Lock()

    def update(self, event: dict[str, Any]) -> None:
        job = event.get("jobId")
        if job not in self.state:
            return
        with self.lock:
            entry = self.state[job]
            entry["status"] = event.get("status", entry["status"])
            if event.get("status") != "progress" or "progress" in event:
                entry["progress"] = float(event.get("progress", entry["progress"]))
            if event.get("status") == "progress":
                entry["status"] = "running"
            entry["message"] = event.get("message") or entry["message"]

    def line(self, job: str) -> str:
        entry = self.state[job]
        filled = int(BAR * entry["progress"] / 100)
        bar = "#" * filled + "-" * (BAR - filled)
        return f"{job:<11} [{bar}] {entry['progress']:5.1f}% {entry['status']:<10} {entry['message'][:40]}"

    def draw(self) -> None:
        with self.lock:
            if self.tty:
                if self.drawn:
                    sys.stdout.write(f"\x1b[{self.drawn}F")
                for job in self.state:
                    sys.stdout.write("\x1b[2K" + self.line(job) + "\n")
                self.drawn = len(self.state)
            else:
                for job in self.state:
                    entry = self.state[job]
                    key = f"{entry['status']}:{int(entry['progress'] // 25)}"
                    if self.last_line.get(job) != key:
                        self.last_line[job] = key
                        print(self.line(job))
            sys.stdout.flush()

    def done(self) -> bool:
        return all(e["status"] in TERMINAL for e in self.state.values())


def follow(stack: LocalStack, board: Board, deadline: float) -> None:
    """Progress bars from `gpujobs:progress:<jobId>`; the verdict from GpuJob.status (the source of truth)."""
    client = stack.redis()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(*[f"{stack.settings.progress_channel_prefix}{job}" for job in board.state])
    for request in REQUESTS:
        stack.submit(validate(request), client)
    print(f"submitted {len(REQUESTS)} requests to the Redis stream {stack.settings.request_stream}\n")
    created_by = time.monotonic() + 30
    last_poll = 0.0
    while not board.done():
        if time.monotonic() > deadline:
            raise TimeoutError("the jobs did not finish within the demo's time limit")
        message = pubsub.get_message(timeout=0.2)
        if message and message.get("type") == "message":
            board.update(json.loads(message["data"]))
        if time.monotonic() - last_poll > 1.0:
            last_poll = time.monotonic()
            for job in board.state:
                body = stack.job(job)
                phase = ((body or {}).get("status") or {}).get("phase")
                if body is None and time.monotonic() > created_by:
                    raise RuntimeError(
                        f"no GpuJob was created for {job} within 30 s of its stream request: is the bridge "
                        f"running in the operator? (log: {stack.workdir / 'operator.log'})"
                    )
                if body is not None and phase and phase.lower() in TERMINAL:
                    percent = (body["status"].get("progress") or {}).get("percent", 0)
                    board.update({"jobId": job, "status": phase.lower(), "progress": percent})
        board.draw()
    board.draw()
    pubsub.close()
    client.close()


def report(stack: LocalStack) -> list[str]:
    """Print kubectl get gj, artifacts and metrics; return the failures (job: reason)."""
    print("\n$ kubectl get gj")
    result = stack.kubectl("get", "gj")
    print(result.stdout or result.stderr)
    print(f"artifacts in s3://{stack.bucket}:")
    for obj in stack.s3().list_objects(stack.bucket, recursive=True):
        if "/checkpoints/" not in obj.object_name:
            print(f"  {obj.size:>10,}  {obj.object_name}")
    text = stack.metrics()
    if text is None:
        print("\n/metrics: the operator's metrics server is not listening (not wired into `gpujob operator` yet)")
    else:
        samples = [ln for ln in text.splitlines() if ln.startswith("gpu_worker_")]
        lines = [ln for ln in samples if not ln.endswith(" 0.0") and "_created" not in ln and "_bucket" not in ln]
        print(f"\n$ curl -s localhost:{stack.metrics_port}/metrics | grep ^gpu_worker_  (non-zero samples, first 12)")
        print("\n".join(lines[:12]) or "(no gpu_worker_* samples yet)")
    failures = []
    for request in REQUESTS:
        status = (stack.job(request["jobId"]) or {}).get("status") or {}
        if status.get("phase") != "Succeeded":
            why = f"{status.get('phase')} {status.get('reason')}: {status.get('message')}"
            failures.append(f"{request['jobId']}: {why}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the fake node (default: %(default)s)")
    parser.add_argument(
        "--api",
        choices=["emulator", "kubernetes"],
        default="emulator",
        help="emulator (fast) or a real control plane built from Go modules (default: %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="overall time limit in seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) even on success")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    started = time.monotonic()
    deadline = started + args.timeout
    workdir = Path(tempfile.mkdtemp(prefix="gpujob-demo-"))
    stack = LocalStack(workdir, gpus=args.gpus, api=args.api)
    failures: list[str] = []
    keep = args.keep
    try:
        api = "API emulator" if args.api == "emulator" else "real Kubernetes control plane"
        print(f"starting the sandbox ({api}, kubelet with {args.gpus} fake GPUs, redis, S3) in {workdir} ...")
        stack.start_sandbox()
        print("starting the operator (kopf + Redis bridge) ...")
        model_errors: list[BaseException] = []
        model_writer = threading.Thread(target=write_model, args=(stack, model_errors), daemon=True)
        model_writer.start()  # torch and transformers load meanwhile
        stack.start_operator()
        model_writer.join(max(deadline - time.monotonic(), 1))
        if model_errors or model_writer.is_alive():
            raise RuntimeError(f"writing the tiny base model failed: {model_errors or 'timeout'}")
        print(f"tiny base model written to {stack.models_dir / 'tiny-llama'}")
        board = Board([r["jobId"] for r in REQUESTS])
        follow(stack, board, deadline)
        failures = report(stack)
    except Stopped as exc:
        failures = [f"interrupted ({exc})"]
    except Exception as exc:
        failures = [f"{type(exc).__name__}: {exc}"]
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    if left := processes_under(workdir):
        failures.append(f"processes left behind after the stop: {left}")
    elapsed = time.monotonic() - started
    if failures:
        print(f"\ndemo FAILED after {elapsed:.0f}s:", *failures, sep="\n  ", file=sys.stderr)
        print(f"logs kept in {workdir} (sandbox.log, operator.log, sandbox/pods/*/container.log)", file=sys.stderr)
        return 1
    if keep:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ndemo OK: 3 jobs succeeded in {elapsed:.0f}s; every process stopped")
    return 0


def write_model(stack: LocalStack, errors: list[BaseException]) -> None:
    try:
        from gpujob.worker.tiny_model import write_tiny_model

        write_tiny_model(stack.models_dir / "tiny-llama")
    except BaseException as exc:
        errors.append(exc)


if __name__ == "__main__":
    sys.exit(main())
