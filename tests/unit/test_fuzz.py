"""Property tests (hypothesis): any valid spec builds a Pod the Kubernetes schema accepts; any sequence of Pod
states drives the status function through legal phases only, with at most one live Pod per job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes_validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpujob.api.constants import Phase
from gpujob.api.models import GpuJobSpec
from gpujob.operator.builders import JobRef, PodDefaults, build_pod
from gpujob.operator.podview import ALIVE_POD_PHASES, PodView
from gpujob.operator.status import decide

K8S_VERSION = "1.37.0"
REF = JobRef(namespace="ml", name="fuzz-job", uid="a3c1e2f0-1111-4222-8333-444455556666")
DEFAULTS = PodDefaults(worker_image="gpujob-worker:1", worker_command=("gpujob", "worker"))

names = st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
env_names = st.from_regex(r"[A-Z][A-Z0-9_]{0,15}", fullmatch=True).filter(lambda n: not n.startswith("GPUJOB_"))
quantities = st.one_of(st.integers(1, 64).map(str), st.sampled_from(["500m", "2Gi", "16Gi", "1.5", "100Mi"]))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.text(max_size=20))

specs = st.fixed_dictionaries(
    {"type": st.sampled_from(["train_lora", "train_voice", "render_video", "custom"])},
    optional={
        "jobId": st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._:-]{0,40}[A-Za-z0-9])?", fullmatch=True),
        "params": st.dictionaries(st.text(min_size=1, max_size=10), json_scalars, max_size=4),
        "image": st.sampled_from(["nvcr.io/x/y:1", "registry.local:5000/a/b@sha256:" + "a" * 64]),
        "command": st.lists(st.text(max_size=20), min_size=1, max_size=4),
        "args": st.lists(st.text(max_size=20), max_size=4),
        "env": st.lists(st.fixed_dictionaries({"name": env_names, "value": st.text(max_size=20)}), max_size=3),
        "gpus": st.integers(0, 64),
        "gpuResource": st.sampled_from(["nvidia.com/gpu", "nvidia.com/mig-1g.10gb", "amd.com/gpu"]),
        "gpuProduct": st.sampled_from(["NVIDIA-A100-SXM4-80GB", "NVIDIA-L4"]),
        "resources": st.fixed_dictionaries(
            {},
            optional={
                "requests": st.dictionaries(st.sampled_from(["cpu", "memory"]), quantities, max_size=2),
                "limits": st.dictionaries(st.sampled_from(["cpu", "memory"]), quantities, max_size=2),
            },
        ),
        "priorityClassName": names,
        "nodeSelector": st.dictionaries(st.sampled_from(["zone", "pool", "kubernetes.io/arch"]), names, max_size=2),
        "tolerations": st.lists(
            st.fixed_dictionaries(
                {"key": names, "operator": st.just("Exists"), "effect": st.sampled_from(["NoSchedule", "NoExecute"])}
            ),
            max_size=2,
        ),
        "timeoutSeconds": st.integers(1, 10**6),
        "pendingTimeoutSeconds": st.integers(1, 10**5),
        "retries": st.fixed_dictionaries({"limit": st.integers(0, 100), "backoffSeconds": st.integers(0, 3600)}),
        "models": st.fixed_dictionaries({"claimName": names, "readOnly": st.booleans()}, optional={"subPath": names}),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, attempt=st.integers(1, 500))
def test_any_valid_spec_builds_a_pod_the_kubernetes_schema_accepts(spec: dict[str, Any], attempt: int) -> None:
    pod = build_pod(REF, GpuJobSpec.model_validate(spec), attempt, DEFAULTS)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert len(pod["metadata"]["name"]) <= 63
    assert all(len(v) <= 63 for v in pod["metadata"]["labels"].values())


# --- the status function as a state machine
LEGAL = {
    None: {Phase.QUEUED},
    Phase.QUEUED: {Phase.SCHEDULED, Phase.SUSPENDED, Phase.CANCELLED, Phase.FAILED},
    Phase.SCHEDULED: {
        Phase.PENDING,
        Phase.RUNNING,
        Phase.SUCCEEDED,
        Phase.FAILED,
        Phase.RETRYING,
        Phase.SUSPENDED,
        Phase.CANCELLED,
    },
    # Stuck (unschedulable, image pull errors): unstuck (Scheduled), or on as from Scheduled.
    Phase.PENDING: {
        Phase.SCHEDULED,
        Phase.RUNNING,
        Phase.SUCCEEDED,
        Phase.FAILED,
        Phase.RETRYING,
        Phase.SUSPENDED,
        Phase.CANCELLED,
    },
    Phase.RUNNING: {Phase.SUCCEEDED, Phase.FAILED, Phase.RETRYING, Phase.SCHEDULED, Phase.SUSPENDED, Phase.CANCELLED},
    Phase.RETRYING: {Phase.SCHEDULED, Phase.SUSPENDED, Phase.CANCELLED},
    Phase.SUSPENDED: {Phase.SCHEDULED, Phase.CANCELLED},
}
T0 = datetime(2026, 1, 1, tzinfo=UTC)
# Pod reasons of takeaways on the node side: never the job's failure.
NODE_SIDE_REASONS = ["Evicted", "Preempting", "Preempted", "Shutdown", "NodeShutdown", "Terminated"]
TAKEAWAYS = {"evict", "preempt", "kubectl-delete-graceful"}

world_steps = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.integers(1, 2000)),
        st.tuples(st.just("run"), st.just(0)),
        st.tuples(st.just("exit"), st.sampled_from([0, 1, 2, 64, 137])),
        st.tuples(st.just("oom"), st.just(137)),
        st.tuples(st.just("evict"), st.integers(0, len(NODE_SIDE_REASONS) - 1)),
        st.tuples(st.just("preempt"), st.just(143)),  # DisruptionTarget, deleted, the worker SIGTERMed
        st.tuples(st.just("kubectl-delete-graceful"), st.sampled_from([143, 137])),
        st.tuples(st.just("unschedulable"), st.just(0)),
        st.tuples(st.just("deadline"), st.just(0)),
        st.tuples(st.just("kubectl-delete"), st.just(0)),
        st.tuples(st.just("finish-deletes"), st.just(0)),
        st.tuples(st.just("suspend"), st.booleans().map(int)),
        st.tuples(st.just("cancel"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps=world_steps, limit=st.integers(0, 3), backoff=st.integers(0, 30))
def test_any_sequence_of_pod_states_gives_legal_phases(steps: list[tuple[str, int]], limit: int, backoff: int) -> None:
    body: dict[str, Any] = {
        "metadata": {"name": "j", "namespace": "ml", "uid": "u", "generation": 1},
        "spec": {
            "type": "train_lora",
            "pendingTimeoutSeconds": 600,
            "retries": {"limit": limit, "backoffSeconds": backoff, "maxBackoffSeconds": 60},
        },
        "status": {},
    }
    pods: dict[str, PodView] = {}
    now = T0
    phases: list[Phase | None] = [None]
    attempts = failures = 0

    def current() -> PodView | None:
        live = [p for p in pods.values() if p.attempt == body["status"].get("attempts")]
        return live[0] if live else None

    def set_pod(**changes: Any) -> None:
        pod = current()
        if pod is not None and pod.phase in ALIVE_POD_PHASES:
            pods[pod.name] = PodView(**{**pod.__dict__, **changes})

    for action, arg in [("wait", 0), *steps, ("wait", 0)]:
        if action == "wait":
            now += timedelta(seconds=arg)
        elif action == "run":
            set_pod(phase="Running")
        elif action in ("exit", "oom"):
            set_pod(
                phase="Succeeded" if arg == 0 else "Failed",
                exit_code=arg,
                reason="OOMKilled" if action == "oom" else None,
            )
        elif action == "evict":
            set_pod(phase="Failed", reason=NODE_SIDE_REASONS[arg], exit_code=143)
        elif action == "preempt":
            set_pod(phase="Failed", deleting=True, disruption="PreemptionByScheduler", exit_code=arg)
        elif action == "kubectl-delete-graceful":  # the kubelet reports Failed before the Pod goes
            set_pod(phase="Failed", deleting=True, exit_code=arg)
        elif action == "unschedulable":
            set_pod(reason="Unschedulable")
        elif action == "deadline":
            set_pod(phase="Failed", reason="DeadlineExceeded")
        elif action == "kubectl-delete" and (pod := current()) is not None:
            del pods[pod.name]
        elif action == "finish-deletes":
            pods = {n: p for n, p in pods.items() if not p.deleting}
        elif action == "suspend":
            body["spec"]["suspend"] = bool(arg)
        elif action == "cancel":
            body["spec"]["cancel"] = True

        d = decide(body, list(pods.values()), now)
        alive_before = [p for p in pods.values() if p.phase in ALIVE_POD_PHASES]
        if d.create_attempt is not None:
            assert not alive_before, "a new attempt while a Pod of the job is alive"
        for t in d.transitions:
            assert t.old == phases[-1] and t.new in LEGAL.get(t.old, set()), f"illegal {t.old} -> {t.new}"
            phases.append(t.new)
        assert d.status.attempts >= attempts
        attempts = d.status.attempts
        assert d.status.failures <= limit + 1 and d.status.failures <= d.status.attempts
        if action in TAKEAWAYS:
            assert d.status.failures == failures, f"{action} counted as the job's failure"
        failures = d.status.failures
        for name in d.delete_pods:
            if name in pods:
                pods[name] = PodView(**{**pods[name].__dict__, "deleting": True})
        if d.create_attempt is not None:
            name = f"j-{d.create_attempt}"
            pods[name] = PodView(name=name, attempt=d.create_attempt, created=now)
        assert len([p for p in pods.values() if p.phase in ALIVE_POD_PHASES and not p.deleting]) <= 1
        body["status"] = d.status.wire()
        if phases[-1] is not None and phases[-1].terminal:
            assert not any(p.phase in ALIVE_POD_PHASES and not p.deleting for p in pods.values())
