"""The sandbox kubelet alone against the API emulator (no operator): real local processes, real pod status."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from gpujob.sandbox.procs import wait_for
from tests.support.emulator import RunningEmulator
from tests.support.sandbox import KubeletThread

NS = "default"


def pod(name: str, script: str, **extra: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "busybox", "command": ["sh", "-c", script]}
    container.update(extra.pop("container", {}))
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container], **extra}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def core(k8s_api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(k8s_api)


def status(core: client.CoreV1Api, name: str) -> Any:
    return core.read_namespaced_pod(name, NS).status


def wait_phase(core: client.CoreV1Api, name: str, phase: str, timeout: float = 20) -> Any:
    return wait_for(lambda: (s := status(core, name)).phase == phase and s, timeout, what=f"pod {name} phase {phase}")


def terminated(st: Any) -> Any:
    return st.container_statuses[0].state.terminated


def test_node_is_registered_with_gpus(kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api) -> None:
    kubelet_factory(gpus=3)
    node = core.read_node("sandbox-node")
    assert node.status.allocatable["nvidia.com/gpu"] == "3"
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-SANDBOX"
    assert node.status.conditions[0].type == "Ready" and node.status.conditions[0].status == "True"


def test_success_runs_a_local_process(kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api) -> None:
    kubelet = kubelet_factory()
    core.create_namespaced_pod(NS, pod("hi", "echo hi; exit 0"))
    st = wait_phase(core, "hi", "Succeeded")
    term = terminated(st)
    assert term.exit_code == 0 and term.reason == "Completed" and term.finished_at
    assert st.start_time is not None
    assert core.read_namespaced_pod("hi", NS).spec.node_name == "sandbox-node"
    [log] = list((kubelet.kubelet.node.pods_dir).glob("default_hi_*/container.log"))
    assert log.read_text() == "hi\n"


def test_exit_code_fails_the_pod(kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api) -> None:
    kubelet_factory()
    core.create_namespaced_pod(NS, pod("three", "echo about to fail >&2; exit 3"))
    st = wait_phase(core, "three", "Failed")
    assert terminated(st).exit_code == 3 and terminated(st).reason == "Error"


def test_running_state_is_reported(kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api) -> None:
    kubelet_factory()
    core.create_namespaced_pod(NS, pod("long", "sleep 30"))
    st = wait_phase(core, "long", "Running")
    assert st.container_statuses[0].state.running.started_at is not None
    assert {c.type: c.status for c in st.conditions}["Ready"] == "True"


def test_active_deadline_is_enforced(kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api) -> None:
    kubelet_factory()
    core.create_namespaced_pod(NS, pod("slow", "sleep 60", activeDeadlineSeconds=1, terminationGracePeriodSeconds=2))
    st = wait_phase(core, "slow", "Failed", timeout=15)
    assert st.reason == "DeadlineExceeded"
    assert terminated(st).exit_code == 143  # sh took the SIGTERM


def test_memory_limit_oom_kills(kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api) -> None:
    kubelet_factory()
    grow = "import time; b = [bytearray(16 << 20) for _ in range(16)]; time.sleep(30)"
    body = pod("hog", "", container={"command": ["python3", "-c", grow], "resources": {"limits": {"memory": "64Mi"}}})
    core.create_namespaced_pod(NS, body)
    st = wait_phase(core, "hog", "Failed", timeout=20)
    assert terminated(st).reason == "OOMKilled" and terminated(st).exit_code == 137


def test_delete_sends_sigterm_and_pod_disappears(
    kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api, tmp_path: Path
) -> None:
    kubelet = kubelet_factory()
    marker = tmp_path / "got-sigterm"
    script = f"trap 'echo term > {marker}; exit 0' TERM; while true; do sleep 0.1; done"
    core.create_namespaced_pod(NS, pod("victim", script, terminationGracePeriodSeconds=5))
    wait_phase(core, "victim", "Running")
    [pid] = wait_for(kubelet.pids, what="the pod's process")
    core.delete_namespaced_pod("victim", NS)
    wait_for(marker.exists, 10, what="the SIGTERM trap to run")
    assert marker.read_text() == "term\n"
    wait_for(lambda: not kubelet.pids(), 10, what="the process to be reaped")
    names = [p.metadata.name for p in core.list_namespaced_pod(NS).items]
    assert "victim" not in names
    assert not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()


def test_delete_escalates_to_sigkill_after_grace(
    kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api
) -> None:
    kubelet = kubelet_factory()
    core.create_namespaced_pod(
        NS, pod("stubborn", "trap '' TERM; while true; do sleep 0.1; done", terminationGracePeriodSeconds=1)
    )
    wait_phase(core, "stubborn", "Running")
    wait_for(kubelet.pids, what="the pod's process")
    core.delete_namespaced_pod("stubborn", NS)
    wait_for(lambda: not kubelet.pids(), 10, what="the SIGKILL after the grace period")


def test_gpus_are_accounted(kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api) -> None:
    kubelet_factory(gpus=1)
    gpu = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    core.create_namespaced_pod(NS, pod("first", "sleep 2; echo $CUDA_VISIBLE_DEVICES", container=gpu))
    wait_phase(core, "first", "Running")
    core.create_namespaced_pod(NS, pod("second", "exit 0", container=gpu))

    def unschedulable() -> Any:
        conds = status(core, "second").conditions or []
        return next((c for c in conds if c.type == "PodScheduled" and c.status == "False"), None)

    cond = wait_for(unschedulable, what="the second pod to be Unschedulable")
    assert cond.reason == "Unschedulable"
    assert cond.message == "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    assert status(core, "second").phase == "Pending" and not core.read_namespaced_pod("second", NS).spec.node_name
    wait_phase(core, "first", "Succeeded")
    wait_phase(core, "second", "Succeeded")


def test_pod_needing_more_gpus_than_the_node_stays_pending(
    kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api
) -> None:
    kubelet_factory(gpus=2)
    body = pod("big", "exit 0", container={"resources": {"limits": {"nvidia.com/gpu": "4"}}})
    core.create_namespaced_pod(NS, body)
    wait_for(lambda: status(core, "big").conditions, what="the scheduler's verdict")
    st = status(core, "big")
    assert st.phase == "Pending" and st.conditions[0].reason == "Unschedulable"


def test_node_selector_must_match(kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api) -> None:
    kubelet_factory()
    core.create_namespaced_pod(NS, pod("h100", "exit 0", nodeSelector={"nvidia.com/gpu.product": "NVIDIA-H100"}))
    cond = wait_for(lambda: (status(core, "h100").conditions or [None])[0], what="the scheduler's verdict")
    assert "didn't match Pod's node affinity/selector" in cond.message


def test_env_from_secrets_and_fields(kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api) -> None:
    kubelet_factory()
    b64 = base64.b64encode
    core.create_namespaced_secret(
        NS,
        {
            "metadata": {"name": "creds"},
            "data": {"TOKEN": b64(b"s3cr3t").decode(), "USER": b64(b"alice").decode()},
        },
    )
    env = [
        {"name": "PLAIN", "value": "v"},
        {"name": "EXPANDED", "value": "$(PLAIN)-x"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "ONE", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "USER"}}},
    ]
    container = {
        "env": env,
        "envFrom": [{"secretRef": {"name": "creds"}}, {"secretRef": {"name": "absent", "optional": True}}],
        "terminationMessagePath": "/dev/termination-log",
    }
    script = 'echo "$PLAIN $EXPANDED $POD $NS $ONE $TOKEN" > "$GPUJOB_TERMINATION_MESSAGE_PATH"'
    core.create_namespaced_pod(NS, pod("envy", script, container=container))
    st = wait_phase(core, "envy", "Succeeded")
    assert terminated(st).message == "v v-x envy default alice s3cr3t\n"


def test_missing_required_secret_is_a_config_error(
    kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api
) -> None:
    kubelet_factory()
    container = {"envFrom": [{"secretRef": {"name": "nowhere"}}]}
    core.create_namespaced_pod(NS, pod("noconf", "exit 0", container=container))

    def waiting() -> Any:
        statuses = status(core, "noconf").container_statuses or []
        return statuses and statuses[0].state.waiting

    state = wait_for(waiting, what="CreateContainerConfigError")
    assert state.reason == "CreateContainerConfigError" and 'secret "nowhere" not found' in state.message
    assert status(core, "noconf").phase == "Pending"
    core.create_namespaced_secret(NS, {"metadata": {"name": "nowhere"}, "data": {}})
    wait_phase(core, "noconf", "Succeeded", timeout=15)


def test_api_errors_while_configuring_are_retried_not_the_end_of_the_pod(
    kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api, emulator: RunningEmulator
) -> None:
    """A Pod waiting for its Secret volume while the API server fails the kubelet's reads (a kube-apiserver restart,
    seen under chaos) starts once the Secret is there: the errors are retried, as a kubelet does."""
    kubelet_factory()
    volumes = [{"name": "creds", "secret": {"secretName": "later"}}]
    container = {"volumeMounts": [{"name": "creds", "mountPath": "/creds"}]}
    core.create_namespaced_pod(NS, pod("flaky", "exit 0", container=container, volumes=volumes))
    wait_for(lambda: (status(core, "flaky").container_statuses or [None])[0], what="the Pod waits for its Secret")
    # Every Secret read of the kubelet (aiohttp's User-Agent: Python/...) fails, and is seen failing.
    emulator.set_faults(error_500_rate=1.0, resources=["secrets"], agents=["Python"])
    injected = lambda: emulator.call(lambda: emulator.emulator.faults.injected["500"])  # noqa: E731
    wait_for(lambda: injected() >= 2, what="the kubelet's Secret reads failing")
    emulator.set_faults(error_500_rate=0.0)
    core.create_namespaced_secret(NS, {"metadata": {"name": "later"}, "data": {"K": "dg=="}})
    wait_phase(core, "flaky", "Succeeded", timeout=15)


def test_termination_message_is_copied(kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api) -> None:
    kubelet_factory()
    script = 'echo \'{"artifacts": []}\' > "$GPUJOB_TERMINATION_MESSAGE_PATH"'
    core.create_namespaced_pod(NS, pod("msg", script, container={"terminationMessagePath": "/dev/termination-log"}))
    st = wait_phase(core, "msg", "Succeeded")
    assert terminated(st).message == '{"artifacts": []}\n'


def test_termination_message_is_capped_and_falls_back_to_logs(
    kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api
) -> None:
    kubelet_factory()
    big = "head -c 9000 /dev/zero | tr '\\0' x > \"$GPUJOB_TERMINATION_MESSAGE_PATH\""
    core.create_namespaced_pod(NS, pod("big-msg", big))
    assert len(terminated(wait_phase(core, "big-msg", "Succeeded")).message) == 4096
    fallback = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    core.create_namespaced_pod(NS, pod("crash", "echo traceback here; exit 2", container=fallback))
    assert terminated(wait_phase(core, "crash", "Failed")).message == "traceback here"


def test_models_claim_maps_to_local_dir(
    kubelet_factory: Callable[..., KubeletThread], core: client.CoreV1Api, tmp_path: Path
) -> None:
    kubelet_factory()
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "base.txt").write_text("weights")
    body = pod(
        "models",
        'cat "$GPUJOB_MODELS_DIR/base.txt" > "$GPUJOB_TERMINATION_MESSAGE_PATH"; '
        'test "$WHERE" = "$GPUJOB_MODELS_DIR/x"',
        container={
            "volumeMounts": [{"name": "models", "mountPath": "/opt/models", "readOnly": True}],
            "env": [
                {"name": "GPUJOB_MODELS_DIR", "value": "/opt/models"},
                {"name": "WHERE", "value": "/opt/models/x"},
            ],
        },
        volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "gpujob-models"}}],
    )
    core.create_namespaced_pod(NS, body)
    st = wait_phase(core, "models", "Succeeded")
    assert terminated(st).message == "weights"
