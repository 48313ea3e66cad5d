"""train_lora steps/s on the GPU against the CPU, for a randomly initialised ~0.5B Llama-shaped model built
here (no download): the plan asks for GPU tasks 5–10x faster than CPU.

Both sides run train_lora's own LoraTrainer (the loop `gpujob worker` runs, minus progress and checkpoints)
with the same params: batch 8 x up to 256 tokens, LoRA rank 16 on the default target modules, dtype "auto"
(bf16 on the GPU, fp32 on the CPU). Each step is timed to its end (the loss is read back); the first steps
are warm-up. The CPU side stops after --cpu-seconds, so a slow CPU bounds the run, not the step count.

Without CUDA it runs a toy model on CPU only and says "no CUDA": for debugging this script.

Usage: python hack/bench_gpu.py [--gpu-steps 30] [--cpu-seconds 60]   (PYTHONPATH must reach gpujob)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

import torch  # noqa: E402

from gpujob.worker.tiny_model import write_tiny_model  # noqa: E402

# ~0.5B parameters: 24 layers of hidden 1280 (20 heads, 4 KV heads, MLP 3456) and a 32k vocabulary, untied.
SHAPE = {"hidden": 1280, "layers": 24, "heads": 20, "kv_heads": 4, "intermediate": 3456, "vocab": 32000}
TOY = {"hidden": 128, "layers": 2, "heads": 4}
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "low",
    "rank",
    "adapters",
    "learn",
    "from",
    "gpu",
    "jobs",
]


def texts(n: int, words: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(len(WORDS), (n, words), generator=gen).tolist()
    return [" ".join(WORDS[i] for i in row) for row in picks]


def measure(model: Path, device: torch.device, warmup: int, steps: int, seconds: float) -> tuple[list[float], str]:
    """Per-step seconds after `warmup` steps: `steps` of them or as many as fit in `seconds`."""
    from gpujob.worker.devices import Devices, select
    from gpujob.worker.tasks.lora import LoraParams, LoraTrainer

    devices = select(None) if device.type == "cuda" else Devices(torch.device("cpu"))
    data = texts(256, 120)
    raw = {"baseModel": model.name, "dataset": {"text": data}, "batchSize": 8, "maxLength": 256, "rank": 16}
    torch.manual_seed(0)
    trainer = LoraTrainer(model, LoraParams.model_validate(raw), iter(data), devices)
    times: list[float] = []
    deadline = None
    for step in range(warmup + steps):
        if step == warmup:
            deadline = time.monotonic() + seconds
        started = time.perf_counter()
        float(trainer.step(step))
        if step >= warmup:
            times.append(time.perf_counter() - started)
            if deadline is not None and time.monotonic() > deadline and len(times) >= 2:
                break
    dtype = str(trainer.dtype).removeprefix("torch.")
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times, dtype


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--cpu-steps", type=int, default=20)
    parser.add_argument("--cpu-seconds", type=float, default=60.0)
    parser.add_argument("--toy", action="store_true", help="a toy model (the default without CUDA)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, not ours
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from gpujob.logging import configure

    configure("console", "WARNING")
    cuda = torch.cuda.is_available()
    toy = args.toy or not cuda
    shape = TOY if toy else SHAPE
    if cuda:
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name} ({props.total_memory / 1024**3:.0f} GiB), torch {torch.__version__}"
    else:
        where = f"no CUDA (torch {torch.__version__}): toy model on CPU only, for debugging this script"
    print(f"bench_gpu: {where}; CPU threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpujob-bench-gpu-") as tmpdir:
        started = time.monotonic()
        model = write_tiny_model(Path(tmpdir) / "llama", dtype=torch.bfloat16, max_positions=2048, **shape)  # type: ignore[arg-type]
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, local_files_only=True)
        h, n, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
        kv = config.num_key_value_heads * (h // config.num_attention_heads)
        params = n * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) + 2 * vocab * h + h
        print(
            f"  model: {params / 1e9:.2f}B params ({n} layers, hidden {h}), built in {time.monotonic() - started:.0f}s"
        )
        rows: list[tuple[str, str, list[float]]] = []
        if cuda:
            gpu, dtype = measure(model, torch.device("cuda"), 3, args.gpu_steps, 60.0)
            rows.append((f"GPU {props.name}", dtype, gpu))
            print(f"  GPU: {len(gpu)} steps, median {statistics.median(gpu) * 1000:.1f} ms", flush=True)
        cpu, dtype = measure(model, torch.device("cpu"), 1, args.cpu_steps, args.cpu_seconds)
        rows.append((f"CPU x{torch.get_num_threads()} threads", dtype, cpu))
        print(f"  CPU: {len(cpu)} steps, median {statistics.median(cpu) * 1000:.1f} ms", flush=True)
    size = "toy" if toy else "~0.5B"
    title = f"train_lora steps/s, {size} Llama ({params / 1e9:.2f}B), batch 8 x 256 tokens, LoRA r16"
    print(f"\n{title}\n{where}")
    print(f"{'device':34} {'dtype':9} {'steps':>5} {'median':>9} {'min':>9} {'max':>9}  (steps/s)")
    for name, dtype, times in rows:
        rates = [1 / t for t in times]
        print(
            f"{name:34} {dtype:9} {len(times):5d} {statistics.median(rates):9.3f} {min(rates):9.3f} {max(rates):9.3f}"
        )
    if cuda:
        ratio = statistics.median(rows[1][2]) / statistics.median(rows[0][2])
        verdict = "meets" if ratio >= 5 else "BELOW"
        print(f"GPU/CPU ratio of medians: {ratio:.1f}x ({verdict} the plan's 5-10x)")
    else:
        print("GPU/CPU ratio: n/a (no CUDA)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
