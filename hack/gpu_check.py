"""The worker's GPU-only behaviour, checked on a machine with a CUDA GPU (issue 17); prints one table.

1. bf16 vs fp32 step time of train_lora's LoraTrainer on a Llama-shaped model built here (no download).
2. CUDA out of memory: with most of the GPU taken by this process, a big micro-batch is halved until it
   fits (exit 0, `outOfMemoryRetries` > 0), and a row that cannot fit even alone exits 71 (OutOfMemory)
   with the peak memory in the error.
3. GPUs requested but CUDA unusable (CUDA_VISIBLE_DEVICES="" and GPUJOB_GPUS=1): exit 69 at once.
4. SIGTERM to exit with a ~2 GB state on the GPU (a test task: a model and its Adam moments), against the
   worker's stop budget; the checkpoint is then loaded back.
5. A CUDA checkpoint of train_lora saved and resumed through the worker's checkpoint code: optimizer moments
   back on the GPU, the next step's loss equal to an uninterrupted run's.

Checkpoints and artifacts go to a local directory (GPUJOB_S3_ENDPOINT=file://…, the worker's DirStore): the
GPU machine has no S3 server and no network. Without CUDA every check still runs, small, on CPU, and the
table says "no CUDA": for debugging this script, not as a measurement.

Usage: python hack/gpu_check.py [--quick]      (PYTHONPATH must reach gpujob, e.g. PYTHONPATH=operator)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

import torch  # noqa: E402

from gpujob.worker.tiny_model import write_tiny_model  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda:0" if CUDA else "cpu")
GIB = 1024**3
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "low",
    "rank",
    "adapters",
    "learn",
    "from",
    "gpu",
    "jobs",
]

PLUGIN = '''
import time

import torch
from pydantic import BaseModel

from gpujob.worker import Task


class Params(BaseModel):
    gib: float = 2.0


class BigState(Task[Params]):
    """A model plus its Adam moments of about `gib` GiB on the device; trains until stopped."""

    name = "big_state"
    params_model = Params

    def run(self, ctx, params):
        n = int(params.gib * 1024**3 / 4 / 3)  # fp32 weights + two moments
        weight = torch.nn.Parameter(torch.zeros(n, device=ctx.device))
        optimizer = torch.optim.Adam([weight], lr=1e-3)
        step = 0
        if (state := ctx.load_checkpoint()) is not None:
            weight.data.copy_(state["weight"])
            optimizer.load_state_dict(state["optimizer"])
            step = int(state["step"])
        ctx.report_progress(1, "big state ready")
        while True:
            weight.grad = torch.ones_like(weight)
            optimizer.step()
            step += 1
            ctx.report_progress(min(99, step), f"step {step}")
            ctx.step_boundary(step, lambda: {"weight": weight.data, "optimizer": optimizer.state_dict()})
            time.sleep(0.05)
'''


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, check: str, result: str, detail: str, ok: bool | None) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        detail = " ".join(detail.split())[:100]
        self.rows.append((check, result, detail, verdict))
        print(f"  .. {check}: {result} ({verdict}) {detail}", flush=True)

    def render(self, title: str) -> str:
        head = ("check", "result", "detail", "verdict")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(3)]
        lines = [title, "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)) + "  verdict"]
        lines.append("-" * (sum(widths) + 6 + 7))
        for row in self.rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[3])
        return "\n".join(lines)


def texts(n: int, words: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(WORDS), (n, words), generator=gen).tolist()
    return [" ".join(WORDS[i] for i in row) for row in picks]


def plugin_dir(tmp: Path) -> Path:
    """A dist-info registering the reference tasks (the package need not be installed) and BigState."""
    root = tmp / "plugins"
    root.mkdir()
    (root / "gpujob_gpu_check_tasks.py").write_text(PLUGIN)
    info = root / "gpujob_gpu_check-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gpujob-gpu-check\nVersion: 0\n")
    tasks = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["gpujob.tasks"]
    lines = [f"{name} = {target}" for name, target in tasks.items()]
    lines.append("big_state = gpujob_gpu_check_tasks:BigState")
    (info / "entry_points.txt").write_text("[gpujob.tasks]\n" + "\n".join(lines) + "\n")
    return root


class Worker:
    """`python -m gpujob.cli worker` with a local directory as its store."""

    def __init__(self, tmp: Path, plugins: Path, models: Path) -> None:
        self.tmp, self.plugins, self.models = tmp, plugins, models
        self.count = 0

    def start(
        self, job_type: str, params: dict[str, Any], job_id: str, **env: str
    ) -> tuple[subprocess.Popen[bytes], Path, Path]:
        self.count += 1
        term = self.tmp / f"term-{self.count}.json"
        log = self.tmp / f"worker-{self.count}.log"
        path = os.pathsep.join([str(self.plugins), str(ROOT / "operator"), os.environ.get("PYTHONPATH", "")])
        full = {**os.environ, "PYTHONPATH": path, "GPUJOB_S3_ENDPOINT": f"file://{self.tmp / 'store'}"}
        full |= {"GPUJOB_JOB_ID": job_id, "GPUJOB_JOB_TYPE": job_type, "GPUJOB_JOB_PARAMS": json.dumps(params)}
        full |= {"GPUJOB_MODELS_DIR": str(self.models), "GPUJOB_TERMINATION_MESSAGE_PATH": str(term)}
        full |= {"GPUJOB_LOG_FORMAT": "json", **env}
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gpujob.cli", "worker"], env=full, stdout=out, stderr=out)
        return proc, term, log

    def dataset(self, name: str, rows: list[str]) -> dict[str, str]:
        """Write rows as JSONL into the local store; the dataset param that names them."""
        key = f"datasets/{name}.jsonl"
        path = self.tmp / "store" / "gpujob" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
        return {"s3Key": key}

    def run(self, job_type: str, params: dict[str, Any], job_id: str, timeout: float, **env: str) -> dict[str, Any]:
        proc, term, log = self.start(job_type, params, job_id, **env)
        started = time.monotonic()
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -9
        result = json.loads(term.read_text()) if term.exists() else {}
        return {"code": code, "seconds": time.monotonic() - started, "result": result, "log": log.read_text()}


def wait_log(
    log: Path, proc: subprocess.Popen[bytes], predicate: Callable[[dict[str, Any]], bool], timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            try:
                if predicate(json.loads(line)):
                    return True
            except ValueError:
                continue
        time.sleep(0.05)
    return False


def check_dtypes(table: Table, model: Path, quick: bool) -> None:
    from gpujob.worker.devices import select
    from gpujob.worker.tasks.lora import LoraParams, LoraTrainer

    devices = select(None)
    # Enough tokens a step (32 x 512) that the matmuls, not Python and kernel launches, set the step time.
    data = texts(64, 120) if quick or not CUDA else texts(64, 700)
    batch, length = (8, 256) if quick or not CUDA else (32, 512)
    steps = 4 if quick or not CUDA else 20
    results = {}
    for dtype in ("float32", "bfloat16"):
        if dtype == "bfloat16" and CUDA and not devices.bf16:
            table.add("step time bf16", "skipped", f"{devices.names[0]} has no bf16", None)
            continue
        params = LoraParams.model_validate(
            {
                "baseModel": model.name,
                "dataset": {"text": data},
                "batchSize": batch,
                "maxLength": length,
                "dtype": dtype,
            }
        )
        torch.manual_seed(0)
        trainer = LoraTrainer(model, params, iter(data), devices)
        times = []
        for step in range(steps + 2):
            started = time.perf_counter()
            loss = float(trainer.step(step))  # a sync: the step is really done
            times.append(time.perf_counter() - started)
        results[dtype] = statistics.median(times[2:])
        detail = f"median of {steps}, batch {batch} x {length} tokens, loss {loss:.3f}"
        table.add(f"step time {dtype}", f"{1000 * results[dtype]:.1f} ms", detail, None)
        del trainer
        if CUDA:
            torch.cuda.empty_cache()
    if len(results) == 2:
        ratio = results["float32"] / results["bfloat16"]
        table.add("bf16 speed-up over fp32", f"{ratio:.2f}x", "TF32 matmuls on for fp32", ratio > 1.0 if CUDA else None)


def check_oom(table: Table, worker: Worker, model: Path) -> None:
    if not CUDA:
        table.add("OOM: micro-batch halved", "no CUDA", "needs a GPU", None)
        table.add("OOM at micro-batch 1 -> exit 71", "no CUDA", "needs a GPU", None)
        return
    # Take most of the GPU in this process, leaving ~6 GiB (the worker's CUDA context included) free: a row
    # of 2,048 tokens fits, 64 of them do not, and one of 32,768 tokens does not either.
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - 6 * GIB), dtype=torch.uint8, device=DEVICE)
    try:
        # The datasets go through the store as JSONL (inline they would pass the 128 KiB limit of one env var).
        params = {"baseModel": model.name, "dataset": worker.dataset("oom-rows", texts(64, 900)), "epochs": 1}
        params["maxLength"] = 2048  # ~1,000+ tokens a row
        fits = worker.run("train_lora", {**params, "batchSize": 64}, "oom-halved", 150)
        m = fits["result"].get("metrics", {})
        ok = fits["code"] == 0 and m.get("outOfMemoryRetries", 0) > 0
        detail = f"microBatch 64 -> {m.get('microBatch', '?'):.0f}" if m else fits["log"][-300:]
        table.add("OOM: micro-batch halved", f"exit {fits['code']}", detail, ok)
        big = {"baseModel": model.name, "dataset": worker.dataset("oom-long", texts(2, 30000)), "batchSize": 1}
        big["maxLength"] = 32768
        fails = worker.run("train_lora", big, "oom-fatal", 150)
        error = fails["result"].get("error", fails["log"][-300:])
        ok = fails["code"] == 71 and "CUDA out of memory" in error and "peak" in error
        table.add("OOM at micro-batch 1 -> exit 71", f"exit {fails['code']}", error[:110], ok)
    finally:
        del hog
        torch.cuda.empty_cache()


def check_cuda_unavailable(table: Table, worker: Worker) -> None:
    done = worker.run("train_voice", {"epochs": 1}, "no-cuda", 60, CUDA_VISIBLE_DEVICES="", GPUJOB_GPUS="1")
    error = done["result"].get("error", done["log"][-300:])
    ok = done["code"] == 69 and "CUDA is unavailable" in error
    table.add(
        "GPUs requested, CUDA hidden -> exit 69", f"exit {done['code']} in {done['seconds']:.1f}s", error[:110], ok
    )


def check_sigterm(table: Table, worker: Worker, gib: float) -> None:
    from gpujob.worker.env import WorkerEnv

    budget = WorkerEnv().stop_budget
    proc, term, log = worker.start("big_state", {"gib": gib}, "sigterm")
    ready = wait_log(log, proc, lambda r: r.get("message") == "big state ready", 120)
    if not ready:
        proc.kill()
        proc.wait()
        table.add(f"SIGTERM to exit, {gib:g} GiB state", "did not start", log.read_text()[-200:], False)
        return
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(budget + 15)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    seconds = time.monotonic() - sent
    result = json.loads(term.read_text()) if term.exists() else {}
    store = worker.tmp / "store" / "gpujob" / "jobs" / "sigterm" / "checkpoints"
    files = sorted(store.rglob("step-*.pt"))
    size = files[-1].stat().st_size / GIB if files else 0.0
    ok = code == 143 and seconds < budget and "checkpoint saved" in result.get("error", "")
    detail = f"budget {budget:.0f}s, checkpoint {size:.2f} GiB, {result.get('error', '')[:60]}"
    table.add(f"SIGTERM to exit, {gib:g} GiB state on {DEVICE.type}", f"{seconds:.1f}s, exit {code}", detail, ok)
    proc, _, log = worker.start("big_state", {"gib": gib}, "sigterm", GPUJOB_ATTEMPT="2")
    loading = time.monotonic()
    resumed = wait_log(log, proc, lambda r: r.get("event") == "resuming from checkpoint", 120)
    seconds = time.monotonic() - loading
    proc.kill()  # it would train for ever
    proc.wait()
    detail = f"worker start + load in {seconds:.1f}s" if resumed else log.read_text()[-100:]
    table.add("  ... next attempt loads it back", "resumed" if resumed else "not resumed", detail, resumed)


def check_resume(table: Table, tmp: Path, model: Path) -> None:
    from gpujob.worker.artifacts import DirStore
    from gpujob.worker.checkpoints import Checkpoints, snapshot
    from gpujob.worker.devices import select
    from gpujob.worker.tasks.lora import LoraParams, LoraTrainer

    devices = select(None)
    data = texts(32, 60)
    params = LoraParams.model_validate(
        {"baseModel": model.name, "dataset": {"text": data}, "batchSize": 4, "maxLength": 128}
    )
    checkpoints = Checkpoints(DirStore(tmp / "resume-store", "b"), "loras/r/checkpoints/", "run")

    def trainer() -> LoraTrainer:
        torch.manual_seed(0)
        return LoraTrainer(model, params, iter(data), devices)

    straight = trainer()
    for step in range(3):
        straight.step(step)
    checkpoints.save(3, snapshot(straight.state()))
    expected = float(straight.step(3))
    resumed = trainer()
    state = checkpoints.latest()
    assert state is not None
    resumed.load_state(state)
    moments = [t for s in resumed.optimizer.state.values() for k, t in s.items() if k == "exp_avg"]
    on_device = bool(moments) and all(t.device.type == DEVICE.type for t in moments)
    got = float(resumed.step(int(state["step"])))
    close = abs(got - expected) <= 1e-3 * max(1.0, abs(expected))
    where = moments[0].device if moments else "?"
    detail = f"loss after resume {got:.5f} vs uninterrupted {expected:.5f}; moments on {where}"
    table.add(
        f"checkpoint resumed on {DEVICE.type}",
        "optimizer on device" if on_device else "NOT on device",
        detail,
        on_device and close,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smallest sizes (also the default without CUDA)")
    parser.add_argument("--state-gib", type=float, default=None, help="SIGTERM check state size (2 on GPU)")
    args = parser.parse_args()
    quick = args.quick or not CUDA
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, not ours
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from gpujob.logging import configure

    configure("console", "WARNING")
    table = Table()
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        where = f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / GIB:.0f} GiB"
        where += f", torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        where = f"no CUDA (torch {torch.__version__}): small sizes on CPU, for debugging this script only"
    print(f"gpu_check: {where}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpujob-gpu-check-") as tmpdir:
        tmp = Path(tmpdir)
        models = tmp / "models"
        if quick:
            mid = write_tiny_model(models / "mid", hidden=64, layers=2, max_positions=32768)
        else:  # ~130M params: big enough that bf16 vs fp32 shows, small enough to build in seconds
            mid = write_tiny_model(models / "mid", hidden=1024, layers=8, heads=16, vocab=32000, max_positions=32768)
        worker = Worker(tmp, plugin_dir(tmp), models)
        checks: list[tuple[str, Callable[[], None]]] = [
            ("dtypes", lambda: check_dtypes(table, mid, quick)),
            ("cuda unavailable", lambda: check_cuda_unavailable(table, worker)),
            ("resume", lambda: check_resume(table, tmp, mid)),
            ("sigterm", lambda: check_sigterm(table, worker, args.state_gib or (2.0 if CUDA else 0.05))),
            ("oom", lambda: check_oom(table, worker, mid)),
        ]
        for name, check in checks:
            started = time.monotonic()
            try:
                check()
            except Exception as exc:  # one broken check must not hide the others
                table.add(name, "ERROR", f"{type(exc).__name__}: {exc}"[:150], False)
            print(f"  ({name}: {time.monotonic() - started:.1f}s)", flush=True)
    print()
    print(table.render(f"gpu_check — {where}"))
    return 0 if all(r[3] != "FAIL" for r in table.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
