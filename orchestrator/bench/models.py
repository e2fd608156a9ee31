"""``concilium bench models``: load times and generation throughput of the bundled models.

Measured in-process through the transformers backend, without Ray, so the
figures are the models' own cost. Loads compare the GGUF de-quantisation that
the store avoids with a load from the store. Throughput runs the batch sizes
side by side on the same prompts and reports medians and ratios to batch 1.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
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


@dataclass(frozen=True)
class ModelsBenchSettings:
    batch_sizes: list[int]
    new_tokens: int = 32
    repeats: int = 3
    threads: int = 2
    with_gguf: bool = True
    drop_caches: bool = True


@dataclass
class ModelFigures:
    model: str
    gguf_load_s: float | None
    store_cold_load_s: float
    """In a fresh process; after dropping the page cache when that was allowed (see caches_dropped)."""
    store_warm_load_s: float
    caches_dropped: bool
    tokens_per_s: dict[int, float] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)


def _gguf_load_seconds(name: str, store: ModelStore) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = BUNDLED[name].gguf(store.root.parent / "gguf")
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return time.perf_counter() - started


_COLD_LOAD = """
import sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
started = time.perf_counter()
AutoTokenizer.from_pretrained(sys.argv[1])
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(time.perf_counter() - started)
"""


def _drop_page_cache() -> bool:
    """Drop the OS page cache (root only), so a cold load really reads the disk."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        return False
    return True


def _cold_store_load_seconds(path: Path, drop_caches: bool) -> tuple[float, bool]:
    """A load in a fresh process, timed after the imports: what an actor start costs."""
    dropped = drop_caches and _drop_page_cache()
    proc = subprocess.run(
        [sys.executable, "-c", _COLD_LOAD, str(path)], capture_output=True, text=True, check=True
    )
    return float(proc.stdout.strip().splitlines()[-1]), dropped


def bench_model(
    name: str, store: ModelStore, settings: ModelsBenchSettings, progress: Callable[[str], None]
) -> ModelFigures:
    from workers.backends.transformers_backend import TransformersBackend

    store.pull(name)
    batch_sizes, repeats = settings.batch_sizes, settings.repeats
    gguf_s = None
    if settings.with_gguf:
        progress(f"{name}: loading from GGUF")
        gguf_s = _gguf_load_seconds(name, store)
    progress(f"{name}: cold load from the store, in a fresh process")
    cold_s, dropped = _cold_store_load_seconds(store.path(name), settings.drop_caches)
    expert = TransformersExpert(
        name=name, source=name, threads=settings.threads, max_batch_size=max(batch_sizes)
    )
    backend = TransformersBackend(expert, store.root)
    backend.load()  # the first in-process load also pays for lazy imports; time the next one
    progress(f"{name}: warm load from the store")
    started = time.perf_counter()
    backend.load()
    figures = ModelFigures(name, gguf_s, cold_s, time.perf_counter() - started, dropped)
    params = SamplingParams(max_new_tokens=settings.new_tokens)
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
    settings: ModelsBenchSettings,
    store: ModelStore,
    progress: Callable[[str], None],
    json_out: Path | None = None,
) -> list[ModelFigures]:
    results = [bench_model(n, store, settings, progress) for n in names]
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results
