"""The real kubectl against the emulator: apply (validated via OpenAPI), get, explain, -w, wait, delete."""

from __future__ import annotations

import subprocess
import threading
from typing import Any

from tests.support.emulator import KUBECTL, REPO, wait_until

EXAMPLE = REPO / "examples" / "train-lora.yaml"
RUNNING = '{"status": {"phase": "Running"}}'


def test_apply_get_explain_and_delete(kubectl: Any) -> None:
    # Plain apply: kubectl reads /openapi/v3 to decide how to validate; no --validate=false needed.
    assert "created" in kubectl("apply", "-f", str(EXAMPLE)).stdout
    assert "unchanged" in kubectl("apply", "-f", str(EXAMPLE)).stdout
    changed = EXAMPLE.read_text().replace("gpus: 1", "gpus: 2")
    assert "configured" in kubectl("apply", "-f", "-", input=changed).stdout
    assert kubectl("get", "gj", "lora-demo", "-o", "jsonpath={.spec.gpus}/{.metadata.generation}").stdout == "2/2"

    table = kubectl("get", "gj").stdout.splitlines()
    assert table[0].split() == ["NAME", "TYPE", "PHASE", "PROGRESS", "GPUS", "ATTEMPTS", "AGE"]
    assert table[1].split()[:3] == ["lora-demo", "train_lora", "2"]
    assert "NODE" in kubectl("get", "gpujobs", "-o", "wide").stdout.splitlines()[0]

    explained = kubectl("explain", "gpujob.spec").stdout
    assert "What to run and how" in explained and "gpus" in explained
    assert "Kind of work" in kubectl("explain", "gj.spec.type").stdout

    assert 'gpujob.gpujob.dev "lora-demo" deleted' in kubectl("delete", "gj", "lora-demo").stdout
    assert "NotFound" in kubectl("get", "gj", "lora-demo", check=False).stderr


def test_invalid_gpujob_is_rejected_naming_the_field(kubectl: Any) -> None:
    bad = EXAMPLE.read_text().replace("gpus: 1", "gpus: 100")
    result = kubectl("apply", "-f", "-", input=bad, check=False)
    assert result.returncode != 0
    assert 'GpuJob "lora-demo" is invalid: spec.gpus: Invalid value: 100' in result.stderr
    unknown = EXAMPLE.read_text().replace("gpus: 1", "gpux: 1")
    assert 'unknown field "spec.gpux"' in kubectl("apply", "-f", "-", input=unknown, check=False).stderr


def test_get_watch_and_wait(emulator: Any, kubectl: Any) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    argv = [str(KUBECTL), "--kubeconfig", str(emulator.kubeconfig)]
    watcher = subprocess.Popen([*argv, "get", "gj", "-w"], stdout=subprocess.PIPE, text=True)
    waiter = subprocess.Popen(
        [*argv, "wait", "gj/lora-demo", "--for=jsonpath={.status.phase}=Running", "--timeout=30s"]
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: any("lora-demo" in line for line in lines), message="kubectl get -w shows the job")
        kubectl("patch", "gj", "lora-demo", "--subresource=status", "--type=merge", "-p", RUNNING)
        assert waiter.wait(timeout=30) == 0
        wait_until(lambda: any("Running" in line for line in lines), message="kubectl get -w streams the change")
    finally:
        watcher.terminate()
        waiter.kill()
        watcher.wait(timeout=10)


def test_apply_pods_with_strategic_merge_and_selectors(kubectl: Any) -> None:
    manifest = """
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  containers:
  - {name: main, image: nginx, env: [{name: A, value: "1"}]}
  - {name: side, image: busybox}
"""
    kubectl("apply", "-f", "-", input=manifest)
    kubectl("apply", "-f", "-", input=manifest.replace('value: "1"', 'value: "2"'))
    env = kubectl("get", "pod", "web", "-o", "jsonpath={.spec.containers[0].env[0].value}").stdout
    assert env == "2"
    assert "web" in kubectl("get", "pods", "-l", "app=web").stdout
    assert "No resources found" in kubectl("get", "pods", "-l", "app=other").stderr
    assert "Pending" in kubectl("get", "pods", "--field-selector", "status.phase=Pending").stdout
    assert "serverside-applied" in kubectl("apply", "--server-side", "-f", str(EXAMPLE)).stdout


def test_imperative_creates_send_protobuf(kubectl: Any) -> None:
    # kubectl sends these typed objects as protobuf; the emulator decodes the common kinds.
    kubectl("create", "namespace", "team")
    kubectl("create", "secret", "generic", "creds", "-n", "team", "--from-literal=token=abc")
    kubectl("create", "configmap", "conf", "-n", "team", "--from-literal=k=v")
    kubectl("create", "serviceaccount", "robot", "-n", "team")
    kubectl("create", "role", "reader", "-n", "team", "--verb=get,list", "--resource=pods")
    kubectl("create", "rolebinding", "reader", "-n", "team", "--role=reader", "--serviceaccount=team:robot")
    assert kubectl("get", "secret", "creds", "-n", "team", "-o", "jsonpath={.data.token}").stdout == "YWJj"
    assert kubectl("get", "cm", "conf", "-n", "team", "-o", "jsonpath={.data.k}").stdout == "v"
    assert kubectl("get", "role", "reader", "-n", "team", "-o", "jsonpath={.rules[0].verbs}").stdout == '["get","list"]'
    assert "Active" in kubectl("get", "ns", "team").stdout
    kubectl("delete", "ns", "team")
    assert "NotFound" in kubectl("get", "secret", "creds", "-n", "team", check=False).stderr
