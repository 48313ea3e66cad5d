"""One Pod's life on the sandbox kubelet: its container runs as a local process group, supervised by one task.

Pending (config) → Running → Succeeded/Failed, written to the Pod's status subresource. The memory limit is
enforced by polling the process group's RSS (SIGKILL → OOMKilled), `activeDeadlineSeconds` by SIGTERM, the
grace period, then SIGKILL (pod reason DeadlineExceeded); a deletion stops the process the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from gpujob.sandbox.kubeclient import ApiError, KubeClient
from gpujob.sandbox.podspec import ConfigError, container_env, expand, memory_limit, rewrite_paths

Json = dict[str, Any]
log = logging.getLogger("gpujob.sandbox.kubelet")

TERMINATION_MESSAGE_LIMIT = 4096  # bytes, as the kubelet
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
CONFIG_RETRY_SECONDS = 2.0
MEMORY_POLL_SECONDS = 0.1
DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: no dlopen between fork and exec
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it if the kubelet's thread dies, so no process outlives a crash."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def group_rss(pgid: int) -> int:
    """Resident memory of every process in the process group, in bytes."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int(fields[21]) * PAGE_SIZE  # rss in pages (field 24 of stat)
        except (OSError, IndexError, ValueError):
            continue
    return total


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


@dataclass
class NodeInfo:
    name: str
    models_dir: Path
    pods_dir: Path
    extra_path: list[str] = field(default_factory=list)


@dataclass
class Stop:
    reason: str  # "deleted" | "shutdown"
    grace: float
    gone: bool = False  # the Pod object no longer exists: no status to write


class PodRunner:
    """Runs the Pod's first container. `stop()` asks it to end; `task` finishes when the process is gone."""

    def __init__(
        self,
        pod: Json,
        gpu_ids: list[int],
        client: KubeClient,
        node: NodeInfo,
        on_exit: Callable[[PodRunner], None],
    ) -> None:
        self.pod, self.gpu_ids, self.client, self.node, self.on_exit = pod, gpu_ids, client, node, on_exit
        meta = pod["metadata"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.spec: Json = pod.get("spec") or {}
        self.container: Json = (self.spec.get("containers") or [{}])[0]
        self.dir = node.pods_dir / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.workdir = self.dir / "work"
        self.log_path = self.dir / "container.log"
        self.termination_path = self.dir / "termination-log"
        self.start_time = now_iso()
        self.started_mono = time.monotonic()
        self.pid: int | None = None
        self._stop: Stop | None = None
        self._stop_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    # --- control
    def start(self) -> PodRunner:
        self.task = asyncio.get_running_loop().create_task(self._main(), name=f"pod {self.namespace}/{self.name}")
        return self

    def stop(self, reason: str, grace: float, gone: bool = False) -> None:
        if self._stop is None:
            self._stop = Stop(reason, grace, gone)
        else:
            self._stop.gone = self._stop.gone or gone
            self._stop.grace = min(self._stop.grace, grace)
        self._stop_event.set()

    @property
    def grace(self) -> float:
        return float(self.spec.get("terminationGracePeriodSeconds", 30))

    # --- life
    async def _main(self) -> None:
        try:
            await self._life()
        except Exception:
            log.exception("sandbox kubelet: pod %s/%s failed unexpectedly", self.namespace, self.name)
        finally:
            if self.pid is not None:
                signal_group(self.pid, signal.SIGKILL)
            self.on_exit(self)

    def _deadline(self) -> float | None:
        seconds = self.spec.get("activeDeadlineSeconds")
        return None if seconds is None else self.started_mono + float(seconds)

    async def _life(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.termination_path.write_bytes(b"")
        env = await self._configure()
        if env is None:
            return
        argv = [expand(a, env) for a in [*self.container.get("command", []), *self.container.get("args", [])]]
        executable = shutil.which(argv[0], path=env.get("PATH")) if argv else None
        if not argv or executable is None:
            why = "the container has no command (the sandbox never pulls images)" if not argv else argv[0]
            message = f'exec: "{why}": executable file not found in $PATH' if argv else why
            await self._finish(128, "StartError", message, started=now_iso())
            return
        with self.log_path.open("ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                executable,
                *argv[1:],
                cwd=self.workdir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.pid = proc.pid
        started = now_iso()
        log.info("sandbox kubelet: pod %s/%s started pid %d: %s", self.namespace, self.name, proc.pid, argv)
        await self._write(self._running_status(started))
        exit_code, reason, pod_reason = await self._supervise(proc)
        message = self._termination_message(exit_code)
        await self._finish(exit_code, reason, message, started=started, pod_reason=pod_reason)

    async def _configure(self) -> dict[str, str] | None:
        """The process env, or None when the Pod ended before it could be configured (stop or deadline)."""
        while True:
            try:
                env = await container_env(self.pod, self.container, self.client.get_data)
                await self._write_secret_volumes()
                return self._process_env(env)
            except ConfigError as exc:
                status = self._pending_status("CreateContainerConfigError", str(exc))
                await self._write(status)
            except (ApiError, OSError, TimeoutError, aiohttp.ClientError) as exc:
                # The API server is down or answering errors (a restart): try again, as a kubelet does; the Pod
                # keeps its status. (Raised, it ended this Pod's life on the node: Pending for ever.)
                log.info("sandbox kubelet: pod %s/%s not configured yet: %r", self.namespace, self.name, exc)
            deadline = self._deadline()
            wait = CONFIG_RETRY_SECONDS if deadline is None else min(CONFIG_RETRY_SECONDS, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), max(wait, 0))
            if self._stop is not None:
                await self._finish_unstarted("ContainerStatusUnknown", "the Pod was stopped before its container ran")
                return None
            if deadline is not None and time.monotonic() >= deadline:
                await self._finish_unstarted("DeadlineExceeded", DEADLINE_MESSAGE, pod_reason="DeadlineExceeded")
                return None

    async def _write_secret_volumes(self) -> None:
        """The container's Secret volumes as files (one per key, `defaultMode`, as a kubelet projects them) under
        the Pod's dir; a missing Secret that is not optional keeps the container from starting (a kubelet reports
        FailedMount and ContainerCreating; here CreateContainerConfigError, retried the same way)."""
        namespace = (self.pod.get("metadata") or {}).get("namespace", "default")
        volumes = {v.get("name"): v for v in self.spec.get("volumes") or []}
        for mount in self.container.get("volumeMounts") or []:
            source = (volumes.get(mount.get("name")) or {}).get("secret")
            if source is None:
                continue
            data = await self.client.get_data("secrets", namespace, source.get("secretName", ""))
            if data is None and not source.get("optional"):
                raise ConfigError(f'secret "{source.get("secretName", "")}" not found')
            local = self.dir / "volumes" / mount["name"]
            if local.exists():
                shutil.rmtree(local)
            local.mkdir(parents=True)
            for key, value in (data or {}).items():
                path = local / key
                path.write_text(value, encoding="utf-8")
                path.chmod(int(source.get("defaultMode", 0o644)))

    def _process_env(self, pod_env: dict[str, str]) -> dict[str, str]:
        """What the process sees: a minimal base, the Pod's env, its mounts mapped to local directories."""
        path = os.pathsep.join([*self.node.extra_path, str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {
            "PATH": path,
            "HOME": str(self.workdir),
            "HOSTNAME": self.name,
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }
        mounts: dict[str, str] = {}
        volumes = {v.get("name"): v for v in self.spec.get("volumes") or []}
        for mount in self.container.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name")) or {}
            if "persistentVolumeClaim" in volume:
                local = self.node.models_dir / (mount.get("subPath") or "")
            elif "emptyDir" in volume or "secret" in volume:
                local = self.dir / "volumes" / mount["name"]
            else:
                continue
            local.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = str(local)
        termination = self.container.get("terminationMessagePath") or "/dev/termination-log"
        mounts[termination] = str(self.termination_path)
        env.update(rewrite_paths(pod_env, mounts))
        env["GPUJOB_TERMINATION_MESSAGE_PATH"] = str(self.termination_path)
        env["GPUJOB_MODELS_DIR"] = mounts.get("/opt/models", str(self.node.models_dir))
        ids = ",".join(str(i) for i in self.gpu_ids)
        env["CUDA_VISIBLE_DEVICES"] = ids  # only its GPUs (none for a CPU-only Pod), as with the device plugin
        # The sandbox's GPUs are bookkeeping, not devices: NVIDIA_VISIBLE_DEVICES (what the device plugin sets, and
        # what the worker reads as "GPUs were given, CUDA must work") stays unset; the indices are still shown.
        if self.gpu_ids:
            env["GPUJOB_SANDBOX_GPUS"] = ids
        return env

    async def _supervise(self, proc: asyncio.subprocess.Process) -> tuple[int, str, str | None]:
        """Wait for the process; kill it for memory, deadline or stop. Returns (exit code, reason, pod reason)."""
        limit = memory_limit(self.container)
        deadline = self._deadline()
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(self._stop_event.wait())
        reason: str | None = None
        pod_reason: str | None = None
        try:
            while not waiter.done():
                timeouts = [MEMORY_POLL_SECONDS if limit is not None else 5.0]
                if deadline is not None:
                    timeouts.append(max(deadline - time.monotonic(), 0.0))
                await asyncio.wait({waiter, stopper}, timeout=min(timeouts), return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    break
                if limit is not None and group_rss(proc.pid) > limit:
                    log.info("sandbox kubelet: pod %s/%s over its memory limit: OOM kill", self.namespace, self.name)
                    signal_group(proc.pid, signal.SIGKILL)
                    reason = "OOMKilled"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    pod_reason = "DeadlineExceeded"
                    await self._terminate(proc, waiter, self.grace)
                    break
                if self._stop is not None:
                    await self._terminate(proc, waiter, self._stop.grace)
                    break
            code = await waiter
        finally:
            stopper.cancel()
        exit_code = 128 - code if code < 0 else code  # killed by signal N: 128+N, as container runtimes report
        signal_group(proc.pid, signal.SIGKILL)  # the container's other processes end with it
        return exit_code, reason or ("Completed" if exit_code == 0 else "Error"), pod_reason

    async def _terminate(self, proc: asyncio.subprocess.Process, waiter: asyncio.Future[int], grace: float) -> None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), grace)
        except TimeoutError:
            signal_group(proc.pid, signal.SIGKILL)

    def _termination_message(self, exit_code: int) -> str:
        with contextlib.suppress(OSError):
            data = self.termination_path.read_bytes()[:TERMINATION_MESSAGE_LIMIT]
            if data.strip():
                return data.decode("utf-8", errors="replace")
        if exit_code != 0 and self.container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError):
                lines = self.log_path.read_bytes().splitlines()[-FALLBACK_LOG_LINES:]
                return b"\n".join(lines)[-FALLBACK_LOG_BYTES:].decode("utf-8", errors="replace")
        return ""

    # --- status
    async def _write(self, status: Json, *, final: bool = False) -> bool:
        """Patch the Pod's status. A final (terminal) status is retried, as a kubelet's status manager does,
        until the API server takes it or the Pod is gone: an API server restart must not leave a finished
        Pod Running for ever. Progress writes are tried once (the next one supersedes them)."""
        delay = 0.2
        while True:
            if self._stop is not None and self._stop.gone:
                return False
            try:
                return await self.client.patch_pod_status(self.namespace, self.name, status)
            except (ApiError, OSError, TimeoutError, aiohttp.ClientError) as exc:
                if isinstance(exc, ApiError) and 400 <= exc.status < 500 and exc.status not in (408, 409, 429):
                    final = False  # refused for good: retrying changes nothing
                log.warning("sandbox kubelet: status of pod %s/%s not written: %r", self.namespace, self.name, exc)
                if not final:
                    return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _base_status(self, phase: str, ready: bool, state: Json, ready_reason: str | None = None) -> Json:
        now = now_iso()
        ready_cond: Json = {"type": "Ready", "status": str(ready), "lastTransitionTime": now}
        if ready_reason:
            ready_cond["reason"] = ready_reason
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": self.start_time},
            {"type": "Initialized", "status": "True", "lastTransitionTime": self.start_time},
            {**ready_cond, "type": "ContainersReady"},
            ready_cond,
        ]
        container_status: Json = {
            "name": self.container.get("name", ""),
            "image": self.container.get("image", ""),
            "imageID": "",
            "ready": ready,
            "started": "running" in state,
            "restartCount": 0,
            # Strategic merge patch merges maps: name the states this one replaces, or they would linger.
            "state": {**{k: None for k in ("waiting", "running", "terminated") if k not in state}, **state},
        }
        if self.pid is not None:
            container_status["containerID"] = f"sandbox://{self.pid}"
        return {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": [container_status],
        }

    def _pending_status(self, reason: str, message: str) -> Json:
        return self._base_status("Pending", False, {"waiting": {"reason": reason, "message": message}})

    def _running_status(self, started: str) -> Json:
        return self._base_status("Running", True, {"running": {"startedAt": started}})

    async def _finish(
        self, exit_code: int, reason: str, message: str, *, started: str, pod_reason: str | None = None
    ) -> None:
        terminated: Json = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": now_iso(),
        }
        if message:
            terminated["message"] = message
        phase = "Succeeded" if exit_code == 0 and pod_reason is None else "Failed"
        status = self._base_status(phase, False, {"terminated": terminated}, "PodCompleted")
        if pod_reason is not None:
            status.update(reason=pod_reason, message=DEADLINE_MESSAGE)
        log.info("sandbox kubelet: pod %s/%s %s (exit %d, %s)", self.namespace, self.name, phase, exit_code, reason)
        await self._write(status, final=True)
        await self._complete_deletion()

    async def _finish_unstarted(self, reason: str, message: str, pod_reason: str | None = None) -> None:
        state = {"terminated": {"exitCode": 137, "reason": reason, "message": message, "finishedAt": now_iso()}}
        status = self._base_status("Failed", False, state, "PodCompleted")
        if pod_reason is not None:
            status.update(reason=pod_reason, message=message)
        await self._write(status, final=True)
        await self._complete_deletion()

    async def _complete_deletion(self) -> None:
        """A Pod that is being deleted (and still exists, e.g. held by finalizers) is released at once."""
        if self._stop is not None and self._stop.reason == "deleted" and not self._stop.gone:
            with contextlib.suppress(ApiError, OSError, TimeoutError, aiohttp.ClientError):
                await self.client.delete_pod_now(self.namespace, self.name, self.uid)
