#!/usr/bin/env python3
"""GPU queue benchmark (issue 14, docs/queues.md "Figures"): three measures, one table.

1. Admission decisions/s: `admission.plan()` (pure) over 10,000 pending jobs in 10 queues whose quota is in use
   (80 admitted jobs), as the queue manager runs it after each change; a decision is one job admitted or placed
   (its reason and position). Repeated; median [min-max].
2. Fairness: a long saturated simulation (event-driven, the real `plan()`): an idle lender's quota is borrowed by
   queues of weights 1:3 (and a second run with 10 queues of weights 1..10) whose jobs (1 GPU, 50-150 s,
   seeded) always wait; the error is, per borrowing queue, |its GPU-seconds share / its weight share - 1|, the
   largest reported (target within 5 %).
3. GpuJob -> Pod throughput on the emulator with queues vs without, in the same run: the operator and the
   emulator as in hack/bench_operator.py; bursts of jobs without spec.queue and with a GpuQueue whose quota never
   binds, alternated `--repeat` times (medians side by side, the ratio; target with/without >= 0.8), and per burst
   the operator's API writes and CPU per job (read from the emulator's request log and /proc: these hardly move
   with the machine's load, the rates do).

    .venv/bin/python hack/bench_queues.py [--pending 10000] [--queues 10] [--sim-seconds 20000] [--burst 300]
        [--repeat 3] [--skip-emulator]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import benchrows
from bench_operator import Bench, Run, spread
from gpujob.operator.admission import Queue, Workload, plan

GPU = "nvidia.com/gpu"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
Q_PATH = "/apis/gpujob.dev/v1alpha1/gpuqueues"
GJ_PATH = "/apis/gpujob.dev/v1alpha1/namespaces/default/gpujobs"
WRITES = frozenset({"create", "patch", "update", "delete"})


# --- 1. admission decisions/s


def decisions(pending: int, queues: int, repeat: int) -> tuple[list[float], list[float], int]:
    """Seconds per plan() and decisions/s over `pending` waiting jobs in `queues` full queues."""
    per_queue_quota = 8
    qs = {f"q{i}": Queue(f"q{i}", {GPU: Decimal(per_queue_quota)}, weight=1 + i % 3) for i in range(queues)}
    rng = random.Random(1)
    workloads = [
        Workload(f"ml/run-{q}-{j}", "ml", q, 0, T0, {GPU: Decimal(1)}, admitted_at=T0)
        for q in qs
        for j in range(per_queue_quota)
    ]
    for i in range(pending):
        priority, gpus = rng.choice((0, 0, 0, 5)), rng.choice((1, 1, 2))
        arrival = T0 + timedelta(seconds=i)
        workloads.append(Workload(f"ml/w{i:05d}", "ml", f"q{i % queues}", priority, arrival, {GPU: Decimal(gpus)}))
    seconds, rates = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        result = plan(qs, workloads)
        took = time.perf_counter() - t
        decided = len(result.admit) + len(result.waiting)
        seconds.append(took)
        rates.append(decided / took)
    assert decided == pending, (decided, pending)
    return seconds, rates, decided


# --- 2. fairness of a long saturated run


def fairness(weights: dict[str, int], lender_quota: int, sim_seconds: float, seed: int = 7) -> tuple[float, dict]:
    """Borrowing queues (quota 0) share an idle lender's quota; returns the largest relative error and the
    shares. Each borrowing queue always has jobs waiting (1 GPU, 50-150 s)."""
    rng = random.Random(seed)
    qs = {"lender": Queue("lender", {GPU: Decimal(lender_quota)}, borrow=False)}
    qs |= {
        name: Queue(name, {GPU: Decimal(0)}, weight=w, preempt_within=False, reclaim=False)
        for name, w in weights.items()
    }
    now = 0.0
    serial = 0
    waiting: dict[str, Workload] = {}
    running: dict[str, tuple[Workload, float]] = {}  # key -> (workload, ends at)
    gpu_seconds = dict.fromkeys(weights, 0.0)

    def refill() -> None:
        nonlocal serial
        for name in weights:
            while sum(1 for w in waiting.values() if w.queue == name) < 8:
                serial += 1
                key = f"ml/{name}-{serial:07d}"
                waiting[key] = Workload(
                    key, "ml", name, 0, T0 + timedelta(seconds=now, microseconds=serial), {GPU: Decimal(1)}
                )

    refill()
    while now < sim_seconds:
        result = plan(qs, [*waiting.values(), *(w for w, _ in running.values())])
        for key in result.admit:
            w = waiting.pop(key)
            admitted = Workload(
                w.key, w.namespace, w.queue, w.priority, w.arrival, w.request, admitted_at=T0 + timedelta(seconds=now)
            )
            running[key] = (admitted, now + rng.uniform(50, 150))
        refill()
        if not running:
            break
        until = min(end for _, end in running.values())
        for w, _ in running.values():
            gpu_seconds[w.queue] += float(w.request[GPU]) * (until - now)
        now = until
        for key in [k for k, (_, end) in running.items() if end <= now]:
            del running[key]
    total = sum(gpu_seconds.values())
    weight_total = sum(weights.values())
    shares = {q: gpu_seconds[q] / total for q in weights}
    errors = {q: abs(shares[q] / (weights[q] / weight_total) - 1) for q in weights}
    return max(errors.values()), shares


# --- 3. GpuJob -> Pod throughput with queues vs without (emulator)


class QueueBench(Bench):
    queue: str | None = None

    async def create(self, name: str, run: Run | None) -> None:
        spec = {
            "type": "train_lora",
            "gpus": 1,
            "params": {"baseModel": "tiny-llama", "dataset": {"text": ["x"]}, "epochs": 1},
        }
        if self.queue:
            spec["queue"] = self.queue
        body = {"apiVersion": "gpujob.dev/v1alpha1", "kind": "GpuJob", "metadata": {"name": name}, "spec": spec}
        async with self.session.post(f"{self.base}{GJ_PATH}", json=body) as resp:
            if resp.status != 201:
                raise RuntimeError(f"create {name}: {resp.status} {await resp.text()}")
        if run is not None:
            run.created[name] = time.monotonic()

    async def make_queue(self, name: str, gpus: int) -> None:
        body = {"apiVersion": "gpujob.dev/v1alpha1", "kind": "GpuQueue", "metadata": {"name": name},
                "spec": {"quota": {GPU: gpus}}}  # fmt: skip
        async with self.session.post(f"{self.base}{Q_PATH}", json=body) as resp:
            if resp.status != 201:
                raise RuntimeError(f"create GpuQueue {name}: {resp.status} {await resp.text()}")


@dataclass
class Burst:
    """One burst's figures: jobs/s until every Pod exists, the operator's API writes (create, patch, delete) and
    CPU seconds per job. Writes and CPU hardly depend on what else runs on the machine; the rate does."""

    rate: float
    writes: float
    cpu_ms: float


async def throughput(burst: int, repeat: int) -> tuple[list[Burst], list[Burst]]:
    import aiohttp

    without: list[Burst] = []
    with_queue: list[Burst] = []
    with tempfile.TemporaryDirectory(prefix="gpujob-bench-queues-") as tmp:
        bench = QueueBench(Path(tmp))
        try:
            async with aiohttp.ClientSession(
                headers={"Authorization": "Bearer sandbox"}, connector=aiohttp.TCPConnector(limit=64)
            ) as session:
                bench.session = session
                operator = bench.start_operator()
                await asyncio.sleep(1.0)
                await bench.make_queue("bench", 1_000_000)  # never binds: the cost of admission itself
                for rep in range(repeat):
                    for label, queue, out in (("plain", None, without), ("queued", "bench", with_queue)):
                        bench.queue = queue
                        await asyncio.sleep(2.0)  # the previous burst's tail (Events, queue status) is over
                        await bench.requests(reset=True)
                        cpu = operator.cpu_seconds()
                        _, t0, last = await bench.measured(f"{label}{rep}-", burst, None)
                        cpu = operator.cpu_seconds() - cpu
                        counts = (await bench.requests())["requests"]
                        writes = sum(
                            r["count"]
                            for r in counts
                            if r["verb"] in WRITES and r["resource"] in ("pods", "gpujobs", "gpuqueues")
                        )
                        writes -= burst  # the client's own GpuJob creates
                        out.append(Burst(burst / (last - t0), writes / burst, cpu * 1000 / burst))
        finally:
            if bench.operator is not None:
                bench.operator.stop()
            bench.sandbox.stop()
    return without, with_queue


def main(args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, str]] = []
    seconds, rates, decided = decisions(args.pending, args.queues, args.repeat_plan)
    rows.append((
        f"plan() over {decided:,} pending jobs in {args.queues} full queues",
        spread([s * 1000 for s in seconds], "{:,.0f}") + " ms",
        f"{args.repeat_plan} runs",
    ))  # fmt: skip
    rows.append(("admission decisions/s (jobs admitted or placed per second)", spread(rates, "{:,.0f}") + " /s", ""))
    benchrows.row(f"plan(), {decided:,} pending in {args.queues} queues", [s * 1000 for s in seconds], "ms")
    benchrows.row("admission decisions/s", rates, "decisions/s")

    for label, weights, lender in (
        ("weights 1:3", {"w1": 1, "w3": 3}, 16),
        ("10 queues, weights 1..10", {f"w{i}": i for i in range(1, 11)}, 110),
    ):
        error, shares = fairness(weights, lender, args.sim_seconds)
        shown = ", ".join(f"{q} {s:.3f}" for q, s in shares.items()) if len(shares) <= 3 else f"{len(shares)} queues"
        rows.append((f"fairness, {label}, {args.sim_seconds:,.0f} s saturated: max error", f"{error * 100:.2f} %",
                     f"target ≤ 5 % ({shown})"))  # fmt: skip
        benchrows.row(f"fairness error, {label}", [error * 100], "%", "target ≤ 5")

    if not args.skip_emulator:
        without, with_queue = asyncio.run(throughput(args.burst, args.repeat))
        jps = [b.rate for b in without], [b.rate for b in with_queue]
        ratio = statistics.median(jps[1]) / statistics.median(jps[0])
        paired = statistics.median(q.rate / p.rate for p, q in zip(without, with_queue, strict=True))
        what = f"burst of {args.burst}, %s: jobs/s until every Pod exists"
        rows.append((what % "no queue", spread(jps[0], "{:,.0f}") + " jobs/s", ""))
        note = f"{ratio:.2f}x of no queue (target ≥ 0.8); median of the paired bursts' ratios {paired:.2f}x"
        rows.append((what % "GpuQueue", spread(jps[1], "{:,.0f}") + " jobs/s", note))
        for label, runs in (("no queue", without), ("GpuQueue", with_queue)):
            rows.append((
                f"burst of {args.burst}, {label}: operator's API writes / CPU per job",
                spread([b.writes for b in runs], "{:.2f}") + " / " + spread([b.cpu_ms for b in runs], "{:.1f}") + " ms",
                "Pod, GpuJob and GpuQueue creates, patches, deletes",
            ))  # fmt: skip
        benchrows.row(f"burst {args.burst}, no queue", jps[0], "jobs/s")
        benchrows.row(f"burst {args.burst}, GpuQueue", jps[1], "jobs/s", f"{ratio:.2f}x, target ≥ 0.8")
        benchrows.row(f"burst {args.burst}, no queue: API writes per job", [b.writes for b in without], "writes")
        benchrows.row(f"burst {args.burst}, GpuQueue: API writes per job", [b.writes for b in with_queue], "writes")

    benchrows.table("measure", rows, 24)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--queues", type=int, default=10)
    parser.add_argument("--repeat-plan", type=int, default=5, help="plan() runs over the pending jobs")
    parser.add_argument("--sim-seconds", type=float, default=20_000.0, help="simulated seconds of the fairness runs")
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="alternated bursts without and with a queue")
    parser.add_argument("--skip-emulator", action="store_true", help="only the pure measures (1 and 2)")
    main(parser.parse_args())
