"""train_lora: LoRA fine-tuning (peft) of a causal LM from the models volume; the adapter goes to loras/<jobId>/.

Texts are tokenized one by one (no dataset-wide padding), end with EOS, and are right-padded per batch to
the batch's longest row, whatever the tokenizer's `padding_side`; rows with fewer than two tokens teach
nothing (no next token) and are dropped, so no batch is ever all padding. On a GPU the base model loads in
bf16 (fp16 with a gradient scaler where bf16 is missing) straight onto the device. A CUDA out-of-memory
in a step halves the micro-batch and doubles the accumulation (same effective batch, same result) down to
1; the micro-batch in use is kept in checkpoints, so a later attempt does not start over at the size that
failed. Out of memory at micro-batch 1 ends the attempt with the OutOfMemory exit code.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gpujob.api import ARTIFACT_PREFIX, JobType
from gpujob.api.params import Dataset, LoraParams
from gpujob.logging import get_logger
from gpujob.worker.context import TaskContext
from gpujob.worker.devices import GIB, Devices, peak_memory_gib
from gpujob.worker.errors import BadInput, OutOfMemory
from gpujob.worker.paths import model_dir
from gpujob.worker.task import Task

TRAIN_SHARE = 95.0  # percent of the progress bar for training; the rest is saving and uploading
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
PROGRESS_EVERY_SECONDS = 0.2  # the loss is read back from the device (a sync) at most this often
TOKENIZE_CHUNK = 1024  # texts per tokenizer call
FIT_SHARE = 0.8  # a model whose weights need more than this share of one GPU is spread over all GPUs
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

log = get_logger(__name__)


def model_fingerprint(path: Path) -> str:
    """config.json's content and the weight files' names and sizes: a swapped base model is a new run."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weight in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(f"{weight.name}:{weight.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def stored_itemsize(path: Path) -> int:
    """Bytes per weight in the model's files, from config.json (`dtype`, formerly `torch_dtype`)."""
    config = json.loads((path / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES[name].itemsize if name in DTYPES else 4


class TokenRows:
    """Token ids of every kept row in one flat int32 buffer (4 bytes a token, not a Python int each)."""

    def __init__(self) -> None:
        self.ids = array("i")
        self.offsets = array("q", [0])
        self.dropped = 0

    def add(self, row: list[int]) -> None:
        if len(row) < 2:  # no next token to learn: a batch of only such rows would be all padding
            self.dropped += 1
            return
        self.ids.extend(row)
        self.offsets.append(len(self.ids))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, index: int) -> memoryview:
        return memoryview(self.ids)[self.offsets[index] : self.offsets[index + 1]]

    def length(self, index: int) -> int:
        return self.offsets[index + 1] - self.offsets[index]


def tokenize(tokenizer: Any, texts: Iterator[str], max_length: int) -> TokenRows:
    """Each text on its own, truncated, with EOS appended (room kept for it), never padded."""
    eos = tokenizer.eos_token_id
    room = max_length - 1 if eos is not None else max_length
    rows = TokenRows()
    chunk: list[str] = []

    def flush() -> None:
        for ids in tokenizer(chunk, truncation=True, max_length=room, padding=False)["input_ids"]:
            rows.add([*ids, eos] if eos is not None and (not ids or ids[-1] != eos) else list(ids))
        chunk.clear()

    for text in texts:
        chunk.append(text)
        if len(chunk) >= TOKENIZE_CHUNK:
            flush()
    if chunk:
        flush()
    return rows


def collate(rows: TokenRows, indices: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels) of the rows, as wide as the longest of them."""
    width = max(rows.length(i) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for n, i in enumerate(indices):
        row = torch.frombuffer(rows.row(i), dtype=torch.int32) if rows.length(i) else torch.empty(0)
        ids[n, : len(row)] = row
        mask[n, : len(row)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def lr_factor(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Linear warmup over the first `warmup_ratio` of the steps, then cosine/linear decay to 0 (or flat)."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def resolve_dtype(choice: str, devices: Devices) -> torch.dtype:
    if choice == "auto":
        if devices.device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if devices.bf16 else torch.float16
    if choice == "float16" and devices.device.type != "cuda":
        raise BadInput("dtype float16 needs a CUDA GPU (use bfloat16 or float32 on CPU)")
    if choice == "bfloat16" and devices.device.type == "cuda" and not devices.bf16:
        raise BadInput(f"dtype bfloat16 is not supported by {devices.names[0]} (use float16 or auto)")
    return DTYPES[choice]


def _load_error(what: str, exc: Exception) -> BadInput:
    text = " ".join(str(exc).split())
    return BadInput(f"{what}: {type(exc).__name__}: {text[:600]}")


def _is_bad_input(exc: Exception) -> bool:
    # transformers/peft say "this input can't work" with ValueError/KeyError/TypeError (unknown architecture,
    # remote code needed, target modules not found) and with OSError without errno (a file missing from the
    # model directory). An OSError with errno is the volume's trouble: retried.
    return isinstance(exc, ValueError | KeyError | TypeError) or (isinstance(exc, OSError) and exc.errno is None)


class LoraTrainer:
    """The training loop's state and one optimizer step of it; also driven bare by the benchmarks."""

    def __init__(self, model_path: Path, params: LoraParams, texts: Iterator[str], devices: Devices) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.params = params
        self.devices = devices
        self.dtype = resolve_dtype(params.dtype, devices)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        except Exception as exc:
            if _is_bad_input(exc):
                raise _load_error(f"baseModel {params.base_model!r}: tokenizer", exc) from exc
            raise
        self.rows = tokenize(tokenizer, texts, params.max_length)
        if not len(self.rows):
            raise BadInput("the dataset has no text of at least two tokens")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.device_map = self._device_map(model_path)
        try:
            # Straight onto the device in the compute dtype: no full fp32 copy in host memory first.
            base = AutoModelForCausalLM.from_pretrained(
                model_path, local_files_only=True, dtype=self.dtype, device_map=self.device_map
            )
        except Exception as exc:
            if _is_bad_input(exc):
                raise _load_error(f"baseModel {params.base_model!r}", exc) from exc
            raise
        if params.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[no-untyped-call]
            base.config.use_cache = False
        config = LoraConfig(
            r=params.rank,
            lora_alpha=params.alpha,
            lora_dropout=0.0,  # no randomness in a step: a resumed run retraces the same path
            target_modules=params.target_modules,
            task_type="CAUSAL_LM",
        )
        try:
            # Adapters are kept in fp32 (peft's autocast_adapter_dtype) over a bf16/fp16 base.
            self.model: Any = get_peft_model(base, config)
        except Exception as exc:
            if _is_bad_input(exc):
                raise _load_error("LoRA config (targetModules?)", exc) from exc
            raise
        if self.device_map is None:
            self.model.to(devices.device)
        self.model.train()
        self.input_device = self.model.get_input_embeddings().weight.device
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=params.learning_rate)
        use_scaler = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(devices.device.type, enabled=use_scaler)
        self.autocast = self.dtype != torch.float32
        self.micro = params.batch_size
        self.ooms = 0
        self.rows_per_step = params.batch_size * params.gradient_accumulation
        self.steps_per_epoch = math.ceil(len(self.rows) / self.rows_per_step)
        self.total = self.steps_per_epoch * params.epochs
        if params.max_steps is not None:
            self.total = min(self.total, params.max_steps)
        self._perm: tuple[int, list[int]] | None = None
        log.info(
            "lora trainer ready",
            rows=len(self.rows),
            dropped_rows=self.rows.dropped,
            dtype=str(self.dtype).removeprefix("torch."),
            device_map=self.device_map if isinstance(self.device_map, str) else str(self.input_device),
            trainable=sum(p.numel() for p in self.trainable),
            steps=self.total,
        )

    def _device_map(self, model_path: Path) -> str | dict[str, Any] | None:
        d = self.devices
        if d.device.type != "cuda":
            return None
        need = weights_bytes(model_path) * self.dtype.itemsize / stored_itemsize(model_path)
        fits = need < FIT_SHARE * d.memory_gib[0] * GIB
        if d.count > 1 and (self.params.device_map == "auto" or (self.params.device_map is None and not fits)):
            log.info("model spread over all GPUs (device_map=auto)", gpus=d.count, weights_gib=round(need / GIB, 2))
            return "auto"
        if d.count > 1:
            log.warning(
                "training on 1 GPU of those visible (no data parallelism; deviceMap=auto spreads the model)",
                gpus=d.count,
            )
        return {"": str(d.device)}

    def order(self, epoch: int) -> list[int]:
        """One seeded permutation per epoch (a resumed run sees the same batches), computed once."""
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.params.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.rows), generator=gen).tolist())
        return self._perm[1]

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step (`step` = steps done before it); the loss stays on the device (no sync)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        rows = self.order(epoch)[index * self.rows_per_step : (index + 1) * self.rows_per_step]
        factor = lr_factor(step, self.total, self.params.warmup_ratio, self.params.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = self.params.learning_rate * factor
        while True:
            try:
                loss = self._accumulate(rows)
                break
            except torch.OutOfMemoryError as exc:
                error = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
            # Out of the except block: the traceback's frames (and the tensors they hold) are gone now.
            self.optimizer.zero_grad(set_to_none=True)
            peak = peak_memory_gib()
            if self.micro == 1:
                raise OutOfMemory(
                    f"CUDA out of memory at micro-batch 1, maxLength {self.params.max_length} "
                    f"(peak {peak:.2f} GiB allocated): {error}"
                )
            self.micro = max(1, self.micro // 2)
            self.ooms += 1
            torch.cuda.empty_cache()
            log.warning("CUDA out of memory: micro-batch halved", micro_batch=self.micro, peak_gib=round(peak, 2))
        if self.params.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.params.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _accumulate(self, rows: list[int]) -> torch.Tensor:
        # Each micro-batch's mean loss weighted by its share of the step's predicted tokens: the step's loss
        # is the mean over all its tokens, whatever the micro-batch size.
        chunks = [rows[i : i + self.micro] for i in range(0, len(rows), self.micro)]
        tokens = [sum(self.rows.length(r) - 1 for r in chunk) for chunk in chunks]
        total_tokens = sum(tokens)
        loss_sum = torch.zeros((), device=self.input_device)
        for chunk, count in zip(chunks, tokens, strict=True):
            ids, mask, labels = collate(self.rows, chunk, self.pad_id)
            with torch.autocast(self.input_device.type, dtype=self.dtype, enabled=self.autocast):
                out = self.model(
                    input_ids=ids.to(self.input_device, non_blocking=True),
                    attention_mask=mask.to(self.input_device, non_blocking=True),
                    labels=labels.to(self.input_device, non_blocking=True),
                )
            loss = out.loss.float() * (count / total_tokens)
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach().to(loss_sum.device)
        return loss_sum

    def state(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        state = {
            "adapter": get_peft_model_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "microBatch": self.micro,
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves the moments onto the params' device
        self.micro = min(self.micro, int(state.get("microBatch", self.micro)))
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)


def read_jsonl(path: Path, name: str) -> Iterator[str]:
    """The texts of a JSONL file, line by line: lines end only at '\\n' (U+2028/U+0085 inside strings are
    text, as JSON allows), bytes are decoded strictly (never training on replacement characters)."""
    count = 0
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInput(f"dataset {name} line {number}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"dataset {name} line {number}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise BadInput(f'dataset {name} line {number}: expected {{"text": "..."}}')
            count += 1
            yield record["text"]
    if not count:
        raise BadInput(f"dataset {name} holds no texts")


def load_texts(ctx: TaskContext, dataset: Dataset) -> Iterator[str]:
    if dataset.text is not None:
        return iter(dataset.text)
    assert dataset.s3_key is not None
    return read_jsonl(ctx.download(dataset.s3_key, "dataset.jsonl"), dataset.s3_key)


class TrainLora(Task[LoraParams]):
    name = JobType.TRAIN_LORA.value
    prefix = ARTIFACT_PREFIX[JobType.TRAIN_LORA]
    params_model = LoraParams

    def identity(self, models_dir: Path, params: LoraParams) -> str:
        return model_fingerprint(model_dir(models_dir, params.base_model))

    def run(self, ctx: TaskContext, params: LoraParams) -> dict[str, float]:
        texts = load_texts(ctx, params.dataset)
        torch.manual_seed(params.seed)
        trainer = LoraTrainer(ctx.model_path(params.base_model), params, texts, ctx.devices)
        total, step = trainer.total, 0
        if (state := ctx.load_checkpoint()) is not None:
            trainer.load_state(state)
            step = int(state["step"])
        first, loss, started = step, math.nan, time.perf_counter()
        reported = 0.0
        while step < total:
            value = trainer.step(step)
            step += 1
            now = time.monotonic()
            if now - reported >= PROGRESS_EVERY_SECONDS or step == total:
                reported, loss = now, float(value)  # the one device sync, a few times a second
                epoch = (step - 1) // trainer.steps_per_epoch + 1
                ctx.report_progress(TRAIN_SHARE * step / total, f"Epoch {epoch}/{params.epochs} — loss={loss:.4f}")
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
            "rows": float(len(trainer.rows)),
            "droppedRows": float(trainer.rows.dropped),
            "microBatch": float(trainer.micro),
            "outOfMemoryRetries": float(trainer.ooms),
            "trainSeconds": seconds,
            "stepsPerSecond": (total - first) / seconds if seconds > 0 else 0.0,
        }
