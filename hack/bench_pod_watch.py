#!/usr/bin/env python3
"""Unrelated Pods cost the operator nothing: two operators side by side on one real control plane, watching the
same namespace, while a bare client creates thousands of Pods that are not ours in it.

- "server-side selector": the operator as shipped (kopf's `settings.watching.label_selectors` for Pods, so the
  apiserver sends only Pods labelled `app.kubernetes.io/managed-by=gpujob-operator`);
- "client-side filter only": the same operator with that selector removed, as it was before (kopf's `labels=` on
  the handler then filters in the client, after every Pod has been sent, decoded and queued).

Both run at once, so they see the same machine load; the figures are each one's CPU seconds and RSS growth while
the Pods arrive, and the size of a Pod list with and without the selector (what a watch streams as they arrive).

    .venv/bin/python hack/bench_pod_watch.py [--pods 5000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
import benchrows
from bench_kubernetes import GJ_NS, operator_env, quiet_after
from bench_operator import Proc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from gpujob.operator.runtime import POD_SELECTOR  # noqa: E402
from gpujob.sandbox.controlplane import ControlPlane, bin_dir  # noqa: E402
from gpujob.sandbox.realcluster import Rest, crd_files, install_crds, prepare_namespace  # noqa: E402

# The operator with the server-side Pod selector taken out again (the "before" side; bench-only).
WITHOUT_SELECTOR = f"""
import sys
import gpujob.operator.handlers as handlers
shipped = handlers.configure
def configure(settings, runtime):
    shipped(settings, runtime)
    del settings.watching.label_selectors["", "v1", "pods"]
handlers.configure = configure
from gpujob.cli import main
sys.exit(main(["operator", "--namespace", {GJ_NS!r}]))
"""


async def list_bytes(session: aiohttp.ClientSession, url: str, ctx: ssl.SSLContext) -> int:
    """The size of a full list (what every relist costs, and about what the watch streams as the Pods arrive)."""
    async with session.get(url, ssl=ctx) as resp:
        return len(await resp.read())


async def create_pods(session: aiohttp.ClientSession, base: str, ctx: ssl.SSLContext, names: list[str]) -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for name in names:
        queue.put_nowait(name)
    container = {"name": "main", "image": "local/none", "command": ["true"]}

    async def worker() -> None:
        while not queue.empty():
            name = queue.get_nowait()
            body: dict[str, Any] = {
                "metadata": {"name": name, "labels": {"app": "someone-else"}},
                "spec": {"containers": [container]},
            }
            async with session.post(f"{base}/api/v1/namespaces/{GJ_NS}/pods", json=body, ssl=ctx) as resp:
                if resp.status >= 400:
                    raise RuntimeError(f"create {name}: {resp.status} {(await resp.text())[:300]}")

    await asyncio.gather(*(worker() for _ in range(32)))


def rss_mb(proc: Proc) -> float:
    for line in Path(f"/proc/{proc.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def main(args: argparse.Namespace) -> None:
    rows: list[tuple[str, str, str]] = []
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="gpujob-bench-podwatch-") as tmp:
        workdir = Path(tmp)
        cp = ControlPlane(workdir / "kube", binaries=bin_dir(build=True))
        cp.start()
        rest = Rest(cp.kubeconfig)
        install_crds(rest, crd_files([REPO / "crds"]))
        prepare_namespace(rest, GJ_NS, workdir / "models", restricted=False)
        env = {**operator_env(cp, workdir), "PYTHONPATH": str(REPO / "operator")}
        sides: dict[str, Proc] = {}
        try:
            shipped = [sys.executable, "-m", "gpujob.cli", "operator", "--namespace", GJ_NS]
            sides["server-side selector"] = Proc(shipped, env, workdir / "with.log", "operator started")
            before = [sys.executable, "-c", WITHOUT_SELECTOR]
            sides["client-side filter only"] = Proc(before, env, workdir / "without.log", "operator started")
            ctx = ssl.create_default_context(cafile=str(cp.serving_ca))
            headers = {"Authorization": f"Bearer {cp.token}"}
            async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=64)) as session:
                for rep in range(args.repeat):
                    await asyncio.sleep(2.0)
                    start = {name: (proc.cpu_seconds(), rss_mb(proc)) for name, proc in sides.items()}
                    began = time.monotonic()
                    await create_pods(session, cp.url, ctx, [f"other-{rep}-{i:05d}" for i in range(args.pods)])
                    created = time.monotonic() - began
                    for name, proc in sides.items():
                        settle = quiet_after(proc, time.monotonic())
                        cpu0, rss0 = start[name]
                        figures.setdefault(f"{name}: CPU seconds", []).append(proc.cpu_seconds() - cpu0)
                        figures.setdefault(f"{name}: RSS growth MB", []).append(rss_mb(proc) - rss0)
                        figures.setdefault(f"{name}: busy after the last create s", []).append(settle)
                    figures.setdefault("Pods created per second", []).append(args.pods / created)
                pods = f"{cp.url}/api/v1/namespaces/{GJ_NS}/pods"
                everything = await list_bytes(session, pods, ctx)
                ours = await list_bytes(session, f"{pods}?labelSelector={POD_SELECTOR}", ctx)
                rows.append(("bytes of a Pod list, every Pod of the namespace", f"{everything / 1e6:.1f} MB", ""))
                rows.append(("bytes of a Pod list, with the operator's selector", f"{ours / 1e3:.1f} kB", ""))
        finally:
            for proc in sides.values():
                proc.stop()
            cp.stop()
    for name, values in figures.items():
        rows.append((name, ", ".join(f"{v:.2f}" for v in values), f"{args.pods:,} unrelated Pods"))
    shipped_cpu = figures["server-side selector: CPU seconds"]
    before_cpu = figures["client-side filter only: CPU seconds"]
    benchrows.row(f"podwatch: operator CPU s, {args.pods:,} unrelated Pods", shipped_cpu, "s", "target ≈ 0")
    benchrows.row("podwatch: same, client-side filter only", before_cpu, "s", "before")
    benchrows.row("podwatch: operator RSS growth", figures["server-side selector: RSS growth MB"], "MB", "target ≈ 0")
    benchrows.table("measure (real control plane, side by side)", rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
