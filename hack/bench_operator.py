#!/usr/bin/env python3
"""Operator benchmark: GpuJob -> Pod throughput and latency, API requests per job, RSS, resync time.

Runs three processes side by side on this machine, as a cluster would: the API emulator (`gpujob sandbox`),
the operator (`gpujob operator`) and this client. Prints one table: the burst repeated (median [min-max]),
the rest from one run; the operator's RSS at start, after the burst, with 10,000 jobs and after a resync.

    .venv/bin/python hack/bench_operator.py [--burst 1000] [--steady-rate 100] [--steady-seconds 10] \
        [--resync 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import benchrows

REPO = Path(__file__).resolve().parents[1]
GJ_PATH = "/apis/gpujob.dev/v1alpha1/namespaces/default/gpujobs"
POD_WATCH = "/api/v1/namespaces/default/pods?watch=true&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dgpujob-operator"


def spread(values: list[float], fmt: str) -> str:
    """`median` for one value, `median [min-max]` for several."""
    mid = fmt.format(statistics.median(values))
    return mid if len(values) == 1 else f"{mid} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def spread_note(repeat: int) -> str:
    return f" (median [min-max] of {repeat})" if repeat > 1 else ""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path, ready: str, timeout: float = 60) -> None:
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while ready not in log.read_text(errors="replace"):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[3:5]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()


@dataclass
class Run:
    created: dict[str, float] = field(default_factory=dict)
    pod_seen: dict[str, float] = field(default_factory=dict)

    def latencies(self) -> list[float]:
        return [self.pod_seen[n] - self.created[n] for n in self.created if n in self.pod_seen]


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.kubeconfig = workdir / "kubeconfig"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        gpujob = [sys.executable, "-m", "gpujob.cli"]
        self.sandbox = Proc(
            [
                *gpujob,
                "sandbox",
                "--kubeconfig",
                str(self.kubeconfig),
                "--crds",
                str(REPO / "crds"),
                "--no-kubelet",
                "--no-redis",
                "--no-s3",
                "--no-operator",  # the bench starts and measures its own (two would race for every job)
                "--state-dir",
                str(workdir / "state"),
            ],
            env,
            workdir / "sandbox.log",
            "ready",
        )
        self.base = yaml.safe_load(self.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        self.operator_env = {
            **env,
            "KUBECONFIG": str(self.kubeconfig),
            "GPUJOB_LOG_FORMAT": "json",
            "GPUJOB_LOG_LEVEL": "WARNING",
            "GPUJOB_METRICS_PORT": "0",
        }
        self.operator: Proc | None = None
        self.session: aiohttp.ClientSession

    def start_operator(self) -> Proc:
        gpujob = [sys.executable, "-m", "gpujob.cli", "operator"]
        env = {**self.operator_env, "GPUJOB_LOG_LEVEL": "INFO"}
        self.operator = Proc(gpujob, env, self.workdir / "operator.log", "operator started")
        return self.operator

    async def requests(self, reset: bool = False) -> dict[str, Any]:
        method = self.session.post if reset else self.session.get
        async with method(f"{self.base}/_sandbox/requests") as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def create(self, name: str, run: Run | None) -> None:
        body = {
            "apiVersion": "gpujob.dev/v1alpha1",
            "kind": "GpuJob",
            "metadata": {"name": name},
            "spec": {
                "type": "train_lora",
                "gpus": 1,
                "params": {"baseModel": "tiny-llama", "dataset": {"text": ["x"]}, "epochs": 1},
            },
        }
        async with self.session.post(f"{self.base}{GJ_PATH}", json=body) as resp:
            if resp.status != 201:
                raise RuntimeError(f"create {name}: {resp.status} {await resp.text()}")
        if run is not None:
            run.created[name] = time.monotonic()

    async def create_many(
        self, names: list[str], run: Run | None, rate: float | None = None, concurrency: int = 32
    ) -> None:
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for item in enumerate(names):
            queue.put_nowait(item)
        start = time.monotonic()

        async def worker() -> None:
            while not queue.empty():
                index, name = queue.get_nowait()
                if rate:  # open loop: each request leaves at its own time, whatever the others do
                    await asyncio.sleep(max(0.0, start + index / rate - time.monotonic()))
                await self.create(name, run)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def watch_pods(self, run: Run, expected: int, ready: asyncio.Event, timeout: float) -> None:
        async with self.session.get(
            f"{self.base}{POD_WATCH}&timeoutSeconds={int(timeout)}", timeout=aiohttp.ClientTimeout(total=timeout + 5)
        ) as resp:
            ready.set()
            async for line in resp.content:
                event = json.loads(line)
                if event.get("type") != "ADDED":
                    continue
                job = event["object"]["metadata"]["labels"].get("gpujob.dev/job-name", "")
                if job in run.created or job.startswith(self.prefix):
                    run.pod_seen.setdefault(job, time.monotonic())
                if len([j for j in run.pod_seen if j.startswith(self.prefix)]) >= expected:
                    return

    prefix = ""

    async def measured(
        self, prefix: str, count: int, rate: float | None, timeout: float = 300
    ) -> tuple[Run, float, float]:
        self.prefix = prefix
        run = Run()
        ready = asyncio.Event()
        watcher = asyncio.create_task(self.watch_pods(run, count, ready, timeout))
        await ready.wait()
        names = [f"{prefix}{i:05d}" for i in range(count)]
        t0 = time.monotonic()
        await self.create_many(names, run, rate=rate)
        await asyncio.wait_for(watcher, timeout)
        last = max(run.pod_seen[n] for n in names)
        return run, t0, last

    async def count_pods(self) -> int:
        async with self.session.get(f"{self.base}/api/v1/namespaces/default/pods") as resp:
            return len((await resp.json())["items"])

    async def delete_all_jobs(self) -> None:
        """Only for the raw-rate jobs (no Pods). Not between bursts: with the emulator, a collection delete of
        GpuJobs left their Pods behind, and after deleting those too the next burst saw ~10% of its Pods
        vanish (extra attempts), with HEAD's operator as well: to be looked into, not hidden in a figure."""
        async with self.session.delete(f"{self.base}{GJ_PATH}") as resp:
            await resp.read()
        while await self.count_pods():
            await asyncio.sleep(0.2)


def print_requests(what: str, counts: dict[str, Any]) -> None:
    print(f"API requests during the {what}:")
    for row in counts["requests"]:
        print(
            f"  {row['count']:>7} {row['verb']:<8} {row['group'] or 'core'}/{row['resource']}"
            f"{'/' + row['subresource'] if row['subresource'] else ''}"
        )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="gpujob-bench-") as tmp:
        bench = Bench(Path(tmp))
        rows: list[tuple[str, str, str]] = []
        try:
            async with aiohttp.ClientSession(
                headers={"Authorization": "Bearer sandbox"}, connector=aiohttp.TCPConnector(limit=64)
            ) as session:
                bench.session = session
                # 1. Ceiling: the same API server, a bare async client, no operator.
                t0 = time.monotonic()
                await bench.create_many([f"raw-{i:05d}" for i in range(args.burst)], None)
                raw_rate = args.burst / (time.monotonic() - t0)
                rows.append(("raw API create rate (bare client, no operator)", f"{raw_rate:,.0f} creates/s", ""))
                await bench.delete_all_jobs()

                operator = bench.start_operator()
                await asyncio.sleep(1.0)
                await bench.requests(reset=True)
                rows.append(("operator RSS at start (imports, no jobs)", f"{operator.peak_rss_mb():.0f} MB", ""))
                # 2. Burst, `--repeat` times (this machine is noisy): median [min-max] of each measure.
                rates, spans, p50s, p99s, per_job = [], [], [], [], []
                for rep in range(args.repeat):
                    # Earlier bursts' jobs stay (they count towards the 10,000): deleting them between bursts
                    # showed extra attempts in the next burst, with HEAD's operator too (see delete_all_jobs).
                    if rep:
                        await asyncio.sleep(2.0)
                    await bench.requests(reset=True)
                    run, t0, last = await bench.measured(f"burst{rep}-", args.burst, None)
                    counts = await bench.requests()
                    if args.verbose:
                        print_requests(f"burst {rep}", counts)
                    keyed = sum(row["count"] for row in counts["requests"])
                    own = args.burst + 1  # the client's creates + its watch
                    lat = run.latencies()
                    rates.append(args.burst / (last - t0))
                    spans.append(last - t0)
                    p50s.append(percentile(lat, 50))
                    p99s.append(percentile(lat, 99))
                    per_job.append((keyed - own) / args.burst)
                raw_ratio = statistics.median(rates) / raw_rate
                rows += [
                    (
                        f"burst of {args.burst}: jobs/s until every Pod exists{spread_note(args.repeat)}",
                        spread(rates, "{:,.0f}") + " jobs/s",
                        f"{raw_ratio:.2f} of ceiling",
                    ),
                    (
                        f"burst of {args.burst}: first create -> last Pod",
                        spread(spans, "{:.2f}") + " s",
                        "target ≤ 8 s",
                    ),
                    (f"burst of {args.burst}: create -> Pod latency p50", spread(p50s, "{:.3f}") + " s", ""),
                    (f"burst of {args.burst}: create -> Pod latency p99", spread(p99s, "{:.3f}") + " s", ""),
                    (
                        "API requests per job (operator's, from the emulator log)",
                        f"{statistics.median(per_job):.2f} (+1 client create)",
                        "target ≤ 4",
                    ),
                    ("operator peak RSS after the burst", f"{operator.peak_rss_mb():.0f} MB", ""),
                ]
                benchrows.row(f"burst {args.burst}: jobs/s", rates, "jobs/s", "target ≥ 150")
                benchrows.row(f"burst {args.burst}: last Pod", spans, "s", "target ≤ 8")
                benchrows.row(f"burst {args.burst}: latency p99", p99s, "s")
                benchrows.row("API requests per job", per_job, "requests")
                await asyncio.sleep(2.0)
                # 3. Steady rate.
                n_steady = int(args.steady_rate * args.steady_seconds)
                run, t0, last = await bench.measured("steady-", n_steady, args.steady_rate)
                lat = run.latencies()
                benchrows.row(f"steady {args.steady_rate:g}/s: latency p99", [percentile(lat, 99)], "s", "target ≤ 0.5")
                rows.append(
                    (
                        f"steady {args.steady_rate:g} jobs/s for {args.steady_seconds:g}s: latency p50 / p99",
                        f"{percentile(lat, 50):.3f} / {percentile(lat, 99):.3f} s",
                        "target p99 ≤ 0.5 s",
                    )
                )
                # 4. Resync with many jobs present.
                have = args.burst * args.repeat + n_steady
                if args.resync > have:
                    await bench.create_many([f"fill-{i:05d}" for i in range(args.resync - have)], None)
                    while await bench.count_pods() < args.resync:
                        await asyncio.sleep(1.0)
                peak_with_jobs = operator.peak_rss_mb()
                rows.append(
                    (
                        f"operator peak RSS with {max(args.resync, have):,} GpuJobs",
                        f"{peak_with_jobs:.0f} MB",
                        "target ≤ 250 MB",
                    )
                )
                operator.stop()
                await bench.requests(reset=True)
                t_start = time.monotonic()
                operator = bench.start_operator()
                # Resynced when the operator has gone quiet: no CPU used for a whole second.
                cpu, quiet_since = operator.cpu_seconds(), time.monotonic()
                while time.monotonic() - quiet_since < 1.0:
                    await asyncio.sleep(0.1)
                    now_cpu = operator.cpu_seconds()
                    if now_cpu - cpu > 0.02:
                        cpu, quiet_since = now_cpu, time.monotonic()
                resync = quiet_since - t_start
                counts = await bench.requests()
                if args.verbose:
                    print_requests("resync", counts)
                patches = sum(r["count"] for r in counts["requests"] if r["verb"] in {"patch", "update", "create"})
                jobs = max(args.resync, have)
                benchrows.row(f"peak RSS, {jobs:,} jobs", [peak_with_jobs], "MB", "target ≤ 250")
                benchrows.row(f"resync, {jobs:,} jobs", [resync], "s", "target ≤ 30")
                benchrows.row(f"peak RSS after resync, {jobs:,} jobs", [operator.peak_rss_mb()], "MB", "target ≤ 250")
                rows += [
                    (
                        f"resync after restart with {max(args.resync, have):,} GpuJobs",
                        f"{resync:.1f} s",
                        "target ≤ 30 s",
                    ),
                    ("writes during the resync (status patches, creates)", f"{patches}", "must be 0"),
                    ("operator peak RSS after resync", f"{operator.peak_rss_mb():.0f} MB", "target ≤ 250 MB"),
                ]
        finally:
            if bench.operator is not None:
                bench.operator.stop()
            bench.sandbox.stop()
        benchrows.table("measure", rows, 18)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--steady-rate", type=float, default=100.0)
    parser.add_argument("--steady-seconds", type=float, default=10.0)
    parser.add_argument("--resync", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="run the burst this many times (median [min-max])")
    parser.add_argument("--verbose", action="store_true", help="print the API request breakdown of the burst")
    asyncio.run(main(parser.parse_args()))
