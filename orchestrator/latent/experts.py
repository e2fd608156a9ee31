"""The latent group's experts: the model store's transformers experts, loaded together, frozen, on one device.

The latent mixture's primary reads its peers' hidden states inside its own
forward pass, so every expert of the mixture must be resident at once, on one
device. ``check_fit`` refuses a group that cannot fit before any weight loads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from orchestrator.latent.checkpoint import LatentSettings, expert_version
from orchestrator.latent.mixture import ExpertShape, Interaction, LatentError, LatentMixture, LatentRouter
from workers.backends.transformers_backend import TransformersBackend
from workers.config import TransformersExpert
from workers.model_store import ModelStore


def group_backends(configs: list[TransformersExpert], store_root: Path, threads: int | None = None
                   ) -> dict[str, TransformersBackend]:
    """One backend per expert, all on one device, prompts as plain text: the mixture is trained on the
    tokenizer's plain encoding, so the primary must see neither a chat template nor a plain-prompt frame that it
    never trained with (its stop strings still end its answers)."""
    update: dict[str, object] = {"chat_template": "never", "plain_prompt": "{prompt}"}
    if threads is not None:
        update["threads"] = threads
    backends = {c.name: TransformersBackend(c.model_copy(update=update), store_root) for c in configs}
    devices = {b.device for b in backends.values()}
    if len(devices) > 1:
        raise LatentError(f"the latent group's experts must share one device, but they would run on "
                          f"{', '.join(sorted(devices))}: set every expert's device alike")
    return backends


def check_fit(backends: dict[str, TransformersBackend], limit_bytes: int | None, where: str) -> int:
    """The bytes the experts need together; LatentError when they exceed ``limit_bytes`` of one device."""
    need = sum(b.estimate_memory_bytes() for b in backends.values())
    if limit_bytes is not None and need > limit_bytes:
        parts = ", ".join(f"{n} {b.estimate_memory_bytes() / 2**30:.2f}" for n, b in backends.items())
        raise LatentError(f"the latent group's experts need {need / 2**30:.2f} GiB together ({parts}), but {where} "
                          f"offers {limit_bytes / 2**30:.2f} GiB: use fewer or smaller experts, or a larger device")
    return need


def load_experts(backends: dict[str, TransformersBackend], store: ModelStore
                 ) -> tuple[dict[str, tuple[torch.nn.Module, object]], list[ExpertShape]]:
    experts, shapes = {}, []
    for name, backend in backends.items():
        backend.load()
        experts[name] = (backend.model, backend.tokenizer)
        cfg = backend.model.config
        shapes.append(ExpertShape(name, cfg.num_hidden_layers, cfg.hidden_size,
                                  expert_version(store, backend.config.source)))
    return experts, shapes


def build_mixture(experts: dict, shapes: list[ExpertShape], settings: LatentSettings, embed_dim: int,
                  seed: int = 0) -> LatentMixture:
    torch.manual_seed(seed)
    router = LatentRouter(embed_dim, len(shapes), settings.router_hidden)
    interaction = Interaction(shapes, settings.q, settings.d_latent, settings.heads)
    return LatentMixture(experts, shapes, settings.q, router, interaction)
