"""`gpujob sandbox`: run the local control plane in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

from gpujob.sandbox.emulator import Emulator
from gpujob.sandbox.realcluster import KubernetesSandbox
from gpujob.sandbox.services import SandboxServices
from gpujob.sandbox.services import add_arguments as add_service_arguments


def build_parser() -> argparse.ArgumentParser:
    """Options by component; later components (kubelet, redis, s3) add their own argument groups here."""
    parser = argparse.ArgumentParser(
        prog="gpujob sandbox",
        description="A local cluster for development: the API emulator (fast) or a real Kubernetes control plane.",
    )
    api = parser.add_argument_group("API")
    api.add_argument(
        "--api",
        choices=["emulator", "kubernetes"],
        default="emulator",
        help="emulator: our in-process API emulator; kubernetes: etcd, kube-apiserver, kube-controller-manager and "
        "kube-scheduler built from the official Go modules (make kubernetes), one `gpujob kubelet` per node",
    )
    api.add_argument("--nodes", type=int, default=1, help="--api kubernetes: GPU nodes, each with --gpus GPUs")
    api.add_argument("--kubeconfig", type=Path, required=True, help="write a kubeconfig for the emulator here")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    api.add_argument("--port", type=int, default=0, help="port to listen on (default: a free port)")
    api.add_argument(
        "--crds",
        type=Path,
        action="append",
        default=None,
        help="CRD file or directory of *.yaml to install (repeatable; default: ./crds)",
    )
    add_service_arguments(parser)  # --state-dir, kubelet (--kubelet, --gpus, --models-dir), redis, s3
    return parser


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    crds = args.crds if args.crds is not None else [path for path in [Path("crds")] if path.is_dir()]
    if args.api == "kubernetes":
        return await run_kubernetes(args, crds, stop)
    async with Emulator(crds, host=args.host, port=args.port) as emulator:
        emulator.write_kubeconfig(args.kubeconfig)
        installed = sorted(r.qualified for r in emulator.registry.all() if r.from_crd)
        crds = ", ".join(installed) or "none"
        print(f"sandbox: API emulator ready at {emulator.url} (kubeconfig {args.kubeconfig}; CRDs: {crds})", flush=True)
        # Kubelet, redis, S3 and the worker Secret; leaving the block stops them (and every Pod's process).
        async with SandboxServices(args, emulator) as services:
            print("\n".join(services.describe()), flush=True)
            print("sandbox ready", flush=True)
            await stop.wait()
    print("sandbox: stopped", flush=True)
    return 0


async def run_kubernetes(args: argparse.Namespace, crds: list[Path], stop: asyncio.Event) -> int:
    sandbox = KubernetesSandbox(
        args.state_dir / "kubernetes",
        nodes=args.nodes,
        gpus=args.gpus,
        port=args.port,
        kubelet=args.kubelet,
        crds=crds,
        models_dir=(args.models_dir or args.state_dir / "models"),
    )
    try:
        await asyncio.to_thread(sandbox.start)
        sandbox.write_kubeconfig(args.kubeconfig)
        print(f"sandbox: Kubernetes {sandbox.version} ready at {sandbox.cp.url if sandbox.cp else '?'}", flush=True)
        async with SandboxServices(args, sandbox) as services:
            print("\n".join(services.describe()), flush=True)
            print("sandbox ready", flush=True)
            await stop.wait()
    finally:
        await asyncio.to_thread(sandbox.stop)
    print("sandbox: stopped", flush=True)
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 0
