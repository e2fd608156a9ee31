"""Latent checkpoints: the router and the interaction layers, with the names and weight versions of the experts
they were trained for. Loading one into other experts, or other weights, is refused before anything runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.latent.mixture import ExpertShape, Interaction, LatentError, LatentMixture, LatentRouter
from workers.config import TransformersExpert
from workers.model_store import MANIFEST, ModelStore

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class LatentSettings:
    q: int = 3
    d_latent: int = 256
    heads: int = 4
    router_hidden: int = 256


def expert_version(store: ModelStore, source: str) -> str:
    folder = store.resolve(source)
    manifest = Path(folder) / MANIFEST
    if isinstance(folder, Path) and manifest.exists():
        return json.loads(manifest.read_text())["source_sha256"][:16]
    return f"path:{folder}"


def identities(configs: list[TransformersExpert], store: ModelStore) -> list[tuple[str, str]]:
    """(name, version) of each expert: what a checkpoint is valid for, known without loading any weights."""
    return [(c.name, expert_version(store, c.source)) for c in configs]


def save_checkpoint(mixture: LatentMixture, shapes: list[ExpertShape], settings: LatentSettings, path: Path,
                    meta: dict) -> None:
    torch.save({
        "version": CHECKPOINT_VERSION,
        "experts": [{"name": s.name, "version": s.version} for s in shapes],
        "settings": settings.__dict__,
        "router": mixture.router.state_dict(),
        "interaction": mixture.interaction.state_dict(),
        "meta": meta,
    }, path)


def _open_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise LatentError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise LatentError(f"{path} is not a latent checkpoint: {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise LatentError(f"{path} is not a latent checkpoint of version {CHECKPOINT_VERSION}")
    return ckpt


def checkpoint_experts(path: Path) -> list[str]:
    """The expert names a checkpoint was trained for, in its order, before any expert is looked at."""
    return [e["name"] for e in _open_checkpoint(path)["experts"]]


def _verify(ckpt: dict, path: Path, experts: list[tuple[str, str]]) -> dict:
    """The checkpoint, once it is shown to be for exactly these (name, version) experts, in this order."""
    want = [{"name": n, "version": v} for n, v in experts]
    if ckpt["experts"] != want:
        trained = ", ".join(f"{e['name']}@{e['version']}" for e in ckpt["experts"])
        given = ", ".join(f"{e['name']}@{e['version']}" for e in want)
        raise LatentError(f"{path} was trained for experts {trained}, not {given}: train a checkpoint for these "
                          "experts with `concilium train-latent`")
    return ckpt


def read_checkpoint(path: Path, experts: list[tuple[str, str]]) -> dict:
    return _verify(_open_checkpoint(path), path, experts)


def _router_of(ckpt: dict) -> LatentRouter:
    weight = ckpt["router"]["net.0.weight"]  # [hidden, embed_dim]: the embedder it was trained with
    router = LatentRouter(weight.shape[1], len(ckpt["experts"]), weight.shape[0])
    router.load_state_dict(ckpt["router"])
    return router


def router_for(path: Path, configs_of: Callable[[list[str]], list[TransformersExpert]], store: ModelStore
               ) -> tuple[list[TransformersExpert], LatentRouter]:
    """The router alone, for the process that routes (the interaction stays with the latent group), read once:
    ``configs_of`` maps the checkpoint's expert names to their configs, which must match its weight versions."""
    ckpt = _open_checkpoint(path)
    configs = configs_of([e["name"] for e in ckpt["experts"]])
    return configs, _router_of(_verify(ckpt, path, identities(configs, store)))


def load_mixture(path: Path, experts: dict, shapes: list[ExpertShape]) -> LatentMixture:
    ckpt = read_checkpoint(path, [(s.name, s.version) for s in shapes])
    settings = LatentSettings(**ckpt["settings"])
    interaction = Interaction(shapes, settings.q, settings.d_latent, settings.heads)
    interaction.load_state_dict(ckpt["interaction"])
    device = next(experts[shapes[0].name][0].parameters()).device
    return LatentMixture(experts, shapes, settings.q, _router_of(ckpt).to(device), interaction.to(device))
