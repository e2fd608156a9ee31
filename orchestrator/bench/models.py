"""``concilium bench models``: load times, time to first token and throughput of the bundled models, per backend.

Measured in-process through the backends themselves (transformers, and vLLM's engine with ``--backend vllm``),
without Ray, so the figures are the models' own cost. For transformers, loads compare the GGUF
de-quantisation that the store avoids with a load from the store; a vLLM load is its engine's start. The
backends and batch sizes run side by side on the same prompts, and the report gives medians and ratios.
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

from workers.backends import Backend
from workers.config import TransformersExpert, VLLMExpert
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


BACKENDS = ("transformers", "vllm")


@dataclass(frozen=True)
class ModelsBenchSettings:
    batch_sizes: list[int]
    new_tokens: int = 32
    repeats: int = 3
    threads: int = 2
    with_gguf: bool = True
    drop_caches: bool = True
    backends: tuple[str, ...] = ("transformers",)


@dataclass
class ModelFigures:
    model: str
    backend: str
    gguf_load_s: float | None
    store_cold_load_s: float
    """transformers: in a fresh process, after dropping the page cache when that was allowed (caches_dropped).
    vllm: the engine's first start in this process (model load, KV cache, warm-up)."""
    store_warm_load_s: float | None
    """transformers: a second load in this process; vllm: not measured (each start is a new engine)."""
    caches_dropped: bool
    ttft_s: float = 0.0
    """Time to the first streamed token at batch 1, median over the repeats."""
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


def _backend(kind: str, name: str, store: ModelStore, settings: ModelsBenchSettings) -> Backend:
    batch = max(settings.batch_sizes)
    if kind == "vllm":
        from workers.backends.vllm_backend import VLLMBackend

        engine = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048}
        return VLLMBackend(VLLMExpert(name=name, backend="vllm", source=name, engine=engine, max_batch_size=batch,
                                      num_cpus=settings.threads), store.root)
    from workers.backends.transformers_backend import TransformersBackend

    return TransformersBackend(TransformersExpert(name=name, source=name, threads=settings.threads,
                                                  max_batch_size=batch), store.root)


def _loads(kind: str, name: str, backend: Backend, store: ModelStore, settings: ModelsBenchSettings,
           progress: Callable[[str], None]) -> ModelFigures:
    """Load the backend, timing what can be timed for its kind."""
    if kind == "vllm":
        progress(f"{name} on vllm: starting the engine")
        started = time.perf_counter()
        backend.load()
        return ModelFigures(name, kind, None, time.perf_counter() - started, None, False)
    gguf_s = None
    if settings.with_gguf:
        progress(f"{name}: loading from GGUF")
        gguf_s = _gguf_load_seconds(name, store)
    progress(f"{name}: cold load from the store, in a fresh process")
    cold_s, dropped = _cold_store_load_seconds(store.path(name), settings.drop_caches)
    backend.load()  # the first in-process load also pays for lazy imports; time the next one
    progress(f"{name}: warm load from the store")
    started = time.perf_counter()
    backend.load()
    return ModelFigures(name, kind, gguf_s, cold_s, time.perf_counter() - started, dropped)


def _first_token_s(backend: Backend, params: SamplingParams) -> float:
    started, first = time.perf_counter(), []
    backend.generate([Prompt(PROMPTS[1])], params, lambda _row, _text: first or first.append(time.perf_counter()))
    return first[0] - started


def bench_model(name: str, kind: str, store: ModelStore, settings: ModelsBenchSettings,
                progress: Callable[[str], None]) -> ModelFigures:
    store.pull(name)
    backend = _backend(kind, name, store, settings)
    figures = _loads(kind, name, backend, store, settings, progress)
    params = SamplingParams(max_new_tokens=settings.new_tokens)
    backend.generate([Prompt(PROMPTS[0])], SamplingParams(max_new_tokens=2))  # warm-up
    figures.ttft_s = statistics.median(_first_token_s(backend, params) for _ in range(settings.repeats))
    for bs in settings.batch_sizes:
        prompts = [Prompt(PROMPTS[i % len(PROMPTS)]) for i in range(bs)]
        runs = []
        for r in range(settings.repeats):
            progress(f"{name} on {kind}: batch {bs}, run {r + 1}/{settings.repeats}")
            started = time.perf_counter()
            out = backend.generate(prompts, params)
            runs.append((time.perf_counter() - started, sum(c.completion_tokens for c in out)))
        seconds = statistics.median(s for s, _ in runs)
        tokens = int(statistics.median(t for _, t in runs))
        figures.seconds[bs], figures.tokens[bs] = seconds, tokens
        figures.tokens_per_s[bs] = tokens / seconds
    backend.unload()
    return figures


def run_models_bench(
    names: list[str],
    settings: ModelsBenchSettings,
    store: ModelStore,
    progress: Callable[[str], None],
    json_out: Path | None = None,
) -> list[ModelFigures]:
    results = [bench_model(n, kind, store, settings, progress) for n in names for kind in settings.backends]
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results
