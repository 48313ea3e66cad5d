"""`gpujob sandbox`: run the local control plane, and the operator on it, in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from gpujob.sandbox.emulator import Emulator
from gpujob.sandbox.realcluster import KubernetesSandbox
from gpujob.sandbox.services import SandboxServices
from gpujob.sandbox.services import add_arguments as add_service_arguments
from gpujob.sandbox.stack import Process

BIN = Path(sys.executable).parent  # this venv's gpujob (the operator, and the worker in every job Pod)


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
    operator = parser.add_argument_group("operator")
    operator.add_argument(
        "--operator",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run `gpujob operator` (with the Redis bridge when redis runs) against the sandbox, its log in "
        "STATE_DIR/operator.log; --no-operator to run your own (default: run it)",
    )
    return parser


def next_steps(services: SandboxServices, operator: bool) -> list[str]:
    """What to type next, in another shell."""
    lines = ["", "Next steps (in another shell):", f"  source {services.state_dir / 'env'}   # KUBECONFIG and the rest"]
    lines.append(f"  export KUBECONFIG={services.env['KUBECONFIG']}")
    if not operator:
        lines.append("  gpujob operator &                 # --no-operator: the sandbox does not run it")
    lines += ["  kubectl apply -f examples/", "  kubectl get gj"]
    if "GPUJOB_REDIS_URL" in services.env:
        lines += [
            "  JOB_ID=$(gpujob submit --type render_video -p frames=8 -p width=64 -p height=64)",
            '  gpujob watch "$JOB_ID"',
        ]
    return lines


def operator_env(services: SandboxServices) -> dict[str, str]:
    """The operator's env: this sandbox's API, redis and S3, job Pods running this venv's `gpujob worker`
    (the local kubelet never pulls images)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_") and k != "KUBECONFIG"}
    # With the S3 keys (and Redis's default user) the operator makes each job's own credentials (issue 15).
    s3 = ("ENDPOINT", "BUCKET", "SECURE", "REGION", "ACCESS_KEY", "SECRET_KEY")
    passed = ("KUBECONFIG", "GPUJOB_REDIS_URL", *(f"GPUJOB_S3_{name}" for name in s3))
    env.update({k: services.env[k] for k in passed if k in services.env})
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        GPUJOB_WORKER_COMMAND=json.dumps([str(BIN / "gpujob"), "worker"]),
        GPUJOB_WORKER_IMAGE="local/gpujob-worker:sandbox",  # never pulled: the kubelet runs the command
        GPUJOB_CONSUMER_NAME="sandbox-operator",
        GPUJOB_STATUS_PROGRESS_INTERVAL="1",
    )
    return env


@contextlib.asynccontextmanager
async def running_operator(args: argparse.Namespace, services: SandboxServices) -> AsyncIterator[Process | None]:
    if not args.operator:
        yield None
        return
    log_path = services.state_dir / "operator.log"
    proc = Process(
        "gpujob operator", [str(BIN / "gpujob"), "operator"], operator_env(services), log_path, "operator started"
    )
    try:
        await asyncio.to_thread(proc.start, 120.0)
        print(f"sandbox: operator running (log {log_path})", flush=True)
        yield proc
    finally:
        await asyncio.to_thread(proc.stop, 20.0)


async def serve(args: argparse.Namespace, services: SandboxServices, stop: asyncio.Event) -> None:
    """Everything is up: start the operator, say what to do next, run until asked to stop."""
    print("\n".join(services.describe()), flush=True)
    async with running_operator(args, services):
        print("\n".join(next_steps(services, args.operator)), flush=True)
        print("sandbox ready", flush=True)
        await stop.wait()


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
            await serve(args, services, stop)
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
            await serve(args, services, stop)
    finally:
        await asyncio.to_thread(sandbox.stop)
    print("sandbox: stopped", flush=True)
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 0
