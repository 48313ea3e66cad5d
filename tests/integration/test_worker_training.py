"""train_lora's data path and loop, in-process with real transformers/peft on a tiny Llama (CPU), and its
input errors through `gpujob worker` as a subprocess: padding, EOS, JSONL parsing, accumulation, bad input."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from minio import Minio

from gpujob.api import ExitCode
from gpujob.worker.devices import Devices
from gpujob.worker.errors import BadInput
from gpujob.worker.tasks.lora import LoraParams, LoraTrainer, collate, lr_factor, read_jsonl
from gpujob.worker.tiny_model import write_tiny_model
from tests.integration.test_worker import models_dir, worker  # noqa: F401  (fixtures)

CPU = Devices(torch.device("cpu"))
TEXTS = ["hi", "the quick brown fox jumps over the lazy dog", "", "low rank adapters", "a", "hello world from gpujob"]


@pytest.fixture(scope="module")
def left_padded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a tokenizer that pads on the left, as Llama/Gemma tokenizers do in transformers 5."""
    path = write_tiny_model(tmp_path_factory.mktemp("models") / "left")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    return path


def trainer_for(path: Path, texts: list[str], **params: Any) -> LoraTrainer:
    torch.manual_seed(0)
    raw = {"baseModel": path.name, "dataset": {"text": texts}, "rank": 4, "maxLength": 32, **params}
    return LoraTrainer(path, LoraParams.model_validate(raw), iter(texts), CPU)


def test_left_padding_tokenizer_trains_on_text_never_on_padding(left_padded_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(left_padded_model, local_files_only=True)
    assert tokenizer.padding_side == "left"  # the case that broke: pad-all-then-slice kept only padding
    trainer = trainer_for(left_padded_model, TEXTS, batchSize=2, epochs=3)
    eos = tokenizer.eos_token_id
    assert trainer.rows.dropped == 1  # "": EOS alone predicts nothing; "a" + EOS is kept
    for index in range(len(trainer.rows)):
        assert trainer.rows.row(index)[-1] == eos  # every row ends with EOS
    for step in range(trainer.steps_per_epoch):
        epoch, batch = divmod(step, trainer.steps_per_epoch)
        rows = trainer.order(epoch)[batch * 2 : (batch + 1) * 2]
        ids, mask, labels = collate(trainer.rows, rows, trainer.pad_id)
        assert bool(mask[:, 0].all())  # right padding: every row starts with real tokens
        assert all(mask[i, : int(mask[i].sum())].all() for i in range(len(rows)))
        assert all(ids[i, int(mask[i].sum()) - 1] == eos for i in range(len(rows)))  # EOS, then padding
        assert int((labels[:, 1:] != -100).sum()) > 0  # something to learn after the shift
    losses = [float(trainer.step(step)) for step in range(trainer.total)]
    assert all(math.isfinite(loss) and loss > 0 for loss in losses), losses


def test_a_dataset_with_nothing_to_learn_is_bad_input(left_padded_model: Path) -> None:
    with pytest.raises(BadInput, match="no text of at least two tokens"):
        trainer_for(left_padded_model, ["", ""])


def test_accumulation_and_smaller_micro_batches_give_the_same_step(left_padded_model: Path) -> None:
    """What an out-of-memory retry relies on: halving the micro-batch changes nothing but memory."""
    whole = trainer_for(left_padded_model, TEXTS, batchSize=4, warmupRatio=0)
    halved = trainer_for(left_padded_model, TEXTS, batchSize=4, warmupRatio=0)
    halved.micro = 1
    accumulated = trainer_for(left_padded_model, TEXTS, batchSize=2, gradientAccumulation=2, warmupRatio=0)
    losses = [float(t.step(0)) for t in (whole, halved, accumulated)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4) and losses[2] == pytest.approx(losses[0], rel=1e-4)
    adapters = [{k: v for k, v in t.state()["adapter"].items()} for t in (whole, halved, accumulated)]
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(adapters[2][key], value, rtol=1e-4, atol=1e-6)


def test_one_permutation_per_epoch_and_the_lr_schedule(left_padded_model: Path) -> None:
    trainer = trainer_for(left_padded_model, TEXTS * 4, batchSize=2, epochs=2)
    first = trainer.order(0)
    assert trainer.order(0) is first  # computed once per epoch, not per step
    assert sorted(first) == list(range(len(trainer.rows))) and trainer.order(1) != first
    factors = [lr_factor(s, 100, 0.1, "cosine") for s in range(100)]
    assert factors[:10] == sorted(factors[:10]) and max(factors) == 1.0
    assert factors[10:] == sorted(factors[10:], reverse=True) and factors[-1] < 0.01
    assert lr_factor(50, 100, 0.0, "constant") == 1.0


def test_jsonl_splits_only_on_newlines_and_decodes_strictly(tmp_path: Path) -> None:
    texts = ["line one\u2028still one", "next\x85line", "tab\tand\r carriage", "emoji 🙂"]
    path = tmp_path / "d.jsonl"
    path.write_bytes("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts).encode() + b"\n\n")
    assert "one\u2028still".splitlines() != ["one\u2028still"]  # what the old parser did to such lines
    assert list(read_jsonl(path, "d.jsonl")) == texts
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(BadInput, match=r"d.jsonl line 2: not UTF-8"):
        list(read_jsonl(path, "d.jsonl"))


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("odd-models")
    write_tiny_model(root / "tiny")
    (root / "unknown-arch").mkdir()
    (root / "unknown-arch" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    remote = write_tiny_model(root / "remote-code")
    config = json.loads((remote / "config.json").read_text())
    config |= {"model_type": "gpujob-custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "configuration_custom.py").write_text("raise SystemExit('remote code must never run')\n")
    return root


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"baseModel": "tiny", "targetModules": ["no_such_proj"]}, "targetModules"),
        ({"baseModel": "unknown-arch"}, "baseModel 'unknown-arch'"),
        ({"baseModel": "remote-code"}, "baseModel 'remote-code'"),
        ({"baseModel": "tiny", "dtype": "float16"}, "dtype float16 needs a CUDA GPU"),
    ],
)
def test_inputs_that_can_never_load_exit_64(
    worker: Any,  # noqa: F811
    odd_models: Path,
    params: dict[str, Any],
    message: str,
) -> None:
    done = worker("train_lora", {"dataset": {"text": TEXTS}, **params}, GPUJOB_MODELS_DIR=str(odd_models)).wait()
    assert done.code == ExitCode.BAD_INPUT, done.log
    assert message in done.result["error"], done.result["error"]
    assert "remote code must never run" not in done.log


def test_jsonl_dataset_with_line_separators_trains_and_bad_utf8_is_64(
    worker: Any,  # noqa: F811
    s3_client: Minio,
    s3_bucket: str,
) -> None:
    s3_client.make_bucket(s3_bucket)
    texts = ["one\u2028two three", "four\x85five six", "seven eight nine"] * 3
    good = "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts).encode()
    s3_client.put_object(s3_bucket, "datasets/good.jsonl", io.BytesIO(good), len(good))
    bad = b'{"text": "fine"}\n{"text": "caf\xe9"}\n'
    s3_client.put_object(s3_bucket, "datasets/bad.jsonl", io.BytesIO(bad), len(bad))
    params = {"baseModel": "tiny", "epochs": 1, "batchSize": 3}
    done = worker("train_lora", {**params, "dataset": {"s3Key": "datasets/good.jsonl"}}, "jsonl-ok").wait()
    assert done.code == ExitCode.OK, done.log
    assert done.result["metrics"]["rows"] == 9 and done.result["metrics"]["steps"] == 3
    failed = worker("train_lora", {**params, "dataset": {"s3Key": "datasets/bad.jsonl"}}, "jsonl-bad").wait()
    assert failed.code == ExitCode.BAD_INPUT, failed.log
    assert "datasets/bad.jsonl line 2: not UTF-8" in failed.result["error"]
