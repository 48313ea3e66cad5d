"""A local kubelet for the sandbox: one fake GPU Node whose Pods run as local processes.

It lists and watches Pods through the API and runs each Pod's first container `command`+`args` as a local process
group (the image is never pulled). See podrunner.py for the per-Pod lifecycle and what of the Pod spec is honoured.

Two modes:
- on the API emulator (`schedule=True`), it is also the scheduler: it binds unbound Pods when their GPUs fit, else
  keeps them Pending with PodScheduled=False/Unschedulable;
- on a real control plane (`schedule=False`, `gpujob kubelet`), kube-scheduler binds and this is a node agent: it
  watches only the Pods bound to its Node, renews its Lease in kube-node-lease and its Ready condition, and serves
  the Pods' logs on loopback (HTTPS, a certificate the apiserver trusts) for `kubectl logs [-f]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from gpujob.sandbox.kubeclient import ApiError, KubeClient
from gpujob.sandbox.nodeagent import Heartbeat, LogServer
from gpujob.sandbox.podlogs import PODS_DIR_ANNOTATION
from gpujob.sandbox.podrunner import NodeInfo, PodRunner, now_iso
from gpujob.sandbox.podspec import fits, gpu_request

Json = dict[str, Any]
log = logging.getLogger("gpujob.sandbox.kubelet")

NODE_NAME = "sandbox-node"
GPU_PRODUCT = "NVIDIA-SANDBOX"
GPU_RESOURCE = "nvidia.com/gpu"
PRODUCT_LABEL = "nvidia.com/gpu.product"
TERMINAL = frozenset({"Succeeded", "Failed"})


@dataclass
class KubeletConfig:
    node_name: str = NODE_NAME
    gpus: int = 1
    gpu_product: str = GPU_PRODUCT
    models_dir: Path = Path(".sandbox/models")
    state_dir: Path = Path(".sandbox")
    shutdown_grace: float = 5.0  # seconds a Pod's process gets on kubelet shutdown before SIGKILL
    extra_path: list[str] = field(default_factory=list)  # prepended to PATH of every Pod's process
    schedule: bool = True  # bind unbound Pods itself (emulator); False: kube-scheduler binds (real control plane)
    heartbeat_seconds: float | None = None  # renew the Lease and Ready condition this often (real control plane)
    serving_cert: Path | None = None  # with serving_key: serve Pod logs over HTTPS on loopback
    serving_key: Path | None = None
    taints: list[Json] = field(default_factory=list)


def _meta(pod: Json) -> Json:
    meta: Json = pod.get("metadata") or {}
    return meta


def _grace(pod: Json) -> float:
    meta, spec = _meta(pod), pod.get("spec") or {}
    value = meta.get("deletionGracePeriodSeconds")
    if value is None:
        value = spec.get("terminationGracePeriodSeconds", 30)
    return float(value)


def _memory_bytes() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 16 * 2**30


class Kubelet:
    """`async with Kubelet(server, config):` the Node is registered and the Pods known when the block starts;
    leaving it stops every Pod's process (SIGTERM, then SIGKILL after `shutdown_grace`)."""

    def __init__(self, server: str | KubeClient, config: KubeletConfig | None = None) -> None:
        self.config = config or KubeletConfig()
        self.client = server if isinstance(server, KubeClient) else KubeClient(server)
        pods_dir = (self.config.state_dir / "pods").resolve()
        self.node = NodeInfo(
            self.config.node_name, self.config.models_dir.resolve(), pods_dir, list(self.config.extra_path)
        )
        self.runners: dict[str, PodRunner] = {}
        self.pending: dict[str, Json] = {}  # uid -> unbound Pod waiting for the scheduler
        self.allocated: dict[str, list[int]] = {}  # uid -> GPU indices
        self._unschedulable: dict[str, str] = {}  # uid -> message last written
        self._done: set[str] = set()  # uids whose process has ended: never started again
        self._kick = asyncio.Event()
        self._synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.logs: LogServer | None = None
        if self.config.serving_cert is not None and self.config.serving_key is not None:
            self.logs = LogServer(self.node.pods_dir, self.config.serving_cert, self.config.serving_key)

    # --- lifecycle
    async def __aenter__(self) -> Self:
        self.config.models_dir.mkdir(parents=True, exist_ok=True)
        self.node.pods_dir.mkdir(parents=True, exist_ok=True)
        if self.logs is not None:
            await self.logs.start(self.is_running)
        await self.client.put_node(self.node_object())
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_pods(), name="kubelet-watch")]
        if self.config.schedule:
            self._tasks.append(loop.create_task(self._schedule_loop(), name="kubelet-scheduler"))
        if self.config.heartbeat_seconds:
            heartbeat = Heartbeat(self.client, self.config.node_name, self.config.heartbeat_seconds)
            self._tasks.append(loop.create_task(heartbeat.run(), name="kubelet-heartbeat"))
        await self._synced.wait()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        runners = list(self.runners.values())
        for runner in runners:
            runner.stop("shutdown", min(runner.grace, self.config.shutdown_grace))
        tasks = [r.task for r in runners if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.shutdown_grace + 10)
        if self.logs is not None:
            await self.logs.stop()
        await self.client.close()

    def is_running(self, namespace: str, name: str) -> bool:
        return any(r.namespace == namespace and r.name == name for r in self.runners.values())

    @property
    def free_gpus(self) -> list[int]:
        used = {i for ids in self.allocated.values() for i in ids}
        return [i for i in range(self.config.gpus) if i not in used]

    def node_labels(self) -> dict[str, str]:
        labels = {
            "kubernetes.io/hostname": self.config.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine()),
            "gpujob.dev/sandbox": "true",
        }
        if self.config.gpus > 0:
            labels[PRODUCT_LABEL] = self.config.gpu_product
            labels["nvidia.com/gpu.count"] = str(self.config.gpus)
        return labels

    def node_object(self) -> Json:
        resources = {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{_memory_bytes() // 1024}Ki",
            "pods": "110",
            GPU_RESOURCE: str(self.config.gpus),
        }
        now = now_iso()
        spec: Json = {"taints": self.config.taints} if self.config.taints else {}
        port = self.logs.port if self.logs is not None else 0
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.config.node_name,
                "labels": self.node_labels(),
                # The API emulator serves `kubectl logs` from this directory (a real apiserver asks our LogServer).
                "annotations": {PODS_DIR_ANNOTATION: str(self.node.pods_dir)},
            },
            "spec": spec,
            "status": {
                "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
                "capacity": resources,
                "allocatable": resources,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "sandbox kubelet is posting ready status",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": self.config.node_name},
                ],
                "nodeInfo": {
                    "machineID": "sandbox",
                    "systemUUID": "sandbox",
                    "bootID": "sandbox",
                    "kubeProxyVersion": "",
                    "kubeletVersion": "v1.37.0-gpujob-sandbox",
                    "containerRuntimeVersion": "sandbox://local-processes",
                    "operatingSystem": "linux",
                    "architecture": self.node_labels()["kubernetes.io/arch"],
                    "osImage": platform.platform(),
                    "kernelVersion": platform.release(),
                },
            },
        }

    # --- watch
    async def _watch_pods(self) -> None:
        path = "/api/v1/pods"
        if not self.config.schedule:  # a node agent sees only the Pods bound to its Node, as a kubelet does
            path += f"?fieldSelector=spec.nodeName%3D{self.config.node_name}"
        async for event_type, obj in self.client.list_and_watch(path):
            if event_type == "SYNC":
                self._resync(obj.get("items") or [])
                self._synced.set()
            else:
                self._on_pod(event_type, obj)

    def _resync(self, pods: list[Json]) -> None:
        present = {_meta(p).get("uid") for p in pods}
        for uid, runner in list(self.runners.items()):
            if uid not in present:
                runner.stop("deleted", 0.0, gone=True)
        for uid in [u for u in self.pending if u not in present]:
            self._forget(uid)
        for pod in pods:
            self._on_pod("ADDED", pod)

    def _forget(self, uid: str) -> None:
        self.pending.pop(uid, None)
        self._unschedulable.pop(uid, None)

    def _on_pod(self, event_type: str, pod: Json) -> None:
        meta, spec = _meta(pod), pod.get("spec") or {}
        uid: str = meta.get("uid", "")
        runner = self.runners.get(uid)
        node = spec.get("nodeName")
        if event_type == "DELETED":
            self._forget(uid)
            self._done.discard(uid)
            if runner is not None:
                runner.stop("deleted", _grace(pod), gone=True)
            self._kick.set()
            return
        if meta.get("deletionTimestamp"):
            self._forget(uid)
            if runner is not None:
                runner.stop("deleted", _grace(pod))
            elif node == self.config.node_name and uid not in self._done:
                self._spawn(self.client.delete_pod_now(meta["namespace"], meta["name"], uid))
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase in TERMINAL or uid in self._done or runner is not None:
            return
        if not node:
            if self.config.schedule:
                self.pending[uid] = pod
                self._kick.set()
        elif node == self.config.node_name:
            if phase == "Running":  # bound here by an earlier kubelet whose process is gone
                self._done.add(uid)
                self._spawn(self._lost(pod))
                return
            wanted, _ = gpu_request(pod)  # bound here by someone else: admit it if its GPUs are free
            free = self.free_gpus
            if wanted > len(free):
                self._done.add(uid)
                self._spawn(self._reject(pod, f"Pod requests {wanted} GPUs, {len(free)} free on the node"))
                return
            self._run(pod, free[:wanted])

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lost(self, pod: Json) -> None:
        meta = _meta(pod)
        status = {"phase": "Failed", "reason": "Terminated", "message": "the sandbox kubelet restarted: process lost"}
        with contextlib.suppress(ApiError, OSError, TimeoutError):
            await self.client.patch_pod_status(meta["namespace"], meta["name"], status)

    async def _reject(self, pod: Json, message: str) -> None:
        meta = _meta(pod)
        status = {"phase": "Failed", "reason": f"Out{GPU_RESOURCE}", "message": message}
        with contextlib.suppress(ApiError, OSError, TimeoutError):
            await self.client.patch_pod_status(meta["namespace"], meta["name"], status)

    # --- scheduling
    async def _schedule_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                await self._schedule_once()
            except (ApiError, OSError, TimeoutError) as exc:
                log.warning("sandbox kubelet: scheduling pass failed (%r); retrying", exc)
                await asyncio.sleep(0.5)
                self._kick.set()

    async def _schedule_once(self) -> None:
        labels = self.node_labels()
        queue = sorted(self.pending.values(), key=lambda p: (_meta(p).get("creationTimestamp", ""), _meta(p)["name"]))
        for pod in queue:
            meta = _meta(pod)
            uid = meta["uid"]
            if uid not in self.pending:
                continue
            free = self.free_gpus
            fit = fits(pod, labels, len(free), taints=self.config.taints, node_name=self.config.node_name)
            if not fit.ok:
                if self._unschedulable.get(uid) != fit.message:
                    self._unschedulable[uid] = fit.message
                    await self.client.patch_pod_status(meta["namespace"], meta["name"], unschedulable(fit.message))
                continue
            wanted, _ = gpu_request(pod)
            ids = free[:wanted]
            self.allocated[uid] = ids  # held across the await: the next pod can't take them
            try:
                await self.client.bind(meta["namespace"], meta["name"], uid, self.config.node_name)
            except ApiError as exc:
                self.allocated.pop(uid, None)
                if exc.status not in (404, 409):
                    raise
                self._forget(uid)
                continue
            if uid not in self.pending:  # deleted while binding
                self.allocated.pop(uid, None)
                continue
            self._forget(uid)
            bound = {**pod, "spec": {**(pod.get("spec") or {}), "nodeName": self.config.node_name}}
            self._run(bound, ids)

    def _run(self, pod: Json, gpu_ids: list[int]) -> None:
        uid = _meta(pod)["uid"]
        self.allocated[uid] = gpu_ids
        self.runners[uid] = PodRunner(pod, gpu_ids, self.client, self.node, self._exited).start()

    def _exited(self, runner: PodRunner) -> None:
        self.runners.pop(runner.uid, None)
        self.allocated.pop(runner.uid, None)
        self._done.add(runner.uid)
        self._kick.set()  # its GPUs are free: Pending Pods may fit now


def unschedulable(message: str) -> Json:
    condition = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": message,
        "lastProbeTime": None,
        "lastTransitionTime": now_iso(),
    }
    return {"phase": "Pending", "conditions": [condition]}


# --- `python -m gpujob.sandbox.kubelet`: the kubelet alone, against any sandbox API server


def add_arguments(group: Any, *, with_switch: bool = True) -> None:
    """The kubelet's options (shared with `gpujob sandbox`)."""
    if with_switch:
        group.add_argument(
            "--kubelet",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="run the local kubelet: Pods run as local processes (default: on)",
        )
    group.add_argument("--gpus", type=int, default=1, help="nvidia.com/gpu allocatable on the fake node (default: 1)")
    group.add_argument("--gpu-product", default=GPU_PRODUCT, help="the node's nvidia.com/gpu.product label")
    if with_switch:
        group.add_argument("--node-name", default=NODE_NAME, help="name of the fake node (default: %(default)s)")
    group.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="local directory standing in for the /opt/models volume (default: STATE_DIR/models)",
    )


def config_from_args(args: argparse.Namespace, state_dir: Path) -> KubeletConfig:
    return KubeletConfig(
        node_name=args.node_name,
        gpus=args.gpus,
        gpu_product=args.gpu_product,
        models_dir=args.models_dir or state_dir / "models",
        state_dir=state_dir,
    )


def main(argv: list[str] | None = None) -> int:
    """`gpujob kubelet`: one node agent against a real control plane (or, with --schedule, the emulator)."""
    parser = argparse.ArgumentParser(prog="gpujob kubelet", description=__doc__)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, default=Path(".sandbox"))
    parser.add_argument("--node", dest="node_name", default=NODE_NAME, help="the Node's name (default: %(default)s)")
    add_arguments(parser, with_switch=False)
    parser.add_argument(
        "--schedule", action="store_true", help="bind unbound Pods itself (the emulator has no kube-scheduler)"
    )
    parser.add_argument("--heartbeat", type=float, default=4.0, help="Lease/Ready renewal period in s (0: none)")
    parser.add_argument("--serving-cert", type=Path, help="TLS certificate for the log endpoint (with --serving-key)")
    parser.add_argument("--serving-key", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = config_from_args(args, args.state_dir / args.node_name)
    config.models_dir = args.models_dir or args.state_dir / "models"  # one models dir for all nodes, like the PVC
    config.schedule = args.schedule
    config.heartbeat_seconds = args.heartbeat or None
    config.serving_cert, config.serving_key = args.serving_cert, args.serving_key

    async def run() -> None:
        import signal

        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        async with Kubelet(KubeClient.from_kubeconfig(args.kubeconfig), config):
            print(f"sandbox kubelet ready: node {config.node_name} with {config.gpus} GPU(s)", flush=True)
            await stop.wait()

    asyncio.run(run())
    return 0
