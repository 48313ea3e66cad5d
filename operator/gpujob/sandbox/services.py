"""What `gpujob sandbox` runs beside the API emulator: the local kubelet, a private redis-server and S3 server,
and the `gpujob-worker` Secret that hands job Pods their credentials the way a cluster would."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import shlex
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from gpujob.sandbox import kubelet as kubelet_mod
from gpujob.sandbox.emulator import Emulator
from gpujob.sandbox.procs import ComponentMissing, RedisServer
from gpujob.sandbox.realcluster import KubernetesSandbox
from gpujob.sandbox.s3_server import S3Server, weed_binary

log = logging.getLogger("gpujob.sandbox")
WORKER_SECRET = "gpujob-worker"
DEFAULT_BUCKET = "gpujob"
# Base models every sandbox has under /opt/models (a tiny random Llama and its tokenizer: trains in seconds on a
# CPU); examples/train-lora.yaml and the README's `gpujob submit` name it.
SANDBOX_MODELS = ("tiny-llama",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".sandbox"),
        help="pods' work dirs and logs, models dir, redis/S3 data (default: %(default)s)",
    )
    kubelet = parser.add_argument_group("local kubelet (Pods run as local processes; images are never pulled)")
    kubelet_mod.add_arguments(kubelet)
    services = parser.add_argument_group("redis and S3 (started when their binaries are found)")
    services.add_argument(
        "--redis",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start a private redis-server (default: when redis-server is installed)",
    )
    services.add_argument(
        "--s3",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start a private SeaweedFS S3 server (default: when `weed` is installed)",
    )
    services.add_argument("--bucket", default=DEFAULT_BUCKET, help="S3 bucket to create (default: %(default)s)")
    services.add_argument(
        "--worker-secret",
        default=WORKER_SECRET,
        help="Secret in the default namespace that gives job Pods the redis/S3 credentials (default: %(default)s)",
    )


def _wanted(flag: bool | None, binary: str) -> bool:
    """An explicit --x/--no-x wins; by default a service runs when its binary is installed."""
    if flag is not None:
        return flag
    if binary == "weed":
        try:
            weed_binary()
        except ComponentMissing:
            return False
        return True
    return shutil.which(binary) is not None


def ship_models(models_dir: Path) -> list[str]:
    """Write the small base models the examples and the README name into the sandbox's models dir (what
    /opt/models is in its Pods), unless already there; returns the names written. A real cluster's models
    volume holds real ones (`baseModel` is a directory inside it)."""
    written: list[str] = []
    for name in SANDBOX_MODELS:
        if (models_dir / name / "config.json").exists():
            continue
        try:
            from gpujob.worker.tiny_model import write_tiny_model
        except ImportError as exc:  # no worker extras: the sandbox still runs, train_lora jobs fail with 64
            log.warning("no base model for the sandbox (pip install -e '.[worker]'): %s", exc)
            return written
        tmp = models_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_tiny_model(tmp)
        tmp.rename(models_dir / name)  # whole or not at all: a half-written model never looks ready
        written.append(name)
    return written


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


class SandboxServices:
    """`async with SandboxServices(args, api) as services:` everything is up; leaving stops it all. On the
    emulator the kubelet runs here (in-process); on a real control plane the node agents are already running."""

    def __init__(self, args: argparse.Namespace, api: Emulator | KubernetesSandbox) -> None:
        self.args, self.api = args, api
        self.state_dir: Path = args.state_dir.resolve()
        self.redis: RedisServer | None = None
        self.s3: S3Server | None = None
        self.kubelet: kubelet_mod.Kubelet | None = None
        self.env: dict[str, str] = {"KUBECONFIG": str(Path(args.kubeconfig).resolve())}
        self.secret_env: dict[str, str] = {}

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _start(self) -> None:
        args = self.args
        self.state_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.state_dir / "pods", ignore_errors=True)  # last run's pod dirs and logs
        if _wanted(args.redis, "redis-server"):
            redis_dir = self.state_dir / "redis"
            redis_dir.mkdir(exist_ok=True)
            self.redis = RedisServer(workdir=redis_dir)
            await asyncio.to_thread(self.redis.start)
            self.env["GPUJOB_REDIS_URL"] = self.redis.url
            self.secret_env["GPUJOB_REDIS_URL"] = self.redis.url
        if _wanted(args.s3, "weed"):
            s3_dir = self.state_dir / "s3"
            shutil.rmtree(s3_dir, ignore_errors=True)  # a private server per run: last run's data goes
            self.s3 = S3Server(access_key="gpujob-sandbox", workdir=s3_dir)
            await asyncio.to_thread(self.s3.start)
            await asyncio.to_thread(self._make_bucket)
            s3_env = self.s3.env(args.bucket)
            self.env.update(s3_env)
            self.secret_env.update({k: s3_env[k] for k in ("GPUJOB_S3_ACCESS_KEY", "GPUJOB_S3_SECRET_KEY")})
        if self.secret_env:
            self._put_secret()
        if isinstance(self.api, KubernetesSandbox):
            self.env["GPUJOB_MODELS_DIR"] = str(self.api.models_dir)
        elif args.kubelet:
            config = kubelet_mod.config_from_args(args, self.state_dir)
            self.kubelet = kubelet_mod.Kubelet(self.api.url, config)
            await self.kubelet.__aenter__()
            self.env["GPUJOB_MODELS_DIR"] = str(config.models_dir.resolve())
        if models := self.env.get("GPUJOB_MODELS_DIR"):
            await asyncio.to_thread(ship_models, Path(models))
        env_file = self.state_dir / "env"
        env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items()))
        env_file.chmod(0o600)

    def _make_bucket(self) -> None:
        from minio import Minio

        assert self.s3 is not None
        client = Minio(self.s3.endpoint, self.s3.access_key, self.s3.secret_key, secure=False)
        if not client.bucket_exists(self.args.bucket):
            client.make_bucket(self.args.bucket)

    def _put_secret(self) -> None:
        secret: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": self.args.worker_secret, "namespace": "default"},
            "data": {k: _b64(v) for k, v in self.secret_env.items()},
        }
        if isinstance(self.api, KubernetesSandbox):
            rest = self.api.rest()
            if not rest.create("/api/v1/namespaces/default/secrets", secret):
                rest.request("PUT", f"/api/v1/namespaces/default/secrets/{self.args.worker_secret}", secret)
        else:
            self.api.create_object(secret)

    def describe(self) -> list[str]:
        """The lines to print: what runs, and the env to use it (secrets only in the env file)."""
        parts = ["API emulator"]
        if isinstance(self.api, KubernetesSandbox):
            parts = [f"Kubernetes {self.api.version} (etcd, apiserver, controller-manager, scheduler)"]
            parts += [f"node {a.name} ({a.gpus} GPU)" for a in self.api.agents]
        if self.kubelet is not None:
            config = self.kubelet.config
            parts.append(f"kubelet (node {config.node_name}, {config.gpus} GPU, models {config.models_dir})")
        if self.redis is not None:
            parts.append("redis")
        if self.s3 is not None:
            parts.append(f"S3 (bucket {self.args.bucket})")
        lines = [f"sandbox: running {', '.join(parts)}"]
        if self.secret_env:
            keys = ", ".join(sorted(self.secret_env))
            lines.append(f"sandbox: Secret default/{self.args.worker_secret} holds {keys}")
        hidden = {"GPUJOB_S3_SECRET_KEY"}
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env.items() if k not in hidden]
        lines.append(f"sandbox: all of it (with the S3 secret key): source {self.state_dir / 'env'}")
        return lines

    async def stop(self) -> None:
        if self.kubelet is not None:
            with contextlib.suppress(Exception):
                await self.kubelet.shutdown()
            self.kubelet = None
        if self.s3 is not None:
            await asyncio.to_thread(self.s3.stop)
            self.s3 = None
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)
            self.redis = None
