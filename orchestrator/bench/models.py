"""``concilium bench models``: load times and generation throughput of the bundled models.

Measured in-process through the transformers backend, without Ray, so the
figures are the models' own cost. Loads compare the GGUF de-quantisation that
the store avoids with a load from the store. Throughput runs the batch sizes
side by side on the same prompts and reports medians and ratios to batch 1.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workers.config import TransformersExpert
from workers.model_store import BUNDLED, ModelStore
from workers.types import Prompt, SamplingParams

PROMPTS = [
    "Explain why the sky is blue.",
    "What causes the seasons on Earth?",
    "Give two uses of a binary search tree.",
    "Why do prices rise when demand grows?",
    "Describe how a vaccine trains the immune system.",
    "What is the derivative of x squared, and why?",
    "Name a cause of the First World War.",
    "How does a transistor switch a current?",
    "What is the difference between weather and climate?",
    "Why is the ocean salty?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "How do bees make honey?",
    "What does a compiler do?",
    "Why do we have leap years?",
    "What is photosynthesis?",
    "How does compound interest work?",
]


@dataclass
class ModelFigures:
    model: str
    gguf_load_s: float | None
    store_first_load_s: float
    store_warm_load_s: float
    tokens_per_s: dict[int, float] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)


def _gguf_load_seconds(name: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = BUNDLED[name].gguf()
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return time.perf_counter() - started


def bench_model(
    name: str,
    store: ModelStore,
    batch_sizes: list[int],
    new_tokens: int,
    repeats: int,
    threads: int,
    with_gguf: bool,
    progress: Callable[[str], None],
) -> ModelFigures:
    from workers.backends.transformers_backend import TransformersBackend

    store.pull(name)
    gguf_s = None
    if with_gguf:
        progress(f"{name}: loading from GGUF")
        gguf_s = _gguf_load_seconds(name)
    expert = TransformersExpert(name=name, source=name, threads=threads, max_batch_size=max(batch_sizes))
    loads = []
    backend = None
    for _ in range(2):
        progress(f"{name}: loading from the store")
        backend = TransformersBackend(expert, store.root)
        started = time.perf_counter()
        backend.load()
        loads.append(time.perf_counter() - started)
    figures = ModelFigures(name, gguf_s, loads[0], loads[1])
    params = SamplingParams(max_new_tokens=new_tokens)
    backend.generate([Prompt(PROMPTS[0])], SamplingParams(max_new_tokens=2))  # warm-up
    for bs in batch_sizes:
        prompts = [Prompt(PROMPTS[i % len(PROMPTS)]) for i in range(bs)]
        runs = []
        for r in range(repeats):
            progress(f"{name}: batch {bs}, run {r + 1}/{repeats}")
            started = time.perf_counter()
            out = backend.generate(prompts, params)
            runs.append((time.perf_counter() - started, sum(c.completion_tokens for c in out)))
        seconds = statistics.median(s for s, _ in runs)
        tokens = int(statistics.median(t for _, t in runs))
        figures.seconds[bs], figures.tokens[bs] = seconds, tokens
        figures.tokens_per_s[bs] = tokens / seconds
    return figures


def run_models_bench(
    names: list[str],
    batch_sizes: list[int],
    new_tokens: int,
    repeats: int,
    threads: int,
    with_gguf: bool,
    store: ModelStore,
    progress: Callable[[str], None],
    json_out: Path | None = None,
) -> list[ModelFigures]:
    results = [
        bench_model(n, store, batch_sizes, new_tokens, repeats, threads, with_gguf, progress) for n in names
    ]
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results
