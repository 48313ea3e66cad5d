"""`gpujob sandbox`: run the local control plane in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

from gpujob.sandbox.emulator import Emulator
from gpujob.sandbox.services import SandboxServices
from gpujob.sandbox.services import add_arguments as add_service_arguments


def build_parser() -> argparse.ArgumentParser:
    """Options by component; later components (kubelet, redis, s3) add their own argument groups here."""
    parser = argparse.ArgumentParser(
        prog="gpujob sandbox", description="Local Kubernetes API emulator for development."
    )
    api = parser.add_argument_group("API emulator")
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


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 0
