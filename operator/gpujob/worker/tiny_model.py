"""A tiny randomly initialised Llama + tokenizer, written like any model on the models volume.

For tests, benchmarks and `make demo`: it loads offline with AutoModelForCausalLM/AutoTokenizer exactly as a
real base model would, and trains at ~100+ LoRA steps/s on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a gpu job trains a tiny model and reports its progress",
    "low rank adapters make fine tuning cheap",
    "hello world from the gpujob worker",
]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def write_tiny_model(
    directory: Path | str,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    *,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int | None = None,
    max_positions: int = 512,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write config, safetensors weights and a byte-level BPE tokenizer to `directory`; return it.

    The defaults make a toy; the keywords make any Llama shape (hack/bench_gpu.py builds a ~0.5B one). A
    `vocab` larger than the tokenizer's gives the LM head a realistic size (the extra ids are never seen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # Byte-level: any text encodes, so datasets are never rejected for unknown characters.
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    config = LlamaConfig(
        vocab_size=max(vocab or 0, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.to(dtype)  # type: ignore[arg-type]  # transformers' `to` wrapper is typed for one signature
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m gpujob.worker.tiny_model DIR`: used by `make demo` to fill its local models dir."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gpujob.worker.tiny_model DIR", file=sys.stderr)
        return 2
    print(write_tiny_model(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
