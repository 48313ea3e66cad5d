"""GPU queues (docs/queues.md) with the real operator process on each API backend: a job that names a queue gets
its Pod only once its queue admits it (status.admission first), waits Queued with the reason and its position
otherwise, and with no GpuQueue in the cluster at all runs as before. GpuQueues are cluster-scoped: each test
names its own and deletes them (the real control plane is shared by the session)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gpujob.api.constants import GROUP, VERSION, Phase, Reason
from gpujob.api.events import ProgressEvent
from gpujob.api.queues import QUEUE_KIND, QUEUE_PLURAL
from tests.support.operator import Cluster, OperatorProcess

QueueMaker = Callable[..., str]


@pytest.fixture
def make_queue(cluster: Cluster) -> Iterator[QueueMaker]:
    made: list[str] = []

    def make(quota: dict[str, Any], name: str | None = None, **spec: Any) -> str:
        name = name or f"q-{uuid.uuid4().hex[:8]}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": QUEUE_KIND,
            "metadata": {"name": name},
            "spec": {"quota": quota, **spec},
        }
        cluster.custom.create_cluster_custom_object(GROUP, VERSION, QUEUE_PLURAL, body)
        made.append(name)
        return name

    yield make
    for name in made:
        try:
            cluster.custom.delete_cluster_custom_object(GROUP, VERSION, QUEUE_PLURAL, name)
        except Exception as exc:  # already gone
            if getattr(exc, "status", None) != 404:
                raise


def _queue_status(cluster: Cluster, name: str) -> dict[str, Any]:
    body: dict[str, Any] = cluster.custom.get_cluster_custom_object(GROUP, VERSION, QUEUE_PLURAL, name)
    return body.get("status") or {}


def _admitted(status: dict[str, Any]) -> tuple[str, str] | None:
    found = [(c["status"], c["reason"]) for c in status.get("conditions", []) if c["type"] == "Admitted"]
    return found[0] if found else None


def _stop(cluster: Cluster, pod_name: str) -> None:
    """The kubelet's part of a graceful deletion: the worker exits on SIGTERM (143), the Pod goes. (An unbound
    Pod is deleted at once by the API server: then there is nothing to do.)"""
    try:
        cluster.set_pod(pod_name, "Failed", exit_code=143)
        cluster.core.delete_namespaced_pod(pod_name, cluster.namespace, grace_period_seconds=0)
    except ApiException as exc:
        if exc.status != 404:
            raise


def test_a_full_queue_makes_the_second_job_wait_until_the_first_finishes(
    operator: OperatorProcess, cluster: Cluster, make_queue: QueueMaker
) -> None:
    queue = make_queue({"nvidia.com/gpu": 1})
    cluster.create_job("first", {"type": "train_lora", "gpus": 1, "queue": queue})
    pod = cluster.wait_pod("first", 1)
    first = cluster.wait_until(  # the Pod is created before the pass writes its status
        lambda: _admitted(s := cluster.status("first")) == ("True", Reason.ADMITTED) and s,
        what="the first job's status to say admitted",
    )
    assert first["admission"]["queue"] == queue and first["admission"]["resources"] == {"nvidia.com/gpu": "1"}
    assert _admitted(first) == ("True", Reason.ADMITTED)

    cluster.create_job("second", {"type": "train_lora", "gpus": 1, "queue": queue})
    waiting = cluster.wait_until(
        lambda: (s := cluster.status("second")).get("reason") == Reason.QUOTA_EXCEEDED and s,
        what="the second job to wait for quota",
    )
    assert waiting["phase"] == Phase.QUEUED and waiting["queue"] == {"position": 1}
    assert _admitted(waiting) == ("False", Reason.QUOTA_EXCEEDED) and "admission" not in waiting
    assert not cluster.pods("second") and waiting.get("attempts", 0) == 0
    cluster.wait_until(
        lambda: (
            _queue_status(cluster, queue).get("pending") == 1
            and _queue_status(cluster, queue).get("usage") == {"nvidia.com/gpu": "1"}
        ),
        what="the queue's status to show one admitted, one pending",
    )

    cluster.set_pod(pod.metadata.name, "Running")
    cluster.wait_phase("first", Phase.RUNNING)
    cluster.set_pod(pod.metadata.name, "Succeeded", exit_code=0)
    cluster.wait_phase("first", Phase.SUCCEEDED)
    cluster.wait_pod("second", 1)
    second = cluster.wait_until(
        lambda: _admitted(s := cluster.status("second")) == ("True", Reason.ADMITTED) and s,
        what="the second job's status to say admitted",
    )
    assert second["admission"]["queue"] == queue and "queue" not in second
    assert _admitted(second) == ("True", Reason.ADMITTED)


def test_a_job_naming_a_missing_queue_waits_until_the_queue_exists(
    operator: OperatorProcess, cluster: Cluster, make_queue: QueueMaker
) -> None:
    make_queue({"nvidia.com/gpu": 2})  # queues are in use: a job naming another one waits for it
    missing = f"q-{uuid.uuid4().hex[:8]}"
    cluster.create_job("lost", {"type": "train_lora", "gpus": 1, "queue": missing})
    status = cluster.wait_until(
        lambda: (s := cluster.status("lost")).get("reason") == Reason.QUEUE_NOT_FOUND and s,
        what="the job to wait for its queue",
    )
    assert status["phase"] == Phase.QUEUED and _admitted(status) == ("False", Reason.QUEUE_NOT_FOUND)
    assert missing in status["message"] and not cluster.pods("lost")
    make_queue({"nvidia.com/gpu": 1}, name=missing)
    cluster.wait_pod("lost", 1)
    assert cluster.status("lost")["admission"]["queue"] == missing


def test_with_no_gpuqueue_at_all_a_job_naming_a_queue_runs_at_once(operator: OperatorProcess, cluster: Cluster) -> None:
    assert not cluster.custom.list_cluster_custom_object(GROUP, VERSION, QUEUE_PLURAL)["items"]
    cluster.create_job("free", {"type": "train_lora", "gpus": 1, "queue": "team-a"})
    pod = cluster.wait_pod("free", 1)
    status = cluster.wait_phase("free", cluster.resting_phase)
    assert status["podName"] == pod.metadata.name
    assert "admission" not in status and _admitted(status) is None


def test_a_higher_priority_job_preempts_a_lower_one_which_waits_again_without_a_failure(
    operator: OperatorProcess, cluster: Cluster, make_queue: QueueMaker
) -> None:
    queue = make_queue({"nvidia.com/gpu": 1})
    cluster.create_job("low", {"type": "train_lora", "gpus": 1, "queue": queue, "retries": {"limit": 0}})
    low_pod = cluster.wait_pod("low", 1).metadata.name
    cluster.set_pod(low_pod, "Running")
    cluster.wait_phase("low", Phase.RUNNING)

    cluster.create_job("urgent", {"type": "train_lora", "gpus": 1, "queue": queue, "priority": 10})

    def stopping() -> bool:
        pods = [p for p in cluster.pods("low") if p.metadata.name == low_pod]
        return not pods or pods[0].metadata.deletion_timestamp is not None

    cluster.wait_until(stopping, what="the low-priority job's Pod to be deleted")
    _stop(cluster, low_pod)
    preempted = cluster.wait_until(
        lambda: (s := cluster.status("low")).get("preemptions") == 1 and s, what="the low job to count a preemption"
    )
    assert preempted["phase"] == Phase.QUEUED and preempted.get("failures", 0) == 0 and "admission" not in preempted
    assert _admitted(preempted) is not None and _admitted(preempted)[0] == "False"
    urgent_pod = cluster.wait_pod("urgent", 1).metadata.name
    waiting = cluster.wait_until(
        lambda: (s := cluster.status("low")).get("reason") == Reason.QUOTA_EXCEEDED and s,
        what="the preempted job to wait for quota",
    )
    assert waiting["queue"] == {"position": 1} and waiting["attempts"] == 1

    cluster.set_pod(urgent_pod, "Running")
    cluster.wait_phase("urgent", Phase.RUNNING)
    cluster.set_pod(urgent_pod, "Succeeded", exit_code=0)
    cluster.wait_phase("urgent", Phase.SUCCEEDED)
    cluster.wait_pod("low", 2)  # the next attempt (the worker resumes from its checkpoint)
    again = cluster.wait_until(
        lambda: (s := cluster.status("low")).get("attempts") == 2 and s, what="the low job's second attempt"
    )
    assert again.get("failures", 0) == 0 and again["preemptions"] == 1

    # What `kubectl describe gj low` tells: admitted, preempted (by whom), queued again (why), admitted again.
    events = client.EventsV1Api(cluster.core.api_client)

    def reasons() -> set[str]:
        found = events.list_namespaced_event(cluster.namespace).items
        return {e.reason for e in found if e.regarding and e.regarding.name == "low"}

    cluster.wait_until(lambda: {"Admitted", "Preempted", "Queued"} <= reasons(), what="the queue's Events")


def test_a_restarted_operator_rebuilds_usage_from_the_statuses_and_never_over_admits(
    operator: OperatorProcess, cluster: Cluster, make_queue: QueueMaker
) -> None:
    queue = make_queue({"nvidia.com/gpu": 1})
    cluster.create_job("held", {"type": "train_lora", "gpus": 1, "queue": queue})
    cluster.wait_pod("held", 1)
    cluster.wait_until(lambda: cluster.status("held").get("admission"), what="the admission in the status")
    operator.kill()  # no goodbye: the next one knows only what the API says
    cluster.create_job("later", {"type": "train_lora", "gpus": 1, "queue": queue})
    operator.start()
    cluster.wait_until(
        lambda: cluster.status("later").get("reason") == Reason.QUOTA_EXCEEDED, what="the new job to wait for quota"
    )
    assert not cluster.pods("later") and "admission" not in cluster.status("later")
    assert len(cluster.pods("held")) == 1


def test_a_queue_under_its_quota_reclaims_lent_quota_from_a_borrower(
    operator: OperatorProcess, cluster: Cluster, make_queue: QueueMaker
) -> None:
    lender, borrower = make_queue({"nvidia.com/gpu": 1}), make_queue({"nvidia.com/gpu": 1})
    pods = {}
    for name in ("b-1", "b-2"):  # the second one runs on the lender's idle GPU
        cluster.create_job(name, {"type": "train_lora", "gpus": 1, "queue": borrower})
        pods[name] = cluster.wait_pod(name, 1).metadata.name
        cluster.set_pod(pods[name], "Running")
        cluster.wait_phase(name, Phase.RUNNING)
    cluster.wait_until(
        lambda: _queue_status(cluster, borrower).get("borrowed") == {"nvidia.com/gpu": "1"},
        what="the borrower's status to show the borrowed GPU",
    )
    cluster.create_job("owner", {"type": "train_lora", "gpus": 1, "queue": lender})

    def evicted() -> list[str]:
        return [n for n in pods if cluster.status(n).get("preemptions") == 1 or cluster.status(n).get("preempting")]

    [victim] = cluster.wait_until(evicted, what="one borrower to be preempted")
    _stop(cluster, pods[victim])
    cluster.wait_pod("owner", 1)
    status = cluster.wait_until(
        lambda: (s := cluster.status(victim)).get("preemptions") == 1 and s, what="the preemption to be counted"
    )
    assert status.get("failures", 0) == 0 and status["phase"] == Phase.QUEUED
    assert [n for n in pods if n != victim and cluster.status(n)["phase"] == Phase.RUNNING]


def test_operator_kills_during_admission_never_admit_past_the_quota(
    operator: OperatorProcess, cluster: Cluster, make_queue: QueueMaker
) -> None:
    """The API's view, sampled all along: never more admitted (and live) jobs, nor live Pods, than the quota,
    while the operator is SIGKILLed and restarted in the middle of admitting and finishing jobs."""
    import threading

    queue = make_queue({"nvidia.com/gpu": 2})
    names = [f"burst-{i}" for i in range(6)]
    for name in names:
        cluster.create_job(name, {"type": "train_lora", "gpus": 1, "queue": queue})
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            jobs = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "gpujobs")["items"]
            admitted = sum(
                1
                for j in jobs
                if (j.get("status") or {}).get("admission") and (j.get("status") or {}).get("phase") != "Succeeded"
            )
            live = sum(
                1
                for p in cluster.core.list_namespaced_pod(cluster.namespace).items
                if p.status.phase in ("Pending", "Running") and p.metadata.deletion_timestamp is None
            )
            seen.append((admitted, live))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        done: set[str] = set()
        while len(done) < len(names):
            running = [n for n in names if n not in done and cluster.pods(n)]
            for name in running[:1]:
                pod = cluster.wait_pod(name, 1).metadata.name
                cluster.set_pod(pod, "Succeeded", exit_code=0)
                cluster.wait_phase(name, Phase.SUCCEEDED)
                done.add(name)
                if len(done) % 2 == 1:  # mid-stream: the next admission is being decided right now
                    operator.kill()
                    operator.start()
            if not running:
                cluster.wait_until(
                    lambda: any(cluster.pods(n) for n in names if n not in done), what="the next admission"
                )
    finally:
        stop.set()
        sampler.join(10)
    assert seen and max(a for a, _ in seen) <= 2 and max(live for _, live in seen) <= 2, max(seen)
    assert max(a for a, _ in seen) == 2, "the quota was used"


def test_a_waiting_job_hears_its_queue_position_on_its_channel_and_its_move_when_the_head_leaves(
    operator_factory: Callable[..., OperatorProcess], cluster: Cluster, make_queue: QueueMaker, redis_url: str
) -> None:
    operator_factory({"GPUJOB_REDIS_URL": redis_url, "GPUJOB_QUEUE_EVENT_INTERVAL": "0.2"})
    queue = make_queue({"nvidia.com/gpu": 1})
    listener = redis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("gpujobs:progress:pos-c")  # the backend subscribes before it submits
    heard: list[ProgressEvent] = []

    def has(position: int) -> bool:
        while (message := pubsub.get_message(timeout=0.05)) is not None:
            heard.append(ProgressEvent.model_validate_json(message["data"]))
        return any(e.position == position for e in heard)

    try:
        cluster.create_job("pos-a", {"type": "train_lora", "gpus": 1, "queue": queue})
        pod = cluster.wait_pod("pos-a", 1).metadata.name
        cluster.create_job("pos-b", {"type": "train_lora", "gpus": 1, "queue": queue})
        cluster.wait_until(lambda: cluster.status("pos-b").get("queue") == {"position": 1}, what="pos-b first in line")
        cluster.create_job("pos-c", {"type": "train_lora", "gpus": 1, "queue": queue})
        cluster.wait_until(lambda: has(2), what="pos-c to hear that it is second")
        second = next(e for e in heard if e.position == 2)
        assert (second.jobId, second.status, second.phase, second.queue) == ("pos-c", "queued", "Queued", queue)
        assert second.reason == Reason.QUOTA_EXCEEDED and second.source == "operator" and second.seq
        assert second.estimatedStart is None, "the queue has finished no job yet: nothing to estimate from"
        assert not has(1), "nothing has left the queue yet"

        cluster.set_pod(pod, "Running")
        cluster.wait_phase("pos-a", Phase.RUNNING)
        cluster.set_pod(pod, "Succeeded", exit_code=0)  # the head's job leaves: pos-b is admitted, pos-c moves up
        cluster.wait_pod("pos-b", 1)
        cluster.wait_until(lambda: has(1), what="pos-c to hear that it is first")
        positions = [e.position for e in heard if e.position is not None]
        assert positions == sorted(positions, reverse=True) and positions[0] == 2 and positions[-1] == 1
        seqs = [e.seq or 0 for e in heard]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert cluster.status("pos-c").get("queue") == {"position": 1}
    finally:
        pubsub.close()
        listener.close()


def test_a_job_waiting_in_a_full_queue_with_cpu_fallback_gets_a_pod_without_a_gpu(
    operator_factory: Callable[..., OperatorProcess], cluster: Cluster, make_queue: QueueMaker, redis_url: str
) -> None:
    """spec.fallback.cpuAfterSeconds: 1 in a full queue: the next attempt runs on CPU (no GPU limit or toleration,
    the fallback's resources), says so (condition, status, Event, a `fallback` event on the job's channel) and
    counts against no quota."""
    operator_factory({"GPUJOB_REDIS_URL": redis_url})
    listener = redis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("gpujobs:progress:patient")  # the backend subscribes before it submits
    heard: list[ProgressEvent] = []

    def fallback_event() -> ProgressEvent | None:
        while (message := pubsub.get_message(timeout=0.05)) is not None:
            heard.append(ProgressEvent.model_validate_json(message["data"]))
        return next((e for e in heard if e.status == "fallback"), None)

    queue = make_queue({"nvidia.com/gpu": 1})
    cluster.create_job("holder", {"type": "train_lora", "gpus": 1, "queue": queue})
    cluster.wait_pod("holder", 1)
    resources = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    fallback = {"cpuAfterSeconds": 1, "resources": resources}
    cluster.create_job("patient", {"type": "train_lora", "gpus": 1, "queue": queue, "fallback": fallback})

    pod = cluster.wait_pod("patient", 1)
    [container] = pod.spec.containers
    assert container.resources.requests == {"cpu": "500m", "memory": "1Gi"}
    assert container.resources.limits == {"memory": "2Gi"}  # no nvidia.com/gpu
    assert not [t for t in pod.spec.tolerations or [] if t.key == "nvidia.com/gpu"]
    assert not [k for k in cluster.without_pen(pod.spec.node_selector) if k.startswith("nvidia.com/")]
    assert {"name": "GPUJOB_GPUS", "value": "0"} in [{"name": e.name, "value": e.value} for e in container.env]
    status = cluster.wait_until(
        lambda: _condition(s := cluster.status("patient"), "Fallback") == ("True", "CpuFallback") and s,
        what="the job's Fallback condition",
    )
    assert status["fallback"]["device"] == "cpu" and status["fallback"]["reason"] == Reason.QUOTA_EXCEEDED
    assert status["fallback"]["attempt"] == 1 and status["attempts"] == 1 and "admission" not in status
    assert status.get("failures", 0) == 0
    # Not counted against the queue's GPUs: the holder alone uses them, nothing pends.
    cluster.wait_until(
        lambda: (q := _queue_status(cluster, queue)).get("pending") == 0 and q.get("admitted") == 1,
        what="the queue's status to count the holder alone",
    )
    assert _queue_status(cluster, queue)["usage"] == {"nvidia.com/gpu": "1"}
    events = client.EventsV1Api(cluster.core.api_client)
    cluster.wait_until(
        lambda: [
            e
            for e in events.list_namespaced_event(cluster.namespace).items
            if e.regarding and e.regarding.name == "patient" and e.reason == "Fallback"
        ],
        what="the Fallback Event",
    )
    try:
        moved = cluster.wait_until(fallback_event, what="the fallback event on the job's channel")
    finally:
        pubsub.close()
        listener.close()
    assert moved.reason == "CpuFallback" and moved.attempt == 1 and moved.source == "operator"
    assert (moved.model_extra or {}).get("device") == "cpu"
    assert (moved.model_extra or {}).get("waitedFor") == Reason.QUOTA_EXCEEDED
    statuses = [e.status for e in heard]
    assert statuses.index("fallback") < statuses.index("scheduled")  # just before its CPU attempt's event


def test_a_type_that_cannot_run_on_cpu_keeps_waiting_for_its_gpu(
    operator: OperatorProcess, cluster: Cluster, make_queue: QueueMaker
) -> None:
    queue = make_queue({"nvidia.com/gpu": 1})
    cluster.create_job("holder", {"type": "train_lora", "gpus": 1, "queue": queue})
    cluster.wait_pod("holder", 1)
    video = {"type": "render_video", "gpus": 1, "queue": queue, "fallback": {"cpuAfterSeconds": 1}}
    cluster.create_job("video", video)
    status = cluster.wait_until(
        lambda: _condition(s := cluster.status("video"), "Fallback") == ("False", "CpuFallbackUnsupported") and s,
        what="the job to say it cannot fall back",
    )
    assert status["phase"] == Phase.QUEUED and status["reason"] == Reason.QUOTA_EXCEEDED
    assert "fallback" not in status and not cluster.pods("video")


def _condition(status: dict[str, Any], ctype: str) -> tuple[str, str] | None:
    found = [(c["status"], c["reason"]) for c in status.get("conditions", []) if c["type"] == ctype]
    return found[0] if found else None


def test_two_saturated_queues_with_weights_1_and_3_share_lent_quota_1_to_3(
    operator: OperatorProcess, cluster: Cluster, make_queue: QueueMaker
) -> None:
    """Fair sharing: queues a (weight 1) and b (weight 3), 1 GPU of their own each and 12 one-GPU jobs each; a third
    queue lends 8 idle GPUs. The lent GPUs split 2:6 (admitted 3:7), and stay so as jobs finish and the freed GPU
    goes back to whichever queue is below its weighted share."""
    gpu = "nvidia.com/gpu"
    a = make_queue({gpu: 1}, weight=1)
    b = make_queue({gpu: 1}, weight=3)
    jobs = {a: [f"a-{i}" for i in range(12)], b: [f"b-{i}" for i in range(12)]}
    for queue, names in jobs.items():
        for name in names:
            cluster.create_job(name, {"type": "train_lora", "gpus": 1, "queue": queue})
    for queue in (a, b):  # every job known to the operator, each queue at its own quota, before any GPU is lent
        cluster.wait_until(
            lambda q=queue: (s := _queue_status(cluster, q)).get("admitted") == 1 and s.get("pending") == 11,
            what=f"queue {queue} to hold one job and 11 pending",
        )
    make_queue({gpu: 8})  # the lender: 8 GPUs it does not use

    def admitted(queue: str) -> list[str]:
        listing = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "gpujobs")["items"]
        return sorted(
            j["metadata"]["name"]
            for j in listing
            if ((j.get("status") or {}).get("admission") or {}).get("queue") == queue
            and (j.get("status") or {}).get("phase") != Phase.SUCCEEDED
        )

    def split(borrowed_a: int, borrowed_b: int) -> bool:
        return (
            _queue_status(cluster, a).get("borrowed") == {gpu: str(borrowed_a)}
            and _queue_status(cluster, b).get("borrowed") == {gpu: str(borrowed_b)}
            and len(admitted(a)) == 1 + borrowed_a
            and len(admitted(b)) == 1 + borrowed_b
        )

    cluster.wait_until(lambda: split(2, 6), what="the 8 lent GPUs to split 2:6 (weights 1:3)")
    for queue in (a, b, b, a):  # a job of each queue ends; the lent GPU it frees goes back to the same queue
        [done, *_] = admitted(queue)
        cluster.set_pod(cluster.wait_pod(done, 1).metadata.name, "Succeeded", exit_code=0)
        cluster.wait_phase(done, Phase.SUCCEEDED)
        cluster.wait_until(lambda: split(2, 6), what=f"the split to stay 2:6 after {done} finished")
    assert sum(1 for names in jobs.values() for n in names if cluster.status(n).get("phase") == Phase.SUCCEEDED) == 4


@pytest.mark.backends("kubernetes")
def test_the_api_server_refuses_gpus_in_the_fallback_resources(cluster: Cluster) -> None:
    fallback = {"cpuAfterSeconds": 5, "resources": {"limits": {"nvidia.com/gpu": 1}}}
    with pytest.raises(ApiException) as refused:
        cluster.create_job("greedy", {"type": "train_lora", "gpus": 1, "fallback": fallback})
    assert refused.value.status == 422 and "no extended resources" in str(refused.value.body)


def test_a_gpu_pod_unschedulable_for_cpu_after_seconds_is_replaced_by_a_cpu_attempt(
    operator: OperatorProcess, cluster: Cluster
) -> None:
    """spec.fallback without a queue: the attempt's Pod stays Unschedulable (the scheduler's condition, written here
    as kube-scheduler does) for cpuAfterSeconds; the Pod goes and attempt 2 runs on CPU, not counted as a failure."""
    fallback = {"cpuAfterSeconds": 2, "resources": {"requests": {"cpu": "1"}}}
    spec = {"type": "train_voice", "gpus": 8, "fallback": fallback, "retries": {"limit": 0}}
    cluster.create_job("big", spec)
    gpu_pod = cluster.wait_pod("big", 1)
    assert gpu_pod.spec.containers[0].resources.limits == {"nvidia.com/gpu": "8"}
    unschedulable = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
    }
    cluster.core.patch_namespaced_pod_status(
        gpu_pod.metadata.name, cluster.namespace, {"status": {"phase": "Pending", "conditions": [unschedulable]}}
    )
    cpu_pod = cluster.wait_pod("big", 2)
    [container] = cpu_pod.spec.containers
    assert container.resources.requests == {"cpu": "1"} and not container.resources.limits
    status = cluster.wait_until(
        lambda: (s := cluster.status("big")).get("attempts") == 2 and s.get("fallback") and s,
        what="the CPU attempt in the status",
    )
    assert status["fallback"]["reason"] == Reason.UNSCHEDULABLE and status["fallback"]["attempt"] == 2
    assert status.get("failures", 0) == 0 and _condition(status, "Fallback") == ("True", "CpuFallback")
    cluster.wait_until(
        lambda: [p.metadata.name for p in cluster.pods("big")] == [cpu_pod.metadata.name],
        what="the GPU attempt's Pod to be gone",
    )
