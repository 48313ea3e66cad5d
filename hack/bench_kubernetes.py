#!/usr/bin/env python3
"""The operator on the real control plane, side by side with the batch/v1 Job controller of the same
kube-controller-manager: Pods/s for a burst, create -> Pod latency at a steady rate, apiserver requests per job
(from the apiserver's audit log, by user), operator RSS and resync time with many GpuJobs.

One control plane (built from Go modules), no nodes: Pods stay Pending, which is all "create -> Pod" needs, and
no kubelet competes for the two cores. The Job controller runs once at its default client QPS and once at a QPS
as high as the operator's (the operator's clients have no client-side rate limit: we give the controller 1000).

    .venv/bin/python hack/bench_kubernetes.py [--burst 1000] [--steady-rate 100] [--steady-seconds 10] \
        [--resync 10000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
import benchrows
from bench_operator import Proc, Run, percentile, spread

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from gpujob.sandbox.controlplane import ControlPlane, bin_dir  # noqa: E402
from gpujob.sandbox.realcluster import Rest, crd_files, install_crds, prepare_namespace  # noqa: E402

GJ_NS, JOB_NS = "bench-gpujobs", "bench-jobs"
OPERATOR_SA = ("gpujob-system", "gpujob-operator")
JOB_CONTROLLER = "system:serviceaccount:kube-system:job-controller"
FAST_QPS = ["--kube-api-qps=1000", "--kube-api-burst=1000"]


class Cluster:
    def __init__(self, cp: ControlPlane, session: aiohttp.ClientSession) -> None:
        self.cp, self.session = cp, session
        self.ssl = ssl.create_default_context(cafile=str(cp.serving_ca))

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, self.cp.url + path, json=body, ssl=self.ssl) as resp:
            text = await resp.text()
            if resp.status >= 400 and resp.status != 409:
                raise RuntimeError(f"{method} {path}: {resp.status} {text[:300]}")
            return json.loads(text) if text else {}

    async def create(self, kind: str, name: str, run: Run | None) -> None:
        if kind == "pod":
            container = {"name": "main", "image": "local/none", "command": ["true"]}
            body: dict[str, Any] = {"metadata": {"name": name}, "spec": {"containers": [container]}}
            path = f"/api/v1/namespaces/{JOB_NS}/pods"
        elif kind == "gpujob":
            body = {
                "apiVersion": "gpujob.dev/v1alpha1",
                "kind": "GpuJob",
                "metadata": {"name": name},
                # No Node runs them: they stay Pending on purpose, so the pending timeout (600 s by default) must
                # not fire during a long run (it did: 25,000 writes in a "resync" were retries of timed-out jobs).
                "spec": {
                    "type": "train_lora",
                    "gpus": 1,
                    "params": {"baseModel": "tiny-llama", "dataset": {"text": ["x"]}, "epochs": 1},
                    "pendingTimeoutSeconds": 86400,
                },
            }
            path = f"/apis/gpujob.dev/v1alpha1/namespaces/{GJ_NS}/gpujobs"
        else:
            container = {"name": "main", "image": "local/none", "command": ["true"]}
            body = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": name},
                "spec": {
                    "backoffLimit": 0,
                    "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
                },
            }
            path = f"/apis/batch/v1/namespaces/{JOB_NS}/jobs"
        await self.call("POST", path, body)
        if run is not None:
            run.created[name] = time.monotonic()

    async def create_many(self, kind: str, names: list[str], run: Run | None, rate: float | None = None) -> None:
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for item in enumerate(names):
            queue.put_nowait(item)
        start = time.monotonic()

        async def worker() -> None:
            while not queue.empty():
                index, name = queue.get_nowait()
                if rate:
                    await asyncio.sleep(max(0.0, start + index / rate - time.monotonic()))
                await self.create(kind, name, run)

        await asyncio.gather(*(worker() for _ in range(32)))

    async def watch_pods(self, kind: str, run: Run, expected: int, ready: asyncio.Event, timeout: float) -> None:
        ns = GJ_NS if kind == "gpujob" else JOB_NS
        label = "gpujob.dev/job-name" if kind == "gpujob" else "batch.kubernetes.io/job-name"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # a watch the server ends early is started again (its ADDED replay)
            left = max(1, int(deadline - time.monotonic()))
            path = f"/api/v1/namespaces/{ns}/pods?watch=true&timeoutSeconds={left}"
            client_timeout = aiohttp.ClientTimeout(total=left + 5)
            async with self.session.get(self.cp.url + path, ssl=self.ssl, timeout=client_timeout) as resp:
                ready.set()
                async for line in resp.content:
                    event = json.loads(line)
                    if event.get("type") != "ADDED":
                        continue
                    job = (event["object"]["metadata"].get("labels") or {}).get(label, "")
                    if job.startswith(self.prefix):
                        run.pod_seen.setdefault(job, time.monotonic())
                    if len([j for j in run.pod_seen if j.startswith(self.prefix)]) >= expected:
                        return

    prefix = ""

    async def measured(self, kind: str, prefix: str, count: int, rate: float | None) -> tuple[Run, float, float]:
        self.prefix = prefix
        run = Run()
        ready = asyncio.Event()
        watcher = asyncio.create_task(self.watch_pods(kind, run, count, ready, 600))
        await ready.wait()
        names = [f"{prefix}{i:05d}" for i in range(count)]
        t0 = time.monotonic()
        await self.create_many(kind, names, run, rate=rate)
        await asyncio.wait_for(watcher, 660)
        missing = [n for n in names if n not in run.pod_seen]
        if missing:
            raise RuntimeError(f"{len(missing)} of {count} Pods never seen (first: {missing[0]})")
        return run, t0, max(run.pod_seen[n] for n in names)

    async def count_pods(self, ns: str) -> int:
        listing = await self.call("GET", f"/api/v1/namespaces/{ns}/pods?limit=500")
        total = len(listing["items"])
        while listing["metadata"].get("continue"):
            token = listing["metadata"]["continue"]
            listing = await self.call("GET", f"/api/v1/namespaces/{ns}/pods?limit=500&continue={token}")
            total += len(listing["items"])
        return total


class Audit:
    """Requests per user from the apiserver's audit log (Metadata level, stage ResponseComplete)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def mark(self) -> None:
        time.sleep(1.5)  # the batch backend flushes about every second
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def since_mark(self, writes_only: bool = False) -> collections.Counter[str]:
        time.sleep(1.5)
        counts: collections.Counter[str] = collections.Counter()
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            for line in handle:
                event = json.loads(line)
                if event.get("stage") != "ResponseComplete":
                    continue
                if writes_only and event.get("verb") not in {"create", "update", "patch", "delete"}:
                    continue
                counts[event["user"]["username"]] += 1
        return counts


def operator_kubeconfig(cp: ControlPlane, workdir: Path) -> Path:
    """The operator's own identity (a ServiceAccount token, cluster-admin here: RBAC is not what is measured)."""
    rest = Rest(cp.kubeconfig)
    ns, name = OPERATOR_SA
    rest.create("/api/v1/namespaces", {"metadata": {"name": ns}})
    rest.create(f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": name}})
    binding = {
        "metadata": {"name": "bench-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
    }
    rest.create("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", binding)
    token = rest.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{name}/token", {"spec": {}})["status"][
        "token"
    ]
    from gpujob.sandbox.kubeconfig import write_kubeconfig

    return write_kubeconfig(
        workdir / "operator.kubeconfig", cp.url, GJ_NS, token=token, ca_pem=cp.serving_ca.read_bytes()
    )


def operator_env(cp: ControlPlane, workdir: Path) -> dict[str, str]:
    """The environment of an operator process watching GJ_NS with its own identity (JSON logs, no metrics port)."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "KUBECONFIG": str(operator_kubeconfig(cp, workdir)),
        "GPUJOB_LOG_FORMAT": "json",
        "GPUJOB_LOG_LEVEL": "INFO",
        "GPUJOB_METRICS_PORT": "0",
        "GPUJOB_NAMESPACE": GJ_NS,
    }


def quiet_after(proc: Proc, started: float) -> float:
    """Seconds from `started` until the process used no CPU for a whole second."""
    cpu, quiet_since = proc.cpu_seconds(), time.monotonic()
    while time.monotonic() - quiet_since < 1.0:
        time.sleep(0.1)
        now_cpu = proc.cpu_seconds()
        if now_cpu - cpu > 0.02:
            cpu, quiet_since = now_cpu, time.monotonic()
    return quiet_since - started


async def main(args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="gpujob-bench-kube-") as tmp:
        workdir = Path(tmp)
        cp = ControlPlane(workdir / "kube", binaries=bin_dir(build=True), audit=True)
        t0 = time.monotonic()
        cp.start()
        rows.append(
            (
                "control plane start (etcd, apiserver, controller-manager, scheduler)",
                f"{time.monotonic() - t0:.1f} s",
                "",
            )
        )
        rest = Rest(cp.kubeconfig)
        install_crds(rest, crd_files([REPO / "crds"]))
        for ns in (GJ_NS, JOB_NS):
            prepare_namespace(rest, ns, workdir / "models", restricted=False)
        audit = Audit(cp.audit_log)
        env = operator_env(cp, workdir)
        argv = [sys.executable, "-m", "gpujob.cli", "operator", "--namespace", GJ_NS]
        operator_user = f"system:serviceaccount:{OPERATOR_SA[0]}:{OPERATOR_SA[1]}"
        operator: Proc | None = None
        try:
            connector = aiohttp.TCPConnector(limit=64)
            headers = {"Authorization": f"Bearer {cp.token}"}
            async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
                cluster = Cluster(cp, session)
                # The ceiling: a bare client creating the Pods itself (what any controller's Pods/s is bounded by).
                pods = [f"raw-{i:05d}" for i in range(args.burst)]
                started = time.monotonic()
                await cluster.create_many("pod", pods, None)
                ceiling = args.burst / (time.monotonic() - started)
                rows.append(("ceiling: a bare client creating Pods, burst", f"{ceiling:,.0f} /s", ""))
                await cluster.call("DELETE", f"/api/v1/namespaces/{JOB_NS}/pods")
                operator = Proc(argv, env, workdir / "operator.log", "operator started")
                await asyncio.sleep(1.0)
                rows.append(("operator RSS at start", f"{operator.peak_rss_mb():.0f} MB", ""))
                results: dict[str, dict[str, list[float]]] = {}
                sides = [("gpujob", "GpuJob operator", None), ("job", "Job controller, default QPS", [])]
                sides.append(("job", "Job controller, QPS 1000", FAST_QPS))
                for kind, label, qps in sides:
                    if qps is not None:
                        cp.restart("kube-controller-manager", extra_args=qps)
                        await asyncio.sleep(2.0)
                    figures: dict[str, list[float]] = collections.defaultdict(list)
                    for rep in range(args.repeat):
                        audit.mark()
                        prefix = f"{label.split()[0].lower()}{len(results)}-b{rep}-"
                        run, start, last = await cluster.measured(kind, prefix, args.burst, None)
                        users = audit.since_mark()
                        lat = run.latencies()
                        figures["rate"].append(args.burst / (last - start))
                        figures["span"].append(last - start)
                        figures["p99"].append(percentile(lat, 99))
                        user = operator_user if kind == "gpujob" else JOB_CONTROLLER
                        figures["requests"].append(users[user] / args.burst)
                    n_steady = int(args.steady_rate * args.steady_seconds)
                    run, _, _ = await cluster.measured(
                        kind, f"{kind}{len(results)}-steady-", n_steady, args.steady_rate
                    )
                    lat = run.latencies()
                    figures["steady_p50"].append(percentile(lat, 50))
                    figures["steady_p99"].append(percentile(lat, 99))
                    results[label] = figures
                for label, figures in results.items():
                    rows += [
                        (f"{label}: burst of {args.burst}, Pods/s", spread(figures["rate"], "{:,.0f}") + " /s", ""),
                        (f"{label}: burst, first create -> last Pod", spread(figures["span"], "{:.2f}") + " s", ""),
                        (f"{label}: burst, create -> Pod p99", spread(figures["p99"], "{:.3f}") + " s", ""),
                        (
                            f"{label}: steady {args.steady_rate:g}/s, create -> Pod p50 / p99",
                            f"{figures['steady_p50'][0]:.3f} / {figures['steady_p99'][0]:.3f} s",
                            "target p99 ≤ 0.1 s" if label.startswith("GpuJob") else "",
                        ),
                        (
                            f"{label}: apiserver requests per job (audit log, its own user)",
                            spread(figures["requests"], "{:.2f}"),
                            "target ≤ 2" if label.startswith("GpuJob") else "",
                        ),
                    ]
                gj, fast = results["GpuJob operator"], results["Job controller, QPS 1000"]
                ratio = statistics.median(gj["rate"]) / statistics.median(fast["rate"])
                rows.append(("GpuJob Pods/s ÷ Job controller Pods/s at QPS 1000", f"{ratio:.2f}", "target ≥ 1"))
                rows.append(
                    ("GpuJob Pods/s ÷ bare-client ceiling", f"{statistics.median(gj['rate']) / ceiling:.2f}", "")
                )
                benchrows.row(f"kubernetes: GpuJob burst {args.burst}", gj["rate"], "Pods/s")
                benchrows.row(f"kubernetes: Job controller burst {args.burst}", fast["rate"], "Pods/s")
                benchrows.row("kubernetes: GpuJob steady p99", gj["steady_p99"], "s", "target ≤ 0.1")
                benchrows.row("kubernetes: operator requests per job", gj["requests"], "requests", "target ≤ 2")
                # Resync: fill up to --resync GpuJobs, restart the operator, time until it goes quiet.
                have = args.burst * args.repeat + int(args.steady_rate * args.steady_seconds)
                if args.resync > have:
                    await cluster.create_many("gpujob", [f"fill-{i:05d}" for i in range(args.resync - have)], None)
                    while await cluster.count_pods(GJ_NS) < args.resync:
                        await asyncio.sleep(2.0)
                jobs = max(args.resync, have)
                rows.append(
                    (f"operator peak RSS with {jobs:,} GpuJobs", f"{operator.peak_rss_mb():.0f} MB", "target ≤ 200 MB")
                )
                operator.stop()
                audit.mark()
                started = time.monotonic()
                operator = Proc(argv, env, workdir / "operator-2.log", "operator started", timeout=120)
                resync = quiet_after(operator, started)
                users = audit.since_mark()
                writes = audit.since_mark(writes_only=True)
                rows += [
                    (f"resync after restart with {jobs:,} GpuJobs", f"{resync:.1f} s", "target ≤ 15 s"),
                    (
                        "operator requests during the resync (of them writes)",
                        f"{users[operator_user]} ({writes[operator_user]})",
                        "writes must be 0",
                    ),
                    ("operator peak RSS after the resync", f"{operator.peak_rss_mb():.0f} MB", "target ≤ 200 MB"),
                ]
                benchrows.row(f"kubernetes: resync, {jobs:,} jobs", [resync], "s", "target ≤ 15")
                benchrows.row(f"kubernetes: peak RSS, {jobs:,} jobs", [operator.peak_rss_mb()], "MB", "target ≤ 200")
        finally:
            if operator is not None:
                operator.stop()
            cp.stop()
    benchrows.table("measure (real control plane)", rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--steady-rate", type=float, default=100.0)
    parser.add_argument("--steady-seconds", type=float, default=10.0)
    parser.add_argument("--resync", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=1, help="run each burst this many times (median [min-max])")
    asyncio.run(main(parser.parse_args()))
