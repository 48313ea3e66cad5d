"""The pure status logic against what the worker (or any container of its Pod) hands back: the worker's container
read by name among sidecars (issue 12 item 7), its termination message taken as untrusted input (item 15), and
params too large to hand to it (item 16). No server, no clock."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpujob.api.constants import MAX_METRICS, MAX_PARAMS_BYTES, Label, Phase, Reason
from gpujob.api.models import GpuJobSpec
from gpujob.operator.conventions import iso
from gpujob.operator.podview import PodView, pod_view, worker_result
from gpujob.operator.status import Decision, decide, status_patch, without_worker_output
from gpujob.sandbox import schema
from tests.support.bridge import with_valid_params

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
CRD = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" / "gpujob.yaml").read_text())
STATUS_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
SHA = "ab" * 32


def job(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "j", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": with_valid_params({"type": "train_lora", **(spec or {})}),
        "status": {},
    }


def step(body: dict[str, Any], pods: list[PodView], now: datetime = T0) -> Decision:
    d = decide(body, pods, now)
    body["status"] = d.status.wire()
    return d


def container(name: str, state: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ready": False, "restartCount": 0, "image": "x", "imageID": "", "state": state}


def terminated(exit_code: int, message: str | None = None, reason: str | None = None) -> dict[str, Any]:
    term: dict[str, Any] = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error")}
    if message is not None:
        term["message"] = message
    return {"terminated": term}


def raw_pod(phase: str, statuses: list[dict[str, Any]], attempt: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"name": f"j-{attempt}", "labels": {Label.ATTEMPT: str(attempt)}, "creationTimestamp": iso(T0)},
        "spec": {"nodeName": "gpu-1"},
        "status": {"phase": phase, "containerStatuses": statuses},
    }


RESULT = json.dumps({"artifacts": [{"key": "loras/j/a.safetensors", "size": 3, "sha256": SHA}], "metrics": {"x": 1}})


def running_job(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    body = job(spec)
    step(body, [])
    step(body, [PodView(name="j-1", attempt=1, phase="Running", created=T0, node_name="gpu-1")])
    return body


# --- item 7: the worker's container by name ---------------------------------------------------------------------


@pytest.mark.parametrize("sidecar", ["istio-proxy", "zz-log-shipper"], ids=["sorted-before", "sorted-after"])
def test_a_sidecars_exit_code_and_message_never_replace_the_workers(sidecar: str) -> None:
    side = container(sidecar, terminated(137, "sidecar: killed", reason="OOMKilled"))
    work = container("worker", terminated(1, '{"error": "the worker failed"}'))
    view = pod_view(raw_pod("Failed", sorted([side, work], key=lambda c: c["name"])))
    assert (view.exit_code, view.reason) == (1, "Error")
    assert view.result == '{"error": "the worker failed"}'


def test_worker_succeeded_and_a_sidecar_failed_is_the_jobs_success() -> None:
    body = running_job({"retries": {"limit": 0}})
    statuses = [container("worker", terminated(0, RESULT)), container("zz-sidecar", terminated(2, "crashed"))]
    d = step(body, [pod_view(raw_pod("Failed", statuses))], T0 + timedelta(minutes=1))
    assert d.status.phase is Phase.SUCCEEDED and d.status.exit_code == 0 and d.status.failures == 0
    assert [a.key for a in d.status.artifacts] == ["loras/j/a.safetensors"]


def test_worker_done_while_a_sidecar_runs_on_ends_the_attempt_and_deletes_the_pod() -> None:
    body = running_job({"retries": {"limit": 0}})
    statuses = [container("worker", terminated(0, RESULT)), container("zz-sidecar", {"running": {}})]
    d = step(body, [pod_view(raw_pod("Running", statuses))])
    assert d.status.phase is Phase.SUCCEEDED and d.delete_pods == ["j-1"]

    body = running_job({"retries": {"limit": 0}})
    statuses = [container("worker", terminated(3, '{"error": "bad"}')), container("zz-sidecar", {"running": {}})]
    d = step(body, [pod_view(raw_pod("Running", statuses))])
    assert d.status.phase is Phase.FAILED and d.status.exit_code == 3 and d.delete_pods == ["j-1"]
    assert "bad" in (d.status.message or "")


def test_the_workers_waiting_state_is_read_not_a_sidecars() -> None:
    statuses = [
        container("aa-sidecar", {"waiting": {"reason": "ImagePullBackOff", "message": "sidecar image"}}),
        container("worker", {"running": {"startedAt": iso(T0)}}),
    ]
    view = pod_view(raw_pod("Pending", statuses))
    assert view.reason is None and view.started_at == T0


# --- item 15: the termination message is untrusted ------------------------------------------------------------

HOSTILE = [
    # more metrics than status.metrics may hold (maxProperties 64)
    json.dumps({"metrics": {f"m{i:03d}": i for i in range(200)}}),
    # NaN and Infinity: Python's json reads and writes them, JSON (and the API server) has neither
    '{"metrics": {"loss": NaN, "gain": Infinity, "drop": -Infinity, "ok": 1.5}}',
    # an integer beyond any float; a float beyond double (read as inf)
    '{"metrics": {"big": ' + "9" * 400 + ', "huge": 1e400, "ok": 2}}',
    # sizes beyond int64; a key over maxLength 1024; a bad digest; wrong types everywhere
    json.dumps(
        {
            "artifacts": [
                {"key": "a", "size": 2**64, "sha256": SHA},
                {"key": "k" * 5000, "size": 1, "sha256": SHA},
                {"key": "b", "size": 1, "sha256": "not-hex"},
                {"key": "c", "size": -1, "sha256": SHA},
                "a string",
                None,
                {"key": "ok", "size": 2**63 - 1, "sha256": SHA},
            ],
            "metrics": {"s": "1.0", "b": True, "l": [1], "n": None, "": 1, "x" * 1000: 1, "ok": 3},
        }
    ),
    json.dumps({"artifacts": {"key": "a"}, "metrics": [1, 2]}),
    json.dumps({"artifacts": "loras/x", "metrics": "loss=1"}),
    json.dumps([{"artifacts": []}]),
    '"just a string"',
    "[" * 100_000,  # deeper than the parser's recursion limit
    '{"metrics": {"\\ud800lone": 1, "ok": 4}, "artifacts": [{"key": "\\udfff", "size": 1, "sha256": "' + SHA + '"}]}',
    "x" * 1_000_000,
    '{"metrics": {"ok": 5}, "pad": "' + "y" * 1_000_000 + '"}',
]


@pytest.mark.parametrize("message", HOSTILE, ids=lambda m: m[:30])
def test_any_termination_message_gives_a_status_the_api_server_accepts(message: str) -> None:
    body = running_job()
    d = step(body, [pod_view(raw_pod("Succeeded", [container("worker", terminated(0, message))]))])
    assert d.status.phase is Phase.SUCCEEDED
    wire = d.status.wire()
    encoded = json.dumps(wire, allow_nan=False)  # valid JSON: no NaN/Infinity
    encoded.encode()  # valid UTF-8: no lone surrogates
    assert schema.validate(STATUS_SCHEMA, json.loads(encoded)) == []
    assert len(wire.get("metrics", {})) <= MAX_METRICS
    assert all(math.isfinite(v) for v in wire.get("metrics", {}).values())
    assert status_patch(wire, d.status) == {}  # what is stored reads back as written: no endless rewrites


def test_worker_result_keeps_what_is_valid_and_drops_the_rest() -> None:
    artifacts, metrics = worker_result(HOSTILE[3])
    assert [a.key for a in artifacts] == ["ok"] and metrics == {"ok": 3.0}
    assert worker_result(HOSTILE[1])[1] == {"ok": 1.5}
    assert worker_result(HOSTILE[2])[1] == {"ok": 2.0}
    assert list(worker_result(HOSTILE[0])[1]) == [f"m{i:03d}" for i in range(MAX_METRICS)]  # the first 64
    assert worker_result(HOSTILE[9])[1] == {"?lone": 1.0, "ok": 4.0}


def test_a_failure_message_from_hostile_output_is_bounded_and_valid() -> None:
    body = running_job({"retries": {"limit": 0}})
    message = json.dumps({"error": "\udc80" + "e" * 100_000})
    d = step(body, [pod_view(raw_pod("Failed", [container("worker", terminated(1, message))]))])
    assert d.status.phase is Phase.FAILED
    json.dumps(d.status.wire(), allow_nan=False).encode()
    assert schema.validate(STATUS_SCHEMA, d.status.wire()) == []


def test_without_worker_output_keeps_the_phase() -> None:
    body = running_job()
    d = step(body, [pod_view(raw_pod("Succeeded", [container("worker", terminated(0, RESULT))]))])
    bare = without_worker_output(d.status)
    assert bare.phase is Phase.SUCCEEDED and bare.artifacts == [] and bare.metrics == {}
    assert d.status.artifacts  # the original is untouched


# --- item 16: params the worker cannot be given ---------------------------------------------------------------


def params_of_size(size: int) -> dict[str, str]:
    """params whose compact JSON is exactly `size` bytes."""
    overhead = len(json.dumps({"p": ""}, separators=(",", ":")))
    return {"p": "x" * (size - overhead)}


def test_params_over_the_limit_fail_the_job_before_any_pod() -> None:
    body = job({"type": "custom", "params": params_of_size(MAX_PARAMS_BYTES + 1), "ttlSecondsAfterFinished": 60})
    d = step(body, [])
    assert d.create_attempt is None and d.status.attempts == 0
    assert d.status.phase is Phase.FAILED and d.status.reason == Reason.INVALID_SPEC
    assert f"{MAX_PARAMS_BYTES + 1} bytes" in (d.status.message or "") and str(MAX_PARAMS_BYTES) in d.status.message
    assert d.requeue_after == 60  # finished: its TTL applies
    assert step(body, []).create_attempt is None  # and stays failed


def test_params_at_the_limit_run_and_multibyte_characters_count_as_bytes() -> None:
    assert step(job({"type": "custom", "params": params_of_size(MAX_PARAMS_BYTES)}), []).create_attempt == 1
    wide = {"p": "é" * (MAX_PARAMS_BYTES // 2)}  # fewer characters than the limit, more bytes
    assert GpuJobSpec.model_validate({"type": "custom", "params": wide}).params_error()
    assert step(job({"type": "custom", "params": wide}), []).status.reason == Reason.INVALID_SPEC


def test_params_grown_while_suspended_fail_the_resume() -> None:
    body = job({"suspend": True})
    step(body, [])
    body["spec"] = {"type": "custom", "suspend": False, "params": params_of_size(MAX_PARAMS_BYTES + 10)}
    d = step(body, [])
    assert d.status.phase is Phase.FAILED and d.status.reason == Reason.INVALID_SPEC and d.create_attempt is None
