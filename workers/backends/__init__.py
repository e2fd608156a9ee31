"""Backends: the one thing that differs between experts is how text gets generated.

A registry maps the config's ``backend`` key to an implementation, so the actor
and the pool never branch on the kind of expert.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from workers.config import ExpertConfig
from workers.types import Completion, Piece, Prompt, SamplingParams

OnDelta = Callable[[int, Piece], None]


def deliver_whole(completions: list[Completion], on_delta: OnDelta | None) -> list[Completion]:
    """For a backend that cannot stream: each row's whole text to the stream, once it has it."""
    if on_delta is not None:
        for row, c in enumerate(completions):
            on_delta(row, c.text)
    return completions


class BackendUnsupported(NotImplementedError):
    """The backend cannot do what its config asks (e.g. a chat template the tokenizer lacks)."""


class Backend(Protocol):
    device: str

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def generate(self, prompts: list[Prompt], params: SamplingParams, on_delta: OnDelta | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Completion]:
        """One batched call. ``on_delta(row, text)`` receives each row's text as it is written (a backend that
        cannot stream gives it all at once at the end); ``cancelled(row)`` ends a row early where it can."""
        ...

    def estimate_memory_bytes(self) -> int:
        """Resident size before loading, for the pool's memory budget."""
        ...

    def memory_bytes(self) -> int: ...

    def describe(self) -> dict[str, object]: ...


@runtime_checkable
class Sleeper(Protocol):
    """A backend that can free its device without dropping its weights: vLLM's sleep mode on CUDA moves them to
    host RAM, so a wake-up replaces a load. ``sleeps`` says whether it can, on this device, now."""

    sleeps: bool

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


@runtime_checkable
class Counter(Protocol):
    """A backend that knows exactly how many prompt tokens a call will be charged: the ids its tokenizer makes,
    or the count its records report."""

    def count_tokens(self, prompts: list[Prompt]) -> list[int]: ...


MESSAGE_OVERHEAD_TOKENS = 8
"""A bound on the tokens a chat template adds around one message (role markers, separators)."""


def count_tokens(backend: Backend, prompts: list[Prompt]) -> list[int]:
    """The prompt tokens each prompt will be charged, or at least that many: a backend that cannot count (a remote
    server's tokenizer is unknown here) gets a bound, the UTF-8 bytes of the text plus a template allowance per
    message, which no byte-level or byte-fallback tokenizer exceeds. Budget reservations rest on it."""
    if isinstance(backend, Counter):
        return backend.count_tokens(prompts)
    return [_byte_bound(p) for p in prompts]


def _byte_bound(prompt: Prompt) -> int:
    """The UTF-8 bytes a remote server's template renders at most: each message's text and tool calls, the tools'
    definitions, and the allowance per message."""
    def size(value: object) -> int:
        return len((value if isinstance(value, str) else json.dumps(value)).encode())

    messages = prompt.as_messages()
    return (sum(size(m["content"]) + size(m.get("tool_calls", "")) + MESSAGE_OVERHEAD_TOKENS for m in messages)
            + size(list(prompt.tools) if prompt.tools else "") + MESSAGE_OVERHEAD_TOKENS)


def can_sleep(backend: Backend) -> bool:
    return isinstance(backend, Sleeper) and backend.sleeps


def runs_concurrently(backend: Backend) -> bool:
    """Whether calls may overlap in the actor: an engine with its own continuous batching (vLLM) takes every
    window's rows as they come; the others run one batched call at a time."""
    return bool(getattr(backend, "concurrent", False))


def make_backend(config: ExpertConfig, model_store: Path) -> Backend:
    factories: dict[str, Callable[[], Backend]] = {
        "transformers": lambda: _transformers(config, model_store),
        "vllm": lambda: _vllm(config, model_store),
        "openai": lambda: _openai(config),
        "replay": lambda: _replay(config),
        "simulated": lambda: _simulated(config),
    }
    return factories[config.backend]()


def _transformers(config: ExpertConfig, model_store: Path) -> Backend:
    from workers.backends.transformers_backend import TransformersBackend

    return TransformersBackend(config, model_store)


def _vllm(config: ExpertConfig, model_store: Path) -> Backend:
    from workers.backends.vllm_backend import VLLMBackend

    return VLLMBackend(config, model_store)


def _openai(config: ExpertConfig) -> Backend:
    from workers.backends.openai_backend import OpenAIBackend

    return OpenAIBackend(config)


def _replay(config: ExpertConfig) -> Backend:
    from workers.backends.replay import ReplayBackend

    return ReplayBackend(config)


def _simulated(config: ExpertConfig) -> Backend:
    from workers.backends.simulated import SimulatedBackend

    return SimulatedBackend(config)
