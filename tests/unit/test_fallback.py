"""CPU fallback (spec.fallback, docs/queues.md): the pure decision, decide() moving a job that waited too long for
a GPU (its queue's admission, or an unschedulable Pod) to CPU, the CPU Pod, its Kubernetes Event and its event."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from gpujob.api.constants import ConditionType, EventReason, JobType, Phase, Reason
from gpujob.api.events import FALLBACK
from gpujob.api.fallback import RUNS_ON_CPU, runs_on_cpu
from gpujob.api.models import GpuJobSpec, GpuJobStatus
from gpujob.operator import fallback
from gpujob.operator.builders import GPU_TOLERATION, JobRef, PodDefaults, build_pod
from gpujob.operator.kevents import events_for
from gpujob.operator.progress import transition_events
from gpujob.operator.queues import workload_of
from gpujob.operator.status import Decision, QueueGate, decide
from tests.unit.test_status import LORA_PARAMS, T0, cond, job, pod

FALLBACK_SPEC = {"cpuAfterSeconds": 30, "resources": {"requests": {"cpu": "4", "memory": "8Gi"}}}
FULL = QueueGate("QuotaExceeded", 1, "position 1 in queue 'team-a'")


def spec(**fields: Any) -> GpuJobSpec:
    return GpuJobSpec.model_validate({"type": "train_lora", "params": LORA_PARAMS, **fields})


def step(body: dict[str, Any], pods: list[Any], gate: QueueGate | None, now: Any = T0) -> Decision:
    d = decide(body, pods, now, gate=gate)
    body["status"] = d.status.wire()
    return d


# --- the decision (pure)


def test_a_job_is_moved_once_it_has_waited_cpu_after_seconds() -> None:
    s = spec(fallback=FALLBACK_SPEC)
    assert fallback.after_waiting(s, T0, T0 + timedelta(seconds=29)) == fallback.Verdict(
        False, T0 + timedelta(seconds=30)
    )
    assert fallback.after_waiting(s, T0, T0 + timedelta(seconds=30)).move


@pytest.mark.parametrize(
    "fields",
    [
        {},  # no spec.fallback
        {"fallback": FALLBACK_SPEC, "gpus": 0},  # already on CPU
        {"fallback": FALLBACK_SPEC, "type": "render_video", "params": {}},  # a type that cannot run on CPU
    ],
)
def test_never_moved_without_fallback_without_gpus_or_when_the_type_cannot(fields: dict[str, Any]) -> None:
    s = GpuJobSpec.model_validate({"type": "train_lora", "params": LORA_PARAMS, **fields})
    assert fallback.after_waiting(s, T0, T0 + timedelta(days=1)) == fallback.NEVER
    assert fallback.after_waiting(spec(fallback=FALLBACK_SPEC), None, T0) == fallback.NEVER  # not waiting


def test_task_types_declare_whether_they_run_on_cpu() -> None:
    assert set(RUNS_ON_CPU) == set(JobType)
    assert RUNS_ON_CPU[JobType.TRAIN_LORA] and RUNS_ON_CPU[JobType.TRAIN_VOICE]
    assert not RUNS_ON_CPU[JobType.RENDER_VIDEO]
    custom = {"type": "custom", "command": ["sh"]}
    assert not runs_on_cpu(GpuJobSpec.model_validate(custom))  # custom: only when its spec says so
    assert runs_on_cpu(GpuJobSpec.model_validate({**custom, "fallback": {"cpuAfterSeconds": 1}}))
    assert fallback.unsupported(GpuJobSpec.model_validate({"type": "render_video", "fallback": FALLBACK_SPEC}))
    assert fallback.unsupported(spec(fallback=FALLBACK_SPEC)) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"cpuAfterSeconds": 0},
        {},
        {"cpuAfterSeconds": 5, "resources": {"limits": {"nvidia.com/gpu": 1}}},
        {"cpuAfterSeconds": 5, "resources": {"requests": {"amd.com/gpu": 1}}},
    ],
)
def test_the_fallback_spec_is_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        spec(fallback=bad)


# --- decide(): not admitted by its queue


def test_a_queued_job_runs_its_next_attempt_on_cpu_after_cpu_after_seconds() -> None:
    body = job({"queue": "team-a", "fallback": FALLBACK_SPEC})
    d = step(body, [], FULL)
    assert d.create_attempt is None and d.status.phase is Phase.QUEUED
    assert d.requeue_after == 30.0  # looked at again when it is due
    d = step(body, [], FULL, T0 + timedelta(seconds=29))
    assert d.create_attempt is None and d.requeue_after == pytest.approx(1.0)

    d = step(body, [], FULL, T0 + timedelta(seconds=30))
    assert d.create_attempt == 1 and d.status.phase is Phase.SCHEDULED and d.status.reason == Reason.CPU_FALLBACK
    assert d.status.fallback is not None and d.status.fallback.device == "cpu"
    assert (d.status.fallback.reason, d.status.fallback.attempt) == (Reason.QUOTA_EXCEEDED, 1)
    assert cond(d, ConditionType.FALLBACK) == ("True", Reason.CPU_FALLBACK)
    assert cond(d, ConditionType.ADMITTED) == ("False", Reason.CPU_FALLBACK)
    assert d.status.admission is None and d.status.queue is None
    assert "waited for a GPU" in (d.status.message or "")
    # Out of the queue: the queue manager counts it nowhere (no GPU quota), however the plans go.
    assert workload_of(("ml", "j"), body) is None


def test_later_attempts_of_a_job_on_cpu_stay_on_cpu_without_waiting_for_the_queue() -> None:
    body = job({"queue": "team-a", "fallback": FALLBACK_SPEC, "retries": {"limit": 1, "backoffSeconds": 1}})
    step(body, [], FULL)
    step(body, [], FULL, T0 + timedelta(seconds=30))
    later = T0 + timedelta(seconds=40)
    d = step(body, [pod(1, "Failed", exit_code=1)], FULL, later)
    assert d.status.phase is Phase.RETRYING
    d = step(body, [], FULL, later + timedelta(seconds=1))
    assert d.create_attempt == 2 and d.status.reason == Reason.POD_CREATED  # not a second fallback
    assert d.status.fallback is not None and d.status.fallback.attempt == 1


def test_an_admitted_job_never_falls_back() -> None:
    body = job({"queue": "team-a", "fallback": FALLBACK_SPEC})
    step(body, [], FULL)
    body["status"]["admission"] = {"queue": "team-a", "admittedAt": "2026-01-01T12:00:40Z"}
    d = step(body, [], FULL, T0 + timedelta(seconds=40))
    assert d.create_attempt == 1 and d.status.fallback is None and d.status.reason == Reason.POD_CREATED


def test_a_type_that_cannot_run_on_cpu_waits_and_says_why() -> None:
    body = job({"type": "render_video", "params": {}, "queue": "team-a", "fallback": FALLBACK_SPEC})
    step(body, [], FULL)
    d = step(body, [], FULL, T0 + timedelta(hours=1))
    assert d.create_attempt is None and d.status.phase is Phase.QUEUED and d.status.fallback is None
    assert cond(d, ConditionType.FALLBACK) == ("False", Reason.CPU_FALLBACK_UNSUPPORTED)
    assert d.requeue_after is None


# --- decide(): an unschedulable Pod


def test_an_unschedulable_gpu_pod_is_replaced_by_a_cpu_attempt_without_a_failure() -> None:
    body = job({"fallback": FALLBACK_SPEC, "pendingTimeoutSeconds": 600})
    step(body, [], None)
    waiting = pod(1, reason="Unschedulable", message="0/2 nodes: 2 Insufficient nvidia.com/gpu")
    d = step(body, [waiting], None, T0 + timedelta(seconds=10))
    assert d.status.phase is Phase.PENDING and d.requeue_after == pytest.approx(20.0)  # before the pending timeout
    d = step(body, [waiting], None, T0 + timedelta(seconds=30))
    assert d.delete_pods == ["j-1"] and d.create_attempt is None and d.status.failures == 0
    assert d.status.fallback is not None and d.status.fallback.reason == Reason.UNSCHEDULABLE
    assert cond(d, ConditionType.FALLBACK) == ("True", Reason.CPU_FALLBACK)
    d = step(body, [], None, T0 + timedelta(seconds=31))  # the Pod is gone
    assert d.create_attempt == 2 and d.status.reason == Reason.CPU_FALLBACK and d.status.failures == 0
    assert d.status.fallback is not None and d.status.fallback.attempt == 2


def test_a_pod_pending_for_another_reason_does_not_fall_back() -> None:
    body = job({"fallback": FALLBACK_SPEC})
    step(body, [], None)
    stuck = pod(1, reason="ImagePullBackOff", message="no such image")
    d = step(body, [stuck], None, T0 + timedelta(seconds=300))
    assert d.delete_pods == [] and d.status.fallback is None and d.status.reason == Reason.IMAGE_PULL_BACKOFF


# --- the CPU Pod

REF = JobRef(namespace="ml", name="j", uid="0a1b2c3d-0000-4000-8000-000000000001")
DEFAULTS = PodDefaults(
    worker_image="registry.local/gpujob-worker:1",
    worker_command=("gpujob", "worker"),
    node_selector={"nvidia.com/gpu.present": "true", "pool": "ml"},
    tolerations=(dict(GPU_TOLERATION), {"key": "ml-only", "operator": "Exists"}),
)


def test_the_cpu_pod_has_no_gpu_limit_selector_or_toleration_and_the_fallback_resources() -> None:
    s = spec(
        gpus=2,
        gpuProduct="NVIDIA-H100",
        fallback=FALLBACK_SPEC,
        resources={"limits": {"memory": "64Gi"}},
        nodeSelector={"nvidia.com/gpu.family": "hopper", "zone": "a"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}, {"key": "spot", "operator": "Exists"}],
    )
    gpu = build_pod(REF, s, 1, DEFAULTS)
    assert gpu["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    cpu = build_pod(REF, s, 2, DEFAULTS, cpu=True)
    [container] = cpu["spec"]["containers"]
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"}}
    assert cpu["spec"]["nodeSelector"] == {"pool": "ml", "zone": "a"}
    assert cpu["spec"]["tolerations"] == [
        {"key": "spot", "operator": "Exists"},
        {"key": "ml-only", "operator": "Exists"},
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GPUJOB_GPUS"] == "0" and env["NVIDIA_VISIBLE_DEVICES"] == "void" and env["GPUJOB_ATTEMPT"] == "2"
    assert "nvidia.com/gpu" not in str(cpu["spec"]["containers"][0]["resources"])


def test_a_cpu_attempt_without_fallback_resources_keeps_the_jobs_own() -> None:
    s = spec(fallback={"cpuAfterSeconds": 5}, resources={"requests": {"cpu": "2"}})
    [container] = build_pod(REF, s, 1, DEFAULTS, cpu=True)["spec"]["containers"]
    assert container["resources"] == {"requests": {"cpu": "2"}}


# --- what people and the backend see


def test_the_move_posts_a_fallback_event_and_publishes_a_fallback_event() -> None:
    body = job({"queue": "team-a", "fallback": FALLBACK_SPEC})
    step(body, [], FULL)
    before = GpuJobStatus.model_validate(body["status"])
    d = step(body, [], FULL, T0 + timedelta(seconds=30))
    posted = events_for(before, d, 1)
    [moved] = [e for e in posted if e.reason == EventReason.FALLBACK]
    assert moved.type == "Warning" and "runs on CPU" in moved.note
    assert not [e for e in posted if e.reason == EventReason.QUEUED]  # the Admitted change is the Fallback Event
    published = transition_events(body, d.transitions, d.status)
    assert [e.status for e in published] == [FALLBACK, "scheduled"]
    extra = published[0].model_extra or {}
    assert published[0].reason == Reason.CPU_FALLBACK and extra["device"] == "cpu"
    assert extra["waitedFor"] == Reason.QUOTA_EXCEEDED and published[0].attempt == 1
