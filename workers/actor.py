"""The Ray actor that hosts one expert: a thin, thread-safe shell around a backend.

The actor is threaded (``max_concurrency`` > 1) so that ``info()`` and
``health()`` answer while a long ``generate`` runs; a lock serialises the calls
that touch the model, except the generate calls of a backend that batches
concurrent calls itself (vLLM), which the pool never overlaps with an unload.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ray

from workers.backends import OnDelta, can_sleep, count_tokens, make_backend, runs_concurrently
from workers.call_stream import Cancels, stream
from workers.config import ExpertConfig
from workers.spans import CallSpans
from workers.types import GenerationResult, Prompt, SamplingParams, TokenDelta, WorkerInfo


class ExpertLoadError(RuntimeError):
    """The expert's model could not be loaded; the expert is marked failed."""


class NotLoadedError(RuntimeError):
    """A call that needs the model reached an actor without it (e.g. just restarted)."""


class ExpertWorker:
    def __init__(self, config: ExpertConfig, model_store: str) -> None:
        self.config = config
        self.backend = make_backend(config, Path(model_store))
        self.state = "unloaded"
        self.error: str | None = None
        self.load_s: float | None = None
        self.lock = threading.Lock()
        self.cancels = Cancels()

    def _device(self) -> str:
        if self.backend.device != "cuda":
            return self.backend.device
        gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        return f"cuda:{gpu_ids[0]}" if gpu_ids else "cuda:0"

    def info(self) -> WorkerInfo:
        ctx = ray.get_runtime_context()
        return WorkerInfo(
            name=self.config.name,
            backend=self.config.backend,
            source=self.config.origin,
            state=self.state,
            device=self._device(),
            memory_bytes=self.backend.memory_bytes(),
            node_id=ctx.get_node_id(),
            gpu_ids=[str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
            pid=os.getpid(),
            error=self.error,
            load_s=self.load_s,
            details=self.backend.describe(),
        )

    def config_json(self) -> str:
        """The config this actor was started with: a deployment compares it to decide whether to restart it."""
        return self.config.model_dump_json()

    def health(self) -> dict[str, object]:
        return {"ok": self.state != "failed", "state": self.state, "error": self.error}

    def estimate_memory_bytes(self) -> int:
        return self.backend.estimate_memory_bytes()

    def load(self) -> float:
        """Load the model, or wake it if it sleeps; returns the seconds it took (0 when already loaded)."""
        with self.lock:
            if self.state == "loaded":
                return 0.0
            wake = self.state == "sleeping"
            self.state, self.error = "loading", None
            started = time.perf_counter()
            try:
                self.backend.wake() if wake else self.backend.load()
            except Exception as exc:
                self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
                self.backend.unload()
                raise ExpertLoadError(f"expert {self.config.name} failed to load: {self.error}") from None
            self.load_s = time.perf_counter() - started
            self.state = "loaded"
            return self.load_s

    def unload(self, deep: bool = False) -> str:
        """Free the device and return the new state: ``sleeping`` when the backend can keep its weights in host
        RAM (unless ``deep``), else ``unloaded``."""
        with self.lock:
            if self.state == "loaded" and not deep and can_sleep(self.backend):
                self.backend.sleep()
                self.state = "sleeping"
                return self.state
            self.backend.unload()
            if self.state != "failed":
                self.state = "unloaded"
            return self.state

    def _require_loaded(self) -> None:
        if self.state != "loaded":
            raise NotLoadedError(f"expert {self.config.name} is {self.state}, not loaded")

    def generate(self, prompts: list[str | Prompt], params: SamplingParams, on_delta: OnDelta | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> GenerationResult:
        requested = time.perf_counter()
        parsed = [Prompt.of(p) for p in prompts]
        with contextlib.nullcontext() if runs_concurrently(self.backend) else self.lock:
            self._require_loaded()
            started = time.perf_counter()
            spans = CallSpans(self.config.name, self.config.backend, parsed)
            try:
                completions = self.backend.generate(parsed, params, on_delta, cancelled)
            except BaseException as exc:
                spans.close(None, exc)
                raise
        return GenerationResult(
            expert=self.config.name,
            completions=completions,
            queue_s=started - requested,
            generate_s=time.perf_counter() - started,
            batch_size=len(parsed),
            finished_at=time.time(),
            spans=spans.close(completions),
        )

    def count_tokens(self, prompts: list[str | Prompt]) -> list[int]:
        """The prompt tokens each prompt would be charged (``workers.backends.count_tokens``), without generating."""
        self._require_loaded()
        return count_tokens(self.backend, [Prompt.of(p) for p in prompts])

    def generate_stream(self, prompts: list[str | Prompt], params: SamplingParams, call: str
                        ) -> Iterator[list[TokenDelta] | GenerationResult]:
        """A Ray streaming generator: lists of each row's new text as it is written, then the result."""
        yield from stream(lambda on_delta, cancelled: self.generate(prompts, params, on_delta, cancelled), call,
                          self.cancels)

    def cancel(self, call: str, row: int) -> None:
        """End one row of a streaming call, its client gone; the other rows go on."""
        self.cancels.cancel(call, row)
