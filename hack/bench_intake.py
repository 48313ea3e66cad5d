#!/usr/bin/env python3
"""Intake benchmark: stream requests -> GpuJobs, against the ceiling of the same API server; event latency.

1. Ceiling: N GpuJob creates with a bare async client (the operator's own k8s wrapper, the same bodies, the same
   concurrency as the bridge), before and after the bridge run; the ceiling is their mean.
2. Bridge: N requests XADDed to the stream beforehand, then the bridge turns them into GpuJobs; timed from the
   bridge's start to the last acknowledgement.
3. Event latency, end to end: the real operator (`gpujob operator`, a subprocess) runs M jobs; a kubelet's status
   write (Pod Running, then Succeeded) is timed to the `running`/`succeeded` event reaching a Pub/Sub subscriber.
   Also the publish path alone (EventPublisher -> subscriber), the floor of that latency.

The API emulator runs in this process on its own thread (EmulatorThread), redis-server as a child process.

    .venv/bin/python hack/bench_intake.py [--requests 10000] [--repeat 3] [--api-latency-ms 0]
                                          [--latency-jobs 100] [--publishes 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio
from kubernetes_asyncio import client

from gpujob import kube
from gpujob.api.constants import Label
from gpujob.api.request import JobRequest
from gpujob.bridge.intake import Bridge, gpujob_body, intake_client
from gpujob.events import EventPublisher, async_client, make_event
from gpujob.sandbox import EmulatorThread
from gpujob.sandbox.controlplane import ControlPlane, bin_dir
from gpujob.sandbox.procs import RedisServer, free_port
from gpujob.sandbox.realcluster import Rest, crd_files, install_crds
from gpujob.settings import Settings

sys.path.insert(0, str(Path(__file__).parent))
import benchrows

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"
TARGET_RATIO = 0.8
TARGET_P99_MS = 50.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISS"


def namespace(emulator: EmulatorThread, name: str) -> str:
    emulator.create_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    return name


def request_json(job_id: str) -> str:
    params = {"baseModel": "tiny-llama", "dataset": {"s3Key": "datasets/bench.jsonl"}, "epochs": 3, "rank": 8}
    return json.dumps({"jobId": job_id, "type": "train_lora", "gpus": 1, "params": params})


# --- 1. the ceiling: the same creates without Redis
async def raw_creates(ns: str, n: int, concurrency: int, prefix: str) -> float:
    bodies = [gpujob_body(JobRequest.model_validate_json(request_json(f"{prefix}-{i}")), f"0-{i}") for i in range(n)]
    queue = iter(bodies)

    async def worker() -> None:
        for body in queue:
            await kube.create_gpujob(ns, body)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


# --- 2. the bridge
async def bridge_run(settings: Settings, n: int, prefix: str) -> tuple[float, dict[str, int]]:
    r = intake_client(settings)
    await r.delete(settings.request_stream)
    for chunk in range(0, n, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(chunk, min(n, chunk + 1000)):
            pipe.xadd(settings.request_stream, {"job": request_json(f"{prefix}-{i}")})
        await pipe.execute()
    bridge = Bridge(settings, r)
    stop = asyncio.Event()
    start = time.perf_counter()
    task = asyncio.create_task(bridge.run(stop))
    done = bridge.stats.requests_total
    while done["created"] + done["duplicate"] + done["dead_lettered"] < n:
        if task.done():
            raise RuntimeError("the bridge stopped")
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - start
    stop.set()
    await task
    await r.aclose()
    return n / elapsed, dict(done)


# --- 3. event latency
async def subscriber(r: redis.asyncio.Redis, prefix: str, seen: dict[tuple[str, str], float]) -> None:
    async with r.pubsub() as pubsub:
        await pubsub.psubscribe(f"{prefix}*")
        async for message in pubsub.listen():
            if message["type"] == "pmessage":
                event = json.loads(message["data"])
                seen.setdefault((event["jobId"], event["status"]), time.perf_counter())


async def wait_for(predicate: Callable[[], Awaitable[Any] | Any], timeout: float, what: str) -> Any:
    deadline = time.perf_counter() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def pod_status(phase: str) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if phase == "Running":
        state: dict[str, Any] = {"running": {"startedAt": now}}
    else:
        state = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}
    container = {"name": "worker", "ready": phase == "Running", "restartCount": 0, "image": "x", "imageID": ""}
    return {"status": {"phase": phase, "containerStatuses": [{**container, "state": state}]}}


async def publish_latency(settings: Settings, count: int) -> list[float]:
    r = async_client(settings)
    seen: dict[tuple[str, str], float] = {}
    listener = asyncio.create_task(subscriber(async_client(settings), settings.progress_channel_prefix, seen))
    publisher = EventPublisher(r, settings)
    await publisher.publish(make_event("warm-up", "queued", 0))
    await wait_for(lambda: ("warm-up", "queued") in seen, 5, "the subscriber")
    samples = []
    for i in range(count):
        start = time.perf_counter()
        await publisher.publish(make_event(f"pub-{i}", "running", 50.0, "measuring"))
        await wait_for(lambda i=i: (f"pub-{i}", "running") in seen, 5, "an event")  # type: ignore[misc]
        samples.append(seen[(f"pub-{i}", "running")] - start)
    listener.cancel()
    await r.aclose()
    return samples


async def operator_latency(settings: Settings, kubeconfig: Path, jobs: int, workdir: Path) -> list[float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_")}
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else ""
    env.update(
        KUBECONFIG=str(kubeconfig), GPUJOB_REDIS_URL=redis_url, GPUJOB_BRIDGE="false",
        GPUJOB_METRICS_PORT=str(free_port()), GPUJOB_LOG_LEVEL="INFO",  # INFO: the ready line
        GPUJOB_WORKER_IMAGE="registry.test/gpujob-worker:bench", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    log = workdir / "operator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gpujob.cli", "operator"], env=env, stdout=out, stderr=out)
    seen: dict[tuple[str, str], float] = {}
    listener = asyncio.create_task(subscriber(async_client(settings), settings.progress_channel_prefix, seen))
    try:
        await wait_for(lambda: "operator started" in log.read_text(errors="replace"), 60, "the operator")
        core: Any = client.CoreV1Api(await kube.api_client())
        names = [f"lat-{i}" for i in range(jobs)]
        for name in names:
            await kube.create_gpujob("default", gpujob_body(JobRequest.model_validate_json(request_json(name)), "0-0"))

        async def pods() -> dict[str, str]:
            listed = await core.list_namespaced_pod("default", label_selector=Label.JOB_NAME.value)
            return {p.metadata.labels[Label.JOB_NAME]: p.metadata.name for p in listed.items}

        pod_of = await wait_for(lambda: _all(pods(), len(names)), 120, "every Pod")
        await wait_for(lambda: all((n, "scheduled") in seen for n in names), 60, "every scheduled event")
        samples = []
        for name in names:  # one at a time: latency, not queueing
            for phase, status in (("Running", "running"), ("Succeeded", "succeeded")):
                start = time.perf_counter()
                await core.patch_namespaced_pod_status(pod_of[name], "default", pod_status(phase))
                await wait_for(lambda n=name, s=status: (n, s) in seen, 10, f"{status} of {name}")  # type: ignore[misc]
                samples.append(seen[(name, status)] - start)
        return samples
    finally:
        listener.cancel()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _all(pods: Awaitable[dict[str, str]], expected: int) -> dict[str, str] | None:
    found = await pods
    return found if len(found) >= expected else None


def settings_for(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, consumer_name="bench", read_block_ms=100)


async def intake_round(
    settings: Settings, n: int, workdir: Path, round_no: int, latency: float, cp: ControlPlane | None
) -> tuple[float, float, float]:
    """One round: ceiling before, bridge, ceiling after -> (bridge, ceiling, ratio). On a fresh emulator, or on
    the real control plane `cp` (fresh namespaces each round)."""
    with contextlib.ExitStack() as stack:
        if cp is None:
            emulator = stack.enter_context(EmulatorThread(crd_dirs=[CRDS]))
            emulator.set_faults(latency_seconds=latency)
            os.environ["KUBECONFIG"] = str(emulator.write_kubeconfig(workdir / f"kubeconfig-{round_no}"))

            def fresh(name: str) -> str:
                return namespace(emulator, name)
        else:
            os.environ["KUBECONFIG"] = str(cp.kubeconfig)
            rest = Rest(cp.kubeconfig)

            def fresh(name: str) -> str:
                rest.create("/api/v1/namespaces", {"metadata": {"name": f"{name}-{round_no}"}})
                return f"{name}-{round_no}"

        concurrency = settings.concurrency
        raw_before = await raw_creates(fresh("bench-raw-1"), n, concurrency, "raw")
        settings = settings.model_copy(update={"namespace": fresh("bench-bridge")})
        if cp is not None and round_no == 1:  # a fresh apiserver warms up (caches, etcd): not measured
            await raw_creates(fresh("bench-warm-up"), n, concurrency, "warm")
        # jobIds new to this round: the bridge remembers the jobIds it created GpuJobs for (a duplicate is acked only)
        bridge_rate, outcomes = await bridge_run(settings, n, f"req-{round_no}")
        raw_after = await raw_creates(fresh("bench-raw-2"), n, concurrency, "raw")
        await kube.close()
    if outcomes != {"created": n}:
        raise RuntimeError(f"the bridge did not create every GpuJob: {outcomes}")
    ceiling = (raw_before + raw_after) / 2
    print(f"  round {round_no}: ceiling {raw_before:,.0f} | {raw_after:,.0f} creates/s, bridge {bridge_rate:,.0f} "
          f"requests/s, ratio {bridge_rate / ceiling:.2f}", flush=True)  # fmt: skip
    return bridge_rate, ceiling, bridge_rate / ceiling


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="gpujob-bench-intake-"))
    table: list[tuple[str, list[float], str, str]] = []  # name, values, unit, note
    with RedisServer() as redis_server:
        settings = settings_for(redis_server.url)
        where = "a real control plane" if args.api == "kubernetes" else "emulator in-process"
        print(f"intake benchmark: {args.requests:,} requests x {args.repeat} rounds, concurrency "
              f"{settings.concurrency}, read batch {settings.read_batch}; {where} "
              f"(+{args.api_latency_ms} ms per API request), local redis-server",
              flush=True)  # fmt: skip
        latency = args.api_latency_ms / 1000
        with contextlib.ExitStack() as stack:
            cp = None
            if args.api == "kubernetes":
                cp = stack.enter_context(ControlPlane(workdir / "kube", binaries=bin_dir(build=True)))
                install_crds(Rest(cp.kubeconfig), crd_files([CRDS]))
            rounds = [await intake_round(settings, args.requests, workdir, i + 1, latency, cp)
                      for i in range(args.repeat)]  # fmt: skip
        bridge, ceiling, ratio = (list(column) for column in zip(*rounds, strict=True))
        mid = statistics.median(ratio)
        table += [
            ("create ceiling, bare async client", ceiling, "creates/s", "same bodies, same concurrency"),
            ("bridge, stream -> GpuJob (acked)", bridge, "requests/s", ""),
            ("bridge / ceiling", ratio, "ratio", f"target >= {TARGET_RATIO} (median) {verdict(mid >= TARGET_RATIO)}"),
        ]

        pub = [s * 1000 for s in await publish_latency(settings, args.publishes)]
        table += [
            ("publish -> subscriber p50", [percentile(pub, 50)], "ms", f"{len(pub)} events"),
            ("publish -> subscriber p99", [percentile(pub, 99)], "ms", f"{len(pub)} events"),
        ]
        if args.latency_jobs:
            with EmulatorThread(crd_dirs=[CRDS]) as emulator:
                kubeconfig = emulator.write_kubeconfig(workdir / "kubeconfig-latency")
                os.environ["KUBECONFIG"] = str(kubeconfig)
                lat = [s * 1000 for s in await operator_latency(settings, kubeconfig, args.latency_jobs, workdir)]
                await kube.close()
            p99 = percentile(lat, 99)
            table += [
                ("pod phase change -> subscriber p50", [percentile(lat, 50)], "ms", f"{len(lat)} events"),
                ("pod phase change -> subscriber p99", [p99], "ms",
                 f"{len(lat)} events; target <= {TARGET_P99_MS:.0f} {verdict(p99 <= TARGET_P99_MS)}"),
            ]  # fmt: skip

    width = max(len(name) for name, *_ in table)
    print(f"\n  {'measure':<{width}}  {'median':>10}  {'min':>10}  {'max':>10}  unit / note")
    for name, values, unit, note in table:
        low, mid, high = min(values), statistics.median(values), max(values)
        print(f"  {name:<{width}}  {mid:>10,.2f}  {low:>10,.2f}  {high:>10,.2f}  {unit} {note}")
    for name, values, unit, note in table:
        benchrows.row(name, values, unit, note)  # for hack/bench.py


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--latency-jobs", type=int, default=100, help="jobs run by the real operator (0 = skip)")
    parser.add_argument(
        "--api",
        choices=["emulator", "kubernetes"],
        default="emulator",
        help="where the ceiling and the bridge create GpuJobs: the emulator or a real control plane",
    )
    parser.add_argument("--publishes", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of ceiling/bridge/ceiling")
    parser.add_argument("--api-latency-ms", type=float, default=0.0,
                        help="added to every API request (as a real API server's; 0 = the emulator as is)")  # fmt: skip
    asyncio.run(main(parser.parse_args()))
