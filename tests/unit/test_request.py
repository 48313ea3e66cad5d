"""The stream request contract (gpujob.api.request) and the GpuJob built from it: pure, no servers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpujob.api.constants import MAX_PARAMS_BYTES, Annotation, JobType, Label
from gpujob.api.models import JOB_ID_PATTERN, GpuJobSpec
from gpujob.api.naming import job_name, label_value
from gpujob.api.request import (
    MAX_ENTRY_BYTES,
    Action,
    CancelRequest,
    InvalidEntry,
    JobRequest,
    parse_entry,
    request_schema,
)
from gpujob.bridge.intake import gpujob_body
from tests.integration.test_crd import VALIDATOR

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


def entry(job: dict[str, Any] | str, action: str | None = None) -> dict[str, str]:
    fields = {"job": job if isinstance(job, str) else json.dumps(job)}
    return fields if action is None else {**fields, "action": action}


def test_minimal_request_gets_the_spec_defaults() -> None:
    request = JobRequest.model_validate({"jobId": "a1", "type": "train_lora"})
    spec = request.to_spec()
    assert spec == GpuJobSpec.model_validate({"type": "train_lora", "jobId": "a1"})
    assert spec.gpus == 1 and spec.cancel is False and spec.retries.limit == 3


def test_every_spec_field_is_accepted_and_passed_through() -> None:
    data = {
        "jobId": "Order:42",
        "type": "render_video",
        "params": {"fps": 24, "prompt": "a cat"},
        "gpus": 2,
        "gpuResource": "nvidia.com/mig-1g.10gb",
        "gpuProduct": "NVIDIA-A100-SXM4-80GB",
        "image": "registry.example/worker:1",
        "command": ["python", "-m", "x"],
        "args": ["--fast"],
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "timeoutSeconds": 3600,
        "pendingTimeoutSeconds": 120,
        "retries": {"limit": 1, "backoffSeconds": 5},
        "ttlSecondsAfterFinished": 600,
        "nodeSelector": {"pool": "a100"},
    }
    spec = JobRequest.model_validate(data).to_spec().wire()
    for key, value in data.items():
        assert spec[key] == value or (isinstance(value, dict) and value.items() <= spec[key].items()), key


def test_namespace_is_not_a_spec_field_and_a_string_priority_is_the_old_priority_class_name() -> None:
    """`priority` was a PriorityClass name; it is now the integer order in the job's queue (spec.priority). A
    string is still read the old way (deprecated), so a backend not yet updated keeps working."""
    request = JobRequest.model_validate({"jobId": "p", "type": "custom", "namespace": "team-a", "priority": "high"})
    wire = request.to_spec().wire()
    assert "namespace" not in wire and wire["priority"] == 0
    assert wire["priorityClassName"] == "high"


def test_an_integer_priority_and_the_queue_are_spec_fields() -> None:
    request = JobRequest.model_validate(
        {"jobId": "p", "type": "custom", "queue": "team-a", "priority": 7, "priorityClassName": "batch"}
    )
    spec = request.to_spec()
    assert (spec.queue, spec.priority, spec.priority_class_name) == ("team-a", 7, "batch")
    assert JobRequest.model_validate({"jobId": "p", "type": "custom"}).to_spec().priority == 0


def test_explicit_priority_class_name_wins_over_priority() -> None:
    request = JobRequest.model_validate(
        {"jobId": "p", "type": "custom", "priority": "low", "priorityClassName": "gpu-critical"}
    )
    assert request.to_spec().priority_class_name == "gpu-critical"


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        ({"type": "custom"}, "jobId: Field required"),
        ({"jobId": "x"}, "type: Field required"),
        ({"jobId": "x", "type": "custom", "hostNetwork": True}, "hostNetwork: Extra inputs are not permitted"),
        ({"jobId": "x" * 129, "type": "custom"}, "jobId"),
        ({"jobId": "has space", "type": "custom"}, "jobId"),
        ({"jobId": "x", "type": "custom", "namespace": "Not_A_Namespace"}, "namespace"),
        ({"jobId": "x", "type": "custom", "priority": "UPPER"}, "priority"),
        ({"jobId": "x", "type": "custom", "priority": 2**31}, "priority"),
        ({"jobId": "x", "type": "custom", "queue": "Not_A_Queue"}, "queue"),
        ({"jobId": "x", "type": "custom", "gpus": 65}, "gpus"),
        ({"jobId": "x", "type": "custom", "resources": {"limits": {"nvidia.com/gpu": 1}}}, "spec.gpus"),
        ({"jobId": "x", "type": "custom", "retries": {"limit": 1, "extra": 1}}, "retries.extra"),
    ],
)
def test_invalid_requests_give_a_reason_naming_the_field(job: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidEntry) as caught:
        parse_entry(entry(job))
    assert caught.value.reason.startswith("invalid request: ")
    assert expected in caught.value.reason


def test_entry_fields_may_be_bytes_as_redis_returns_them() -> None:
    parsed = parse_entry({b"job": json.dumps({"jobId": "b", "type": "custom"}).encode(), b"action": b"SUBMIT"})
    assert parsed.action is Action.SUBMIT and parsed.job_id == "b"


@pytest.mark.parametrize("action", [None, "", "submit", " Submit "])
def test_submit_is_the_default_action(action: str | None) -> None:
    assert parse_entry(entry({"jobId": "s", "type": "custom"}, action)).action is Action.SUBMIT


def test_cancel_needs_only_the_job_id_and_ignores_a_resent_request() -> None:
    parsed = parse_entry(entry({"jobId": "c", "type": "custom", "gpus": 999, "whatever": 1}, "cancel"))
    assert parsed.action is Action.CANCEL
    assert isinstance(parsed.request, CancelRequest) and parsed.job_id == "c"
    with pytest.raises(InvalidEntry, match="jobId"):
        parse_entry(entry({"type": "custom"}, "cancel"))


def test_an_oversized_entry_is_refused_before_parsing() -> None:
    big = json.dumps({"jobId": "big", "type": "custom", "params": {"blob": "x" * MAX_ENTRY_BYTES}})
    with pytest.raises(InvalidEntry, match="over the"):
        parse_entry(entry(big))


def test_params_the_worker_could_not_be_given_are_refused_at_intake() -> None:
    """Over MAX_PARAMS_BYTES as compact JSON (one env string for the worker): dead-lettered with the size, not
    turned into a GpuJob that the operator would fail; just under the limit is fine."""
    overhead = len(json.dumps({"blob": ""}, separators=(",", ":")))
    at_limit = {"jobId": "p", "type": "custom", "params": {"blob": "x" * (MAX_PARAMS_BYTES - overhead)}}
    assert parse_entry(entry(at_limit)).job_id == "p"
    over = {"jobId": "p", "type": "custom", "params": {"blob": "é" * (MAX_PARAMS_BYTES // 2)}}
    with pytest.raises(InvalidEntry, match=f"over the limit of {MAX_PARAMS_BYTES} bytes"):
        parse_entry(entry(over))


def test_unknown_action_is_refused_with_the_expected_values() -> None:
    with pytest.raises(InvalidEntry, match="expected submit or cancel"):
        parse_entry(entry({"jobId": "u", "type": "custom"}, "delete"))


# --- the GpuJob built from a request
def test_gpujob_body_names_labels_and_annotates_from_the_job_id() -> None:
    request = JobRequest.model_validate({"jobId": "lora-7", "type": "train_lora"})
    body = gpujob_body(request, "1700000000000-0")
    assert body["metadata"]["name"] == "lora-7"
    assert body["metadata"]["labels"] == {Label.JOB_ID: "lora-7", Label.TYPE: JobType.TRAIN_LORA.value}
    assert body["metadata"]["annotations"] == {Annotation.REQUEST_ID: "1700000000000-0"}
    assert body["spec"]["jobId"] == "lora-7"


job_ids = st.from_regex(JOB_ID_PATTERN, fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(job_id=job_ids)
def test_any_job_id_gives_a_valid_name_and_label_and_keeps_the_full_id(job_id: str) -> None:
    body = gpujob_body(JobRequest.model_validate({"jobId": job_id, "type": "custom"}), "0-1")
    name, label = body["metadata"]["name"], body["metadata"]["labels"][Label.JOB_ID]
    assert DNS_LABEL.fullmatch(name) and len(name) <= 63
    assert LABEL_VALUE.fullmatch(label) and len(label) <= 63
    assert body["spec"]["jobId"] == job_id
    assert [e.message for e in VALIDATOR.iter_errors(body)] == []  # the CRD accepts what the bridge sends


@settings(max_examples=200, deadline=None)
@given(a=job_ids, b=job_ids)
def test_different_job_ids_never_share_a_gpujob(a: str, b: str) -> None:
    if a != b:
        assert job_name(a) != job_name(b)
        assert label_value(a) != label_value(b)


def test_job_ids_differing_only_in_case_get_different_names() -> None:
    assert job_name("Job-1") != job_name("job-1")


# --- the published JSON Schema (what the Node side validates with)
def test_request_schema_requires_job_id_and_type_and_rejects_unknown_fields() -> None:
    schema = request_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["discriminator"]["propertyName"] == "type"  # one variant per job type
    for variant in schema["$defs"].values():
        if "jobId" in variant.get("properties", {}):
            assert {"jobId", "type"} <= set(variant["required"]) and variant["additionalProperties"] is False
    validator = jsonschema.Draft202012Validator(schema)
    lora = {"baseModel": "tiny-llama", "dataset": {"text": ["hi"]}}
    assert validator.is_valid({"jobId": "j", "type": "train_lora", "gpus": 2, "params": lora})
    assert validator.is_valid({"jobId": "j", "type": "custom", "params": {"x": 1}})  # custom: free-form
    assert not validator.is_valid({"jobId": "j", "type": "train_lora", "gpus": 2, "params": {"x": 1}})
    assert not validator.is_valid({"jobId": "j", "type": "train_lora", "params": lora, "hostNetwork": True})
    assert not validator.is_valid({"type": "train_lora", "params": lora})


def test_schema_command_prints_the_request_and_event_schemas() -> None:
    for which, field in (("request", "jobId"), ("event", "timestamp")):
        out = subprocess.run(
            [sys.executable, "-m", "gpujob.cli", "schema", which], capture_output=True, text=True, check=True
        ).stdout
        assert field in out and "properties" in out
