"""train_lora: LoRA fine-tuning (peft) of a causal LM from the models volume; the adapter goes to loras/<jobId>/."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from gpujob.api import ARTIFACT_PREFIX, JobType
from gpujob.api.models import WireModel
from gpujob.worker.context import TaskContext
from gpujob.worker.errors import BadInput
from gpujob.worker.task import Task

TRAIN_SHARE = 95.0  # percent of the progress bar for training; the rest is saving and uploading
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class Dataset(WireModel):
    text: list[str] | None = Field(None, min_length=1, description="Training texts, inline.")
    s3_key: str | None = Field(None, min_length=1, description='JSON lines {"text": ...} in the bucket.')

    @model_validator(mode="after")
    def _exactly_one(self) -> Dataset:
        if (self.text is None) == (self.s3_key is None):
            raise ValueError("give exactly one of dataset.text or dataset.s3Key")
        return self


class LoraParams(WireModel):
    base_model: str = Field(min_length=1, description="Model directory, relative to the models volume.")
    dataset: Dataset
    epochs: int = Field(3, ge=1, le=10_000)
    rank: int = Field(8, ge=1, le=1024)
    alpha: int = Field(16, ge=1, le=4096)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    max_length: int = Field(256, ge=8, le=32_768)
    batch_size: int = Field(4, ge=1, le=4096)
    target_modules: list[str] | None = Field(None, description="Default: peft's choice for the architecture.")
    seed: int = 0

    @field_validator("base_model")
    @classmethod
    def _inside_models_dir(cls, value: str) -> str:
        # Syntax here (a clear message before anything loads); the resolved path is checked again at run time.
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts:
            raise ValueError("must be a relative path inside the models directory, without '..'")
        return value


class LoraTrainer:
    """The training loop's state and one step of it; also driven bare by hack/bench_worker.py."""

    def __init__(self, model_path: Path, params: LoraParams, texts: list[str], device: torch.device) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.params = params
        self.device = device
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
        config = LoraConfig(
            r=params.rank,
            lora_alpha=params.alpha,
            lora_dropout=0.0,  # no randomness in a step: a resumed run retraces the same path
            target_modules=params.target_modules,
            task_type="CAUSAL_LM",
        )
        self.model: Any = get_peft_model(base, config).to(device)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate)
        enc = tokenizer(texts, truncation=True, max_length=params.max_length, padding=True, return_tensors="pt")
        self.input_ids: torch.Tensor = enc["input_ids"]
        self.attention_mask: torch.Tensor = enc["attention_mask"]
        self.batches_per_epoch = math.ceil(len(texts) / params.batch_size)

    def _order(self, epoch: int) -> torch.Tensor:
        # Seeded per epoch, so a run resumed mid-epoch sees the same batches it would have seen.
        gen = torch.Generator().manual_seed(self.params.seed * 100_003 + epoch)
        return torch.randperm(len(self.input_ids), generator=gen)

    def step(self, epoch: int, index: int) -> float:
        size = self.params.batch_size
        rows = self._order(epoch)[index * size : (index + 1) * size]
        mask = self.attention_mask[rows]
        width = int(mask.sum(dim=1).max())
        ids, mask = self.input_ids[rows, :width], mask[:, :width]
        labels = ids.masked_fill(mask == 0, -100)
        out = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), labels=labels.to(self.device)
        )
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach().cpu())

    def state(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        return {"adapter": get_peft_model_state_dict(self.model), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)


def load_texts(ctx: TaskContext, dataset: Dataset) -> list[str]:
    if dataset.text is not None:
        return dataset.text
    assert dataset.s3_key is not None
    texts: list[str] = []
    raw = ctx.read_object(dataset.s3_key).decode("utf-8", errors="replace")
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"dataset {dataset.s3_key} line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BadInput(f'dataset {dataset.s3_key} line {number}: expected {{"text": "..."}}')
        texts.append(record["text"])
    if not texts:
        raise BadInput(f"dataset {dataset.s3_key} holds no texts")
    return texts


class TrainLora(Task[LoraParams]):
    name = JobType.TRAIN_LORA.value
    prefix = ARTIFACT_PREFIX[JobType.TRAIN_LORA]
    params_model = LoraParams

    def run(self, ctx: TaskContext, params: LoraParams) -> dict[str, float]:
        texts = load_texts(ctx, params.dataset)
        torch.manual_seed(params.seed)
        trainer = LoraTrainer(ctx.model_path(params.base_model), params, texts, ctx.device)
        total = trainer.batches_per_epoch * params.epochs
        step = 0
        if (state := ctx.load_checkpoint()) is not None:
            trainer.load_state(state)
            step = int(state["step"])
        first, loss, started = step, math.nan, time.perf_counter()
        while step < total:
            epoch, index = divmod(step, trainer.batches_per_epoch)
            loss = trainer.step(epoch, index)
            step += 1
            ctx.report_progress(TRAIN_SHARE * step / total, f"Epoch {epoch + 1}/{params.epochs} — loss={loss:.4f}")
            ctx.step_boundary(step, trainer.state)
        seconds = time.perf_counter() - started
        out = ctx.workdir / "adapter"
        trainer.save(out)
        ctx.report_progress(TRAIN_SHARE, "uploading adapter")
        for name in ADAPTER_FILES:
            ctx.upload(out / name, name, "application/json" if name.endswith(".json") else "application/octet-stream")
        return {
            "finalLoss": loss,
            "steps": float(total),
            "epochs": float(params.epochs),
            "trainSeconds": seconds,
            "stepsPerSecond": (total - first) / seconds if seconds > 0 else 0.0,
        }
