"""Typed params of the built-in task types: the one definition the worker parses and everyone else checks.

`spec.params` of a `train_lora`, `train_voice` or `render_video` job must validate against its model here
(camelCase, unknown fields rejected): `gpujob submit` and the stream intake refuse a request whose params do
not (a dead letter naming the field), and the operator fails such a GpuJob with reason `InvalidParams` before it
creates a Pod, so a typo never costs a scheduled GPU and an image pull. The worker's tasks use these same
models (gpujob.worker.tasks), so the two cannot drift. Any other type (`custom`, a plug-in's) keeps free-form
params: only its own worker knows them. `gpujob schema request` publishes them per type (a union
discriminated by `type`).
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from gpujob.api.constants import JobType
from gpujob.api.models import WireModel


class Dataset(WireModel):
    text: list[str] | None = Field(None, min_length=1, description="Training texts, inline.")
    s3_key: str | None = Field(None, min_length=1, description='JSON lines {"text": ...} in the bucket.')

    @model_validator(mode="after")
    def _exactly_one(self) -> Dataset:
        if (self.text is None) == (self.s3_key is None):
            raise ValueError("give exactly one of dataset.text or dataset.s3Key")
        return self


class LoraParams(WireModel):
    """train_lora: LoRA fine-tuning of a causal LM from the models volume."""

    base_model: str = Field(min_length=1, description="Model directory, relative to the models volume.")
    dataset: Dataset
    epochs: int = Field(3, ge=1, le=10_000)
    max_steps: int | None = Field(
        None, ge=1, le=100_000_000, description="Stop after this many optimizer steps (default: all epochs)."
    )
    rank: int = Field(8, ge=1, le=1024)
    alpha: int = Field(16, ge=1, le=4096)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    max_length: int = Field(256, ge=8, le=32_768)
    batch_size: int = Field(4, ge=1, le=4096, description="Rows per micro-batch.")
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.03, ge=0, le=0.5, description="Share of the steps with a linear LR warmup.")
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 = off.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, fp16 (with a gradient scaler) on older ones, fp32 on CPU."
    )
    gradient_checkpointing: bool = False
    device_map: Literal["auto", "single"] | None = Field(
        None, description="Several GPUs: auto spreads the model over all; default: auto only when it does not fit one."
    )
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


class VoiceParams(WireModel):
    """train_voice: a small harmonic vocoder fitted to a synthesized voice."""

    epochs: int = Field(20, ge=1, le=10_000)
    steps_per_epoch: int = Field(10, ge=1, le=10_000)
    sample_rate: int = Field(16_000, ge=8_000, le=48_000)
    seconds: float = Field(1.0, gt=0, le=30)
    f0_hz: float = Field(140.0, ge=50, le=1_000)
    harmonics: int = Field(24, ge=1, le=256)
    hidden: int = Field(64, ge=8, le=4096)
    learning_rate: float = Field(3e-3, gt=0, le=1)
    seed: int = 0


class VideoParams(WireModel):
    """render_video: animated frames encoded to H.264 MP4."""

    prompt: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="What to render. The reference renderer derives the clip's path and palette from it "
        "(same prompt, same clip); a real generator takes it as its text prompt.",
    )
    width: int = Field(256, ge=16, le=3840)
    height: int = Field(256, ge=16, le=2160)
    frames: int = Field(48, ge=1, le=10_000)
    fps: int = Field(24, ge=1, le=120)
    max_iter: int = Field(64, ge=4, le=2_000)
    crf: int = Field(23, ge=0, le=51)

    @field_validator("width", "height")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("must be even (yuv420p)")
        return value

    def prompt_seed(self) -> float:
        """A number in [0, 1) from the prompt (0 without one): the same prompt always gives the same clip."""
        if self.prompt is None:
            return 0.0
        return int.from_bytes(hashlib.sha256(self.prompt.encode()).digest()[:4], "big") / 2**32


# The built-in task types and their params. A type not listed here (custom, a plug-in's) has free-form params.
PARAMS_MODELS: dict[JobType, type[WireModel]] = {
    JobType.TRAIN_LORA: LoraParams,
    JobType.TRAIN_VOICE: VoiceParams,
    JobType.RENDER_VIDEO: VideoParams,
}


def params_model(job_type: str) -> type[WireModel] | None:
    """The params model of a built-in type, None for a type with free-form params."""
    try:
        return PARAMS_MODELS.get(JobType(job_type))
    except ValueError:
        return None


def describe_errors(exc: ValidationError, prefix: str = "", limit: int = 5) -> str:
    """One part per problem, each naming its field: `params.epochs: Input should be greater than or equal to 1`."""
    parts = []
    for err in exc.errors()[:limit]:
        where = ".".join([p for p in [prefix] if p] + [str(p) for p in err["loc"]]) or prefix or "(root)"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def params_error(job_type: str, params: Any) -> str | None:
    """Why `params` can never work for a job of `job_type` (None when they can, or the type is free-form):
    `params.epochs: Input should be ...; params.maxStep: Extra inputs are not permitted`."""
    model: type[BaseModel] | None = params_model(job_type)
    if model is None:
        return None
    try:
        model.model_validate(params)
    except ValidationError as exc:
        return describe_errors(exc, "params")
    return None
