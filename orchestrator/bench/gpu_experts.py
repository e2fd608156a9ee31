"""Experts for the GPU check that need no download: Llama-shaped models with random weights, and a tokenizer.

A real-size expert is built from a Llama-3-8B-shaped config, its weights drawn
on the device, and saved as local safetensors with a synthetic word-level
tokenizer, so that it is loaded the way every expert is: through the
transformers backend, from a folder. Random weights cost the same to store,
move and multiply as trained ones; only the text is meaningless.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
"""The dry run's shape: the same code path at a size a CPU runs in a second."""


def word_tokenizer(vocab_size: int) -> object:
    """A whitespace tokenizer over the words w0..w{n-1}: w0 unknown, w1 end of text, w2 padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", eos_token="w1", pad_token="w2",
                                   bos_token="w1")


def prompt_words(n: int, offset: int = 3) -> str:
    """A prompt of exactly ``n`` tokens for the word tokenizer."""
    return " ".join(f"w{offset + i % 97}" for i in range(n))


@dataclass
class Built:
    folder: Path
    parameters: int
    size_bytes: int
    build_s: float
    save_s: float


def build(folder: Path, shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Built:
    """Random Llama weights drawn on ``device``, saved with the tokenizer to ``folder`` as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if device.type == "cuda":
        torch.cuda.synchronize()
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(folder)
    word_tokenizer(shape["vocab_size"]).save_pretrained(folder)
    saved = time.perf_counter() - t0
    parameters = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Built(folder, parameters, size, built, saved)


def host_to_device_gbps(device: torch.device, gib: float = 1.0) -> float | None:
    """Pinned host memory to the device, the bound under a load from the page cache; None on a CPU."""
    if device.type != "cuda":
        return None
    host = torch.empty(int(gib * 2**30), dtype=torch.uint8).pin_memory()
    target = torch.empty_like(host, device=device)
    target.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        target.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * host.numel() / (time.perf_counter() - t0) / 1e9


def drop_page_cache() -> bool:
    """A cold load reads the disk; this needs root (the device machine runs as root). False where refused."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False
