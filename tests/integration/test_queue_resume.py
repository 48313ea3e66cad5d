"""Preemption that loses no work, on each API backend with real worker Pods: a `train_lora` job (the real
`gpujob worker`, as tests/integration/test_worker_resume.py runs it, here in a Pod the operator made) is evicted by a
higher-priority job of its full queue, checkpoints on SIGTERM, waits in the queue, and its next attempt resumes from
the checkpoint's step, not step 0. The preemption is on the job's event channel (`gpujobs:progress:<jobId>`).

Pods really run: on the emulator a sandbox kubelet (its own thread, 2 GPUs) binds and runs them; on the real
control plane the session's node agents do, after kube-scheduler binds them (no test pen here). Worker Pods get
their Redis and S3 credentials per attempt (per-job credentials, on by default with the operator's keys).
"""

from __future__ import annotations

import base64
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from minio import Minio
from minio.error import S3Error

from gpujob.api.constants import Phase, Reason
from gpujob.sandbox.kubelet import KubeletConfig
from gpujob.worker.tiny_model import write_tiny_model
from tests.integration.test_operator_queues import QueueMaker, make_queue  # noqa: F401 (fixture)
from tests.integration.test_worker_resume import checkpoint_steps
from tests.support.kubernetes import ApiTarget
from tests.support.operator import Cluster, OperatorProcess
from tests.support.sandbox import KubeletThread

GPUJOB = str(Path(sys.executable).parent / "gpujob")
BASE_MODEL = "tiny-queue-resume"
TEXTS = ["the quick brown fox", "hello world", "low rank adapters", "a gpu job reports progress"] * 2
# 8 texts in batches of 4: 2 steps an epoch, 200 steps in all. SIGTERM comes once the worker has said it started
# (its stop signals are handled from then on), while it loads the model or in its first steps: the preemption (a
# plan, a status write, a graceful delete, the kubelet's SIGTERM) takes about a second, 200 steps a few on an idle
# machine and far longer on a loaded one.
EPOCHS = 100
TOTAL_STEPS = 2 * EPOCHS
LORA = {"baseModel": BASE_MODEL, "dataset": {"text": TEXTS}, "epochs": EPOCHS, "rank": 4}
WORKER_TIMEOUT = 300.0  # a worker's start (torch, transformers) and its CPU steps on a loaded 2-core machine


@pytest.fixture
def worker_nodes(api: ApiTarget, tmp_path: Path) -> Iterator[Path]:
    """Nodes that run job Pods as local processes; yields their models directory (holding BASE_MODEL)."""
    if api.backend == "emulator":
        models = tmp_path / "models"
        write_tiny_model(models / BASE_MODEL)
        config = KubeletConfig(gpus=2, state_dir=tmp_path / "sandbox", models_dir=models)
        with KubeletThread(api.emulator.url, config):
            yield models
        return
    assert api.kube is not None
    models = api.kube.sandbox.models_dir  # every node agent's --models-dir (and the namespace's PV)
    if not (models / BASE_MODEL / "config.json").exists():
        write_tiny_model(models / BASE_MODEL)
    yield models


@pytest.fixture
def worker_operator(
    operator_factory: Any, cluster: Cluster, redis_url: str, s3_env: dict[str, str], s3_client: Minio
) -> OperatorProcess:
    """The operator with job Pods running the local `gpujob worker`. With the operator's Redis and S3 admin keys,
    per-job credentials are on (GPUJOB_CREDENTIALS_MODE=auto): each attempt gets a Redis user and S3 keys of its own,
    so the preempted job's second attempt runs with credentials issued again. The shared `gpujob-worker` Secret is
    what workers would get were they off."""
    cluster.wait_until(
        lambda: _bucket_made(s3_client, s3_env["GPUJOB_S3_BUCKET"]), what="the S3 server to take our keys"
    )
    secret_env = {**s3_env, "GPUJOB_REDIS_URL": redis_url, "GPUJOB_CHECKPOINT_EVERY_SECONDS": "3600"}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "gpujob-worker"},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret_env.items()},
    }
    cluster.core.create_namespaced_secret(cluster.namespace, secret)
    env = {"GPUJOB_REDIS_URL": redis_url, "GPUJOB_WORKER_COMMAND": json.dumps([GPUJOB, "worker"]), **s3_env}
    op: OperatorProcess = operator_factory(env)
    return op


def _bucket_made(client: Minio, bucket: str) -> bool:
    """Make the test's bucket; False while a freshly started S3 server still refuses our keys (AccessDenied)."""
    try:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    except S3Error as exc:
        if exc.code != "AccessDenied":
            raise
        return False
    return True


class Channel:
    """Every message on a job's event channel, collected on a thread from before the job exists."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(f"gpujobs:progress:{job_id}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message and message["type"] == "message":
                self.events.append(json.loads(message["data"]))

    def find(self, predicate: Any) -> dict[str, Any] | None:
        return next((e for e in list(self.events) if predicate(e)), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()


def test_a_preempted_train_lora_job_resumes_from_its_checkpoint_step(
    worker_nodes: Path,
    worker_operator: OperatorProcess,
    cluster: Cluster,
    make_queue: QueueMaker,  # noqa: F811
    redis_client: redis.Redis,
    s3_client: Minio,
    s3_env: dict[str, str],
    tmp_path: Path,
) -> None:
    cluster.pen = False  # these Pods run on the nodes
    queue = make_queue({"nvidia.com/gpu": 1})
    channel = Channel(redis_client, "low")
    try:
        cluster.create_job(
            "low",
            {
                "type": "train_lora",
                "gpus": 1,
                "queue": queue,
                "params": LORA,
                "retries": {"limit": 0},
                "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],  # one core: the machine is shared
            },
        )
        cluster.wait_until(
            lambda: channel.find(lambda e: "attempt 1 started" in e.get("message", "")),
            WORKER_TIMEOUT / cluster.slowdown,
            what="the worker of attempt 1 to start",
        )
        marker = tmp_path / "urgent-may-end"
        hold = f"while [ ! -e {marker} ]; do sleep 0.1; done"
        cluster.create_job(
            "urgent",
            {"type": "custom", "gpus": 1, "queue": queue, "priority": 10, "command": ["sh", "-c", hold]},
        )

        preempted = cluster.wait_until(
            lambda: (s := cluster.status("low")).get("preemptions") == 1 and s,
            WORKER_TIMEOUT / cluster.slowdown,
            what="the low job's worker to stop and the preemption to be counted",
        )
        assert preempted.get("failures", 0) == 0 and preempted["attempts"] == 1, preempted
        # The event channel says so: the operator's `queued` event with reason Preempted.
        queued = cluster.wait_until(
            lambda: channel.find(lambda e: e.get("status") == "queued" and e.get("reason") == Reason.PREEMPTED),
            what="a queued/Preempted event on the job's channel",
        )
        assert queued["source"] == "operator" and queued["attempt"] == 1 and "urgent" in queued["message"]
        # The worker checkpointed on SIGTERM, inside its training loop.
        # (On the emulator a deleted Pod is gone at once, while its process still stops: wait for the upload.)
        [step] = cluster.wait_until(
            lambda: checkpoint_steps(s3_client, s3_env["GPUJOB_S3_BUCKET"], "low"),
            WORKER_TIMEOUT / cluster.slowdown,
            what="the SIGTERM checkpoint",
        )
        assert 1 <= step < TOTAL_STEPS
        cluster.wait_until(
            lambda: cluster.status("urgent").get("phase") == Phase.RUNNING,
            WORKER_TIMEOUT / cluster.slowdown,
            what="the urgent job to run",
        )
        assert cluster.status("low")["phase"] == Phase.QUEUED and not [
            p for p in cluster.pods("low") if p.metadata.labels["gpujob.dev/attempt"] == "2"
        ]

        marker.touch()  # the urgent job ends; its GPU goes back to the low job
        cluster.wait_until(
            lambda: cluster.status("urgent").get("phase") == Phase.SUCCEEDED, what="the urgent job to succeed"
        )
        done = cluster.wait_until(
            lambda: (s := cluster.status("low")).get("phase") in (Phase.SUCCEEDED, Phase.FAILED) and s,
            WORKER_TIMEOUT / cluster.slowdown,
            what="the low job's second attempt to end",
        )
        assert done["phase"] == Phase.SUCCEEDED, done
        assert done["attempts"] == 2 and done["preemptions"] == 1 and done.get("failures", 0) == 0
        assert done["metrics"]["resumedFromStep"] == step, done["metrics"]
        assert done["metrics"]["steps"] == TOTAL_STEPS
        [second] = [p for p in cluster.pods("low") if p.metadata.labels["gpujob.dev/attempt"] == "2"]
        assert [v.secret.secret_name for v in second.spec.volumes if v.secret], "per-job credentials, issued again"
        # Attempt 2's first training report on the channel is past the checkpoint's step (the reporter publishes
        # the latest value: a step after the checkpoint's, never one counted from step 0).
        first = channel.find(lambda e: e.get("attempt") == 2 and str(e.get("message", "")).startswith("Epoch "))
        assert first is not None and first["progress"] >= 95.0 * (step + 1) / TOTAL_STEPS - 1e-6, first
        assert checkpoint_steps(s3_client, s3_env["GPUJOB_S3_BUCKET"], "low") == []  # done: cleaned up
    finally:
        channel.close()
