"""The latent group: one Ray actor that holds the latent mixture's experts on one device.

The mixture's primary cross-attends to its peers' hidden states inside its own
forward pass, so the experts cannot live in separate actors as the pool's do:
they share one process and one device. Resources are declared on the actor
(``latent.num_cpus``, ``latent.num_gpus``); Ray places it whole or not at all.

Everything that can be known without Ray (the checkpoint, its experts' names
and weight versions, k, whether the experts fit the configured device memory)
is checked by ``check_latent`` before anything starts. The actor checks the
free CUDA memory before it loads a single weight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from orchestrator.config import ConciliumConfig
from orchestrator.latent.checkpoint import checkpoint_experts, load_mixture, router_for
from orchestrator.latent.experts import check_fit, group_backends, load_experts
from orchestrator.latent.mixture import LatentError, LatentRouter, LatentRouting
from routers.embedding import Embedder
from workers.backends import OnDelta
from workers.call_stream import Cancels, stream
from workers.config import TransformersExpert
from workers.model_store import ModelStore, embedder_path
from workers.pool import reason
from workers.types import Completion, GenerationResult, Prompt, SamplingParams, TokenDelta

ACTOR_NAME = "concilium-latent-group"


def latent_experts(config: ConciliumConfig, names: list[str]) -> list[TransformersExpert]:
    """The configured experts the checkpoint was trained for (``names``), in the checkpoint's order."""
    path = config.latent.checkpoint
    by_name = {e.name: e for e in config.experts}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise LatentError(f"{path} was trained for experts {', '.join(names)}; not configured: "
                          f"{', '.join(missing)}")
    remote = [n for n in names if not isinstance(by_name[n], TransformersExpert)]
    if remote:
        raise LatentError(f"the latent group runs local transformers experts; {', '.join(remote)} use another "
                          "backend")
    return [by_name[n] for n in names]


def _memory_limit(config: ConciliumConfig) -> int | None:
    gb = config.latent.device_memory_gb
    return None if gb is None else int(gb * 2**30)


def check_latent(config: ConciliumConfig) -> tuple[list[TransformersExpert], LatentRouter]:
    """Refuse, before any work, a latent setup that cannot run: a checkpoint that is missing or trained for
    other experts or weights, a default k past the mixture's experts, or experts that do not fit one device.
    Returns the experts and the checkpoint's router."""
    configs, router = router_for(config.latent.checkpoint, lambda names: latent_experts(config, names),
                                 ModelStore(config.store_root))
    if config.latent.k > len(configs):
        raise LatentError(f"latent.k = {config.latent.k}, but the checkpoint's mixture has {len(configs)} experts")
    check_fit(group_backends(configs, config.store_root), _memory_limit(config), "latent.device_memory_gb")
    return configs, router


def latent_routing(config: ConciliumConfig) -> LatentRouting:
    """The ``latent`` router for the process that routes: the checkpoint's router over the MiniLM embedder."""
    configs, router = check_latent(config)
    return LatentRouting(router, [c.name for c in configs], Embedder(embedder_path()))


class LatentGroupWorker:
    """The actor's body. Loading happens in ``__init__``, so that a restarted actor loads again by itself;
    a failure is kept and reported by ``ready`` with its message, not as a dead actor's traceback."""

    def __init__(self, configs: list[TransformersExpert], checkpoint: Path, store_root: Path,
                 threads: int, memory_limit: int | None) -> None:
        self.error: str | None = None
        self.cancels = Cancels()
        self.device = "cpu"
        self.load_s = 0.0
        try:
            self._load(configs, checkpoint, store_root, threads, memory_limit)
        except Exception as exc:  # reported by ready(), whatever it was
            self.error = reason(exc)

    def _load(self, configs: list[TransformersExpert], checkpoint: Path, store_root: Path, threads: int,
              memory_limit: int | None) -> None:
        t0 = time.perf_counter()
        self.backends = group_backends(configs, store_root, threads)  # refuses experts on different devices
        self.device = next(iter(self.backends.values())).device
        check_fit(self.backends, memory_limit, "latent.device_memory_gb")
        if self.device == "cuda":
            check_fit(self.backends, torch.cuda.mem_get_info()[0], "the GPU's free memory")
        experts, shapes = load_experts(self.backends, ModelStore(store_root))
        self.mixture = load_mixture(checkpoint, experts, shapes)
        self.load_s = time.perf_counter() - t0

    def ready(self) -> dict[str, object]:
        if self.error is not None:
            raise LatentError(self.error)
        return {"experts": list(self.backends), "device": self.device, "load_s": round(self.load_s, 2),
                "boundaries": self.mixture.boundaries}

    @torch.inference_mode()
    def generate(self, primary: str, peers: list[list[str]], prompts: list[str], params: SamplingParams,
                 on_delta: OnDelta | None = None, cancelled: Callable[[int], bool] | None = None
                 ) -> GenerationResult:
        """One batch with one primary: the peers encode the prompts once, then the primary generates with
        hooks that read their cached latents. Each completion's ``meta['peer_tokens']`` counts the prompt
        tokens every peer read, for usage."""
        if self.error is not None:
            raise LatentError(self.error)
        t0 = time.perf_counter()
        cache = self.mixture.encode_peers(prompts, peers)
        with self.mixture.attached(primary, cache):
            completions: list[Completion] = self.backends[primary].generate([Prompt(text=p) for p in prompts],
                                                                            params, on_delta, cancelled)
        for c, prompt, mine in zip(completions, prompts, peers):
            c.meta["peer_tokens"] = {
                n: len(self.backends[n].tokenizer(prompt)["input_ids"]) for n in mine
            }
        return GenerationResult(expert=primary, completions=completions, generate_s=time.perf_counter() - t0,
                                batch_size=len(prompts), finished_at=time.time())

    def generate_stream(self, primary: str, peers: list[list[str]], prompts: list[str], params: SamplingParams,
                        call: str) -> Iterator[list[TokenDelta] | GenerationResult]:
        """A Ray streaming generator: the primary's rows as they are written, then the result."""
        yield from stream(lambda on_delta, cancelled: self.generate(primary, peers, prompts, params, on_delta,
                                                                    cancelled), call, self.cancels)

    def cancel(self, call: str, row: int) -> None:
        self.cancels.cancel(call, row)


@dataclass
class LatentGroup:
    """The driver's handle on the group actor: what the scheduler calls for ``latent`` decisions."""

    actor: ray.actor.ActorHandle
    detached: bool

    @classmethod
    async def start(cls, config: ConciliumConfig, detached: bool = False) -> LatentGroup:
        """Start the actor (Ray must be up) and wait until its experts and checkpoint are loaded."""
        latent = config.latent
        free = ray.available_resources()
        for key, need in (("CPU", latent.num_cpus), ("GPU", latent.num_gpus)):
            if need > free.get(key, 0.0) + 1e-9:  # Ray would leave the actor pending forever
                raise LatentError(f"the latent group needs {need:g} {key}, but the cluster has "
                                  f"{free.get(key, 0.0):g} free beside the experts' actors: lower "
                                  f"latent.num_{key.lower()}s or add resources")
        options: dict[str, object] = {
            "name": ACTOR_NAME, "namespace": config.ray.namespace, "num_cpus": latent.num_cpus,
            "num_gpus": latent.num_gpus, "max_restarts": 1, "max_task_retries": 0,
        }
        if detached:
            options.update(lifetime="detached", get_if_exists=True)
        actor = ray.remote(LatentGroupWorker).options(**options).remote(
            latent_experts(config, checkpoint_experts(latent.checkpoint)), latent.checkpoint, config.store_root,
            latent.threads, _memory_limit(config),
        )
        try:
            await asyncio.wait_for(actor.ready.remote(), config.pool.load_timeout_s)
        except Exception as exc:
            ray.kill(actor)
            why = f"not ready after {config.pool.load_timeout_s:g} s" if isinstance(exc, TimeoutError) else reason(exc)
            raise LatentError(f"the latent group did not start: {why}") from None
        return cls(actor, detached)

    async def generate(self, primary: str, peers: list[list[str]], prompts: list[str], params: SamplingParams
                       ) -> GenerationResult:
        return await self.actor.generate.remote(primary, peers, prompts, params)

    async def stream(self, primary: str, peers: list[list[str]], prompts: list[str], params: SamplingParams,
                     call: str) -> AsyncIterator[list[TokenDelta] | GenerationResult]:
        async for ref in self.actor.generate_stream.options(num_returns="streaming").remote(
                primary, peers, prompts, params, call):
            yield await ref

    def cancel(self, call: str, row: int) -> None:
        self.actor.cancel.remote(call, row)

    def shutdown(self) -> None:
        if not self.detached:
            ray.kill(self.actor)
