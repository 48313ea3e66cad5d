"""Issue 13 item 3: params are checked before any GPU is reserved. One typed model per built-in task type
(gpujob.api.params), used by the worker, published by `gpujob schema request`, checked by `gpujob submit`, the
stream intake (a dead letter naming the field) and the operator (Failed, InvalidParams, no Pod)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import yaml

from gpujob.api.constants import JobType, Phase, Reason
from gpujob.api.params import PARAMS_MODELS, LoraParams, VideoParams, VoiceParams, params_error
from gpujob.api.request import InvalidEntry, parse_entry
from gpujob.operator.status import decide
from gpujob.worker.task import load_task

REPO = Path(__file__).resolve().parents[2]
LORA = {"baseModel": "tiny-llama", "dataset": {"text": ["hello"]}}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_worker_parses_with_the_shared_models() -> None:
    for job_type, model in PARAMS_MODELS.items():
        assert load_task(job_type.value).params_model is model


@pytest.mark.parametrize(
    ("job_type", "params", "field"),
    [
        ("train_lora", {**LORA, "maxStep": 3}, "params.maxStep: Extra inputs are not permitted"),
        ("train_lora", {"dataset": {"text": ["x"]}}, "params.baseModel: Field required"),
        ("train_lora", {**LORA, "epochs": 0}, "params.epochs: Input should be greater than or equal to 1"),
        ("train_voice", {"sampleRate": 100}, "params.sampleRate"),
        ("render_video", {"width": 101}, "params.width: Value error, must be even"),
        ("render_video", {"promt": "typo"}, "params.promt: Extra inputs are not permitted"),
    ],
)
def test_bad_params_are_named_by_field(job_type: str, params: dict[str, Any], field: str) -> None:
    assert field in (params_error(job_type, params) or "")
    with pytest.raises(InvalidEntry) as info:
        parse_entry({"job": json.dumps({"jobId": "p1", "type": job_type, "params": params})})
    assert info.value.reason.startswith("invalid request: ") and field in info.value.reason


def test_what_the_examples_and_readme_use_is_accepted_and_custom_is_free_form() -> None:
    assert params_error("train_lora", {**LORA, "maxSteps": 10, "learningRate": 5e-4}) is None
    assert params_error("render_video", {"prompt": "a paper boat", "frames": 8}) is None
    assert params_error("train_voice", {}) is None and params_error("render_video", {}) is None
    assert params_error("custom", {"anything": {"goes": [1, 2]}}) is None
    assert params_error("a-plugin-type", {"x": 1}) is None


def test_parse_entry_stays_total_on_odd_params() -> None:
    for params in ([], "x", None, 3, {"dataset": [1]}, {"baseModel": {"a": "b"}, "dataset": {"text": [None]}}):
        with pytest.raises(InvalidEntry):
            parse_entry({"job": json.dumps({"jobId": "p2", "type": "train_lora", "params": params})})


def test_the_operator_fails_invalid_params_before_any_pod() -> None:
    body = {
        "metadata": {"name": "j", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": {"type": "train_lora", "params": {**LORA, "maxStep": 10}},
        "status": {},
    }
    d = decide(body, [], T0)
    assert d.create_attempt is None
    assert d.status.phase is Phase.FAILED and d.status.reason == Reason.INVALID_PARAMS
    assert "params.maxStep" in (d.status.message or "") and d.status.attempts == 0
    body["spec"] = {"type": "custom", "params": {"maxStep": 10}}
    assert decide({**body, "status": {}}, [], T0).create_attempt == 1


def test_schema_command_publishes_typed_params_per_type() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gpujob.cli", "schema", "request"], capture_output=True, text=True, check=True
    ).stdout
    schema = json.loads(out)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"jobId": "a", "type": "train_lora", "params": {**LORA, "maxSteps": 5}})
    assert not validator.is_valid({"jobId": "a", "type": "train_lora", "params": {**LORA, "maxStep": 5}})
    assert not validator.is_valid({"jobId": "a", "type": "render_video", "params": {"promt": "x"}})
    assert validator.is_valid({"jobId": "a", "type": "render_video", "params": {"prompt": "x"}})
    assert validator.is_valid({"jobId": "a", "type": "custom", "params": {"promt": "x"}})
    assert set(schema["discriminator"]["mapping"]) == {t.value for t in JobType}


def test_submit_refuses_bad_params_before_redis() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpujob.cli", "submit", "--type", "render_video", "-p", "promt=a cat"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "GPUJOB_REDIS_URL": "redis://127.0.0.1:1/0"},
        check=False,
    )
    assert result.returncode == 2 and "params.promt" in result.stderr, result


def test_every_example_has_valid_params() -> None:
    for path in sorted((REPO / "examples").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())["spec"]
        assert params_error(spec["type"], spec.get("params") or {}) is None, path.name


def test_max_steps_caps_the_training(tmp_path: Path) -> None:
    from gpujob.worker.devices import Devices
    from gpujob.worker.tasks.lora import LoraTrainer
    from gpujob.worker.tiny_model import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny")
    texts = [f"text number {i} for the tiny model" for i in range(40)]
    raw = {**LORA, "dataset": {"text": texts}, "epochs": 3, "batchSize": 2}
    full = LoraTrainer(model, LoraParams.model_validate(raw), iter(texts), Devices(torch.device("cpu")))
    capped = LoraTrainer(
        model, LoraParams.model_validate({**raw, "maxSteps": 7}), iter(texts), Devices(torch.device("cpu"))
    )
    assert full.total == 60 and capped.total == 7


def test_the_prompt_changes_the_rendered_clip() -> None:
    from gpujob.worker.tasks.video import render_frame

    cpu = torch.device("cpu")
    base = {"width": 32, "height": 32, "frames": 4, "maxIter": 8}
    plain = render_frame(VideoParams.model_validate(base), 0, cpu)
    boat = render_frame(VideoParams.model_validate({**base, "prompt": "a paper boat"}), 0, cpu)
    again = render_frame(VideoParams.model_validate({**base, "prompt": "a paper boat"}), 0, cpu)
    cat = render_frame(VideoParams.model_validate({**base, "prompt": "a cat"}), 0, cpu)
    assert torch.equal(boat, again) and not torch.equal(boat, cat) and not torch.equal(plain, boat)
    assert VoiceParams.model_validate({}).epochs == 20
