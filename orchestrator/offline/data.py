"""Bench-data folders and named pools as router training data.

This lives in the orchestrator because it joins two layers: the workers' reader
of recorded outcomes, and the routers' evaluator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routers.base import Prices, RoutingError
from routers.embedding import TextEncoder
from routers.scoring.crossval import EvalData
from workers.recorded import load_recorded
from workers.types import CHARS_PER_TOKEN

POOLS: dict[str, list[str]] = {
    # The project's typical self-hosted fleet: 15 open models of 7B-13B (bench-data README).
    "open-small": [
        "gemma-7b", "Llama-2-13b-hf", "Llama-2-7b-hf", "mathstral-7B", "Meta-Llama-3-8B", "Meta-Llama-3_1-8B",
        "Meta-Llama-3_1-8B-Instruct", "Mistral-7B-Instruct-v0.1", "Mistral-7B-Instruct-v0.2", "Mistral-7B-v0.1",
        "Mistral-7B-v0.2-hf", "Phi-3-mini-4k-instruct", "Qwen1.5-7B-Chat", "Yi-6B", "Yi-6b-Chat",
    ],
}


def resolve_pool(available: tuple[str, ...], pool: str | None, models: list[str] | None) -> list[str]:
    if pool and models:
        raise RoutingError("give --pool or --models, not both")
    if pool:
        if pool not in POOLS:
            raise RoutingError(f"unknown pool {pool!r}; named pools: {', '.join(POOLS)}")
        chosen = POOLS[pool]
    elif models:
        chosen = models
    else:
        return list(available)
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise RoutingError(f"the data has no model(s) {', '.join(unknown)}; it has: {', '.join(available)}")
    if len(set(chosen)) != len(chosen):
        raise RoutingError("the pool names a model twice")
    return list(chosen)


def _columns(rows: list[tuple | None], cols: list[int], dtype: object) -> np.ndarray | None:
    if any(r is None for r in rows):
        return None
    return np.array([[r[c] for c in cols] for r in rows], dtype=dtype)


def load_eval_data(folder: Path, embedder: TextEncoder, pool: str | None = None,
                   models: list[str] | None = None) -> EvalData:
    recorded = load_recorded(folder)
    experts = resolve_pool(recorded.models, pool, models)
    cols = [recorded.models.index(m) for m in experts]
    records = recorded.records
    texts = [r.text for r in records]
    chars = _columns([r.output_chars for r in records], cols, np.float64)
    prices = None
    if recorded.prices is not None:
        prices = Prices(np.array([recorded.prices[c][0] for c in cols]), np.array([recorded.prices[c][1] for c in cols]))
    return EvalData(
        texts=texts, correct=_columns([r.outcome for r in records], cols, np.float64), experts=experts,
        categories=[r.category for r in records], cost=_columns([r.cost for r in records], cols, np.float64),
        vectors=embedder.encode(texts, progress=True), answers=_columns([r.pred for r in records], cols, object),
        output_tokens=None if chars is None else chars / CHARS_PER_TOKEN, prices=prices,
    )
