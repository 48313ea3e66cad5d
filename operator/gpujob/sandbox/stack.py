"""The whole local pipeline as processes: `gpujob sandbox` (API emulator, kubelet, redis, S3) and `gpujob operator`
(with the bridge), job Pods running the local `gpujob worker`. Used by `make demo` and the end-to-end tests.

Requests go in through the Redis stream exactly as the backend sends them; everything else is read back through
the same public surfaces a user has (the Kubernetes API, Redis, S3, /metrics).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from gpujob.api.constants import GROUP, PLURAL, VERSION, Label
from gpujob.api.naming import job_name, label_value
from gpujob.sandbox.procs import free_port, wait_for
from gpujob.sandbox.realcluster import Rest
from gpujob.settings import Settings

Json = dict[str, Any]
VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[3]


class Process:
    """A child in its own session, logging to a file, ready when `ready_text` shows up in the log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, ready_text: str) -> None:
        self.name, self.argv, self.env, self.log_path, self.ready_text = name, argv, env, log_path, ready_text
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> Process:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            return self.ready_text in self.logs()

        try:
            wait_for(ready, timeout, what=f"{self.name} to start")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.tail()}") from exc
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL of the whole session's group after `grace`."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of its group left behind
        return proc.returncode


def processes_under(root: Path) -> list[int]:
    """Live processes whose working directory is under `root` (every job Pod's process runs in its work dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = (entry / "cwd").resolve()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and cwd.is_relative_to(root.resolve()):
            found.append(int(entry.name))
    return found


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export ") :].partition("=")
            env[name] = shlex.split(value)[0] if value else ""
    return env


class LocalStack:
    """`with LocalStack(workdir, gpus=2) as stack:` sandbox and operator running; leaving stops both (and the
    sandbox stops every Pod's process, redis and S3)."""

    def __init__(
        self,
        workdir: Path,
        gpus: int = 2,
        operator_env: dict[str, str] | None = None,
        metrics: bool = True,
        api: str = "emulator",
    ) -> None:
        self.workdir = workdir
        self.api = api
        self.state_dir = workdir / "sandbox"
        self.kubeconfig = workdir / "kubeconfig"
        self.gpus = gpus
        self.extra_operator_env = operator_env or {}
        self.metrics_port = free_port() if metrics else 0
        self.env: dict[str, str] = {}
        self.sandbox: Process | None = None
        self.operator: Process | None = None
        self.settings = Settings()

    # --- lifecycle
    def __enter__(self) -> LocalStack:
        try:
            self.start_sandbox()
            self.start_operator()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOB_") and k != "KUBECONFIG"}
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start_sandbox(self, timeout: float = 90.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [str(VENV_BIN / "gpujob"), "sandbox", "--api", self.api, "--kubeconfig", str(self.kubeconfig)]
        if self.api == "kubernetes":
            timeout = max(timeout, 240.0)  # etcd, apiserver, controllers, nodes: seconds, not milliseconds
        argv += ["--state-dir", str(self.state_dir), "--gpus", str(self.gpus), "--crds", str(REPO / "crds")]
        argv += ["--redis", "--s3"]  # required here: fail loudly when a binary is missing
        argv += ["--no-operator"]  # the stack runs its own, with test settings (start_operator)
        self.sandbox = Process("gpujob sandbox", argv, self.base_env(), self.workdir / "sandbox.log", "sandbox ready")
        self.sandbox.start(timeout)
        self.env = read_env_file(self.state_dir / "env")

    def operator_env(self) -> dict[str, str]:
        env = self.base_env()
        # With the S3 keys (and Redis's default user) the operator makes each job's own credentials (issue 15).
        s3 = ("ENDPOINT", "BUCKET", "SECURE", "REGION", "ACCESS_KEY", "SECRET_KEY")
        passed = ("KUBECONFIG", "GPUJOB_REDIS_URL", *(f"GPUJOB_S3_{name}" for name in s3))
        env.update({k: self.env[k] for k in passed if k in self.env})
        env.update(
            GPUJOB_WORKER_COMMAND=json.dumps([str(VENV_BIN / "gpujob"), "worker"]),
            GPUJOB_WORKER_IMAGE="local/gpujob-worker:sandbox",  # never pulled: the kubelet runs the command
            GPUJOB_METRICS_PORT=str(self.metrics_port),
            GPUJOB_LOG_FORMAT="json",
            GPUJOB_STATUS_PROGRESS_INTERVAL="0.5",
            GPUJOB_CONSUMER_NAME="sandbox-operator",
        )
        env.update(self.extra_operator_env)
        return env

    def start_operator(self, timeout: float = 90.0) -> None:
        argv = [str(VENV_BIN / "gpujob"), "operator"]
        log_path = self.workdir / "operator.log"
        self.operator = Process("gpujob operator", argv, self.operator_env(), log_path, "operator started")
        self.operator.start(timeout)

    def stop(self) -> None:
        if self.operator is not None:
            self.operator.stop(20)
        if self.sandbox is not None:
            self.sandbox.stop(40)

    # --- the surfaces
    @property
    def models_dir(self) -> Path:
        return Path(self.env.get("GPUJOB_MODELS_DIR", self.state_dir / "models"))

    @property
    def api_url(self) -> str:
        import yaml

        config = yaml.safe_load(self.kubeconfig.read_text())
        server: str = config["clusters"][0]["cluster"]["server"]
        return server

    @property
    def bucket(self) -> str:
        return self.env.get("GPUJOB_S3_BUCKET", "gpujob")

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.env["GPUJOB_REDIS_URL"], decode_responses=True)

    def s3(self) -> Any:
        from minio import Minio

        return Minio(
            self.env["GPUJOB_S3_ENDPOINT"],
            access_key=self.env["GPUJOB_S3_ACCESS_KEY"],
            secret_key=self.env["GPUJOB_S3_SECRET_KEY"],
            secure=False,
        )

    def submit(self, request: Json, client: Any = None, action: str | None = None) -> str:
        """XADD one request to the stream exactly as the backend does: field `job` = the request's JSON."""
        fields = {"job": json.dumps(request)}
        if action is not None:
            fields["action"] = action
        r = client or self.redis()
        entry_id: str = r.xadd(self.settings.request_stream, fields)
        return entry_id

    def get(self, path: str) -> Json | None:
        return Rest(self.kubeconfig).get(path)

    def job(self, job_id: str, namespace: str = "default") -> Json | None:
        return self.get(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{job_name(job_id)}")

    def pods(self, job_id: str, namespace: str = "default") -> list[Json]:
        selector = f"{Label.JOB_NAME}={label_value(job_name(job_id))}"
        listing = self.get(f"/api/v1/namespaces/{namespace}/pods?labelSelector={urllib.parse.quote(selector)}")
        return list((listing or {}).get("items") or [])

    def kubectl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [str(VENV_BIN / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        env = {**self.base_env(), "KUBECONFIG": str(self.kubeconfig)}
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)

    def metrics(self) -> str | None:
        """The operator's /metrics text, or None when its metrics server is not listening."""
        if not self.metrics_port:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
                text: str = resp.read().decode()
                return text
        except (OSError, urllib.error.URLError):
            return None
