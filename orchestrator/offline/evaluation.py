"""Offline evaluation glue: bench-data folders and named pools become router EvalData.

This lives in the orchestrator because it joins two layers: the workers' reader
of recorded outcomes, and the routers' evaluator.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from orchestrator.offline.plots import plot_accuracy_vs_k, plot_frontier
from routers.base import RouteOptions, RoutingError
from routers.embedding import Embedder
from routers.evaluate import EvalData, baselines, cross_validation_splits, run_router
from routers.frontier import aiq
from routers.registry import make_router
from routers.vocabulary import OFFLINE_AGGREGATIONS, Aggregation, Policy
from workers.recorded import load_recorded

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


def load_eval_data(
    folder: Path, embedder: Embedder, pool: str | None = None, models: list[str] | None = None
) -> EvalData:
    recorded = load_recorded(folder)
    experts = resolve_pool(recorded.models, pool, models)
    cols = [recorded.models.index(m) for m in experts]
    records = recorded.records
    texts = [r.text for r in records]
    correct = np.array([[r.outcome[c] for c in cols] for r in records], dtype=np.float64)
    preds = None
    if all(r.pred is not None for r in records):
        preds = np.array([[r.pred[c] for c in cols] for r in records], dtype=object)
    cost = None
    if all(r.cost is not None for r in records):
        cost = np.array([[r.cost[c] for c in cols] for r in records], dtype=np.float64)
    return EvalData(
        texts=texts, correct=correct, experts=experts, categories=[r.category for r in records],
        preds=preds, cost=cost, vectors=embedder.encode(texts, progress=True),
    )


def evaluate(
    train_dir: Path,
    test_dir: Path | None,
    embedder: Embedder,
    router: str,
    options: RouteOptions,
    aggregation: str,
    folds: int,
    pool: str | None = None,
    models: list[str] | None = None,
    budget_share: float | None = None,
    seed: int = 0,
    on_fold: Callable[[int], None] = lambda _i: None,
    plots: Path | None = None,
) -> dict[str, object]:
    """The JSON result of ``concilium eval``: the router and its baselines on the same splits."""
    if aggregation not in OFFLINE_AGGREGATIONS:
        raise RoutingError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(OFFLINE_AGGREGATIONS)}")
    if budget_share is not None and budget_share <= 0:
        raise RoutingError("--budget-share must be positive")
    make_router(router, embedder=embedder)  # reject an unknown router before any work
    data = load_eval_data(train_dir, embedder, pool, models)
    if test_dir is None:
        splits = cross_validation_splits(len(data.texts), folds, seed)
        protocol = f"{folds}-fold CV on {train_dir}"
    else:
        test = load_eval_data(test_dir, embedder, models=data.experts)
        data = _concat(data, test)
        n_train = len(data.texts) - len(test.texts)
        splits = [(np.arange(n_train), np.arange(n_train, len(data.texts)))]
        protocol = f"profiles on {train_dir}, measured on {test_dir}"
    make = lambda: make_router(router, embedder=embedder)  # noqa: E731
    outcome = run_router(make, data, options, aggregation, splits, on_fold, budget_share)
    result: dict[str, object] = {
        "router": router,
        "policy": options.policy,
        "k": options.k,
        "aggregation": aggregation,
        "budget_share": budget_share,
        "protocol": protocol,
        "experts": data.experts,
        "accuracy": outcome.accuracy,
        "mean_cost": outcome.mean_cost,
        "n_queries": outcome.n_queries,
        "consensus_rate": outcome.consensus_rate,
        "baselines": baselines(data, splits, options.k, seed, {"embedder": embedder}),
    }
    if data.cost is not None:
        result.update(cost_frontier(make, data, splits, options.seed))
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        by_k = accuracy_by_k(make, data, splits, options, result["baselines"]["best_single"]["accuracy"])
        result["accuracy_by_k"] = by_k
        plot_accuracy_vs_k(by_k, router, plots / "accuracy_vs_k.png")
        if data.cost is not None:
            plot_frontier([tuple(p) for p in result["frontier"]], result["single_models"], router,
                          result["aiq"], plots / "cost_frontier.png")
    return result


LAMBDAS = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 1e5)


def cost_frontier(
    make: Callable[[], object], data: EvalData, splits: list, seed: int | None
) -> dict[str, object]:
    """The router's (cost, accuracy) points over a λ sweep, the single models' points, and both AIQs.

    AIQ is taken over the single models' cost range, so that routers and
    single models are compared over the same budgets.
    """
    points = []
    for lam in LAMBDAS:
        o = run_router(make, data, RouteOptions(k=1, policy=Policy.COST, cost_lambda=lam, seed=seed), Aggregation.BEST,
                       splits)
        points.append((o.mean_cost, o.accuracy))
    idx = np.concatenate([t for _, t in splits])
    singles = {
        e: (float(data.cost[idx, j].mean()), float(data.correct[idx, j].mean()))
        for j, e in enumerate(data.experts)
    }
    cost_range = (min(c for c, _ in singles.values()), max(c for c, _ in singles.values()))
    return {
        "frontier": points,
        "single_models": singles,
        "aiq": {"router": aiq(points, cost_range), "single_models": aiq(list(singles.values()), cost_range),
                "cost_range": cost_range},
    }


def accuracy_by_k(
    make: Callable[[], object], data: EvalData, splits: list, options: RouteOptions, best_single: float
) -> list[dict[str, float]]:
    rows = []
    for k in range(1, 6):
        opts = RouteOptions(k=k, policy=options.policy if options.policy != Policy.COST else Policy.TOPK,
                            seed=options.seed)
        agg = Aggregation.VOTE if k > 1 else Aggregation.BEST
        r = run_router(make, data, opts, agg, splits)
        pc = run_router(lambda: make_router("per_category"), data, RouteOptions(k=k), agg, splits)
        rows.append({"k": k, "router": r.accuracy, "per_category_vote": pc.accuracy, "best_single": best_single})
    return rows


def _concat(a: EvalData, b: EvalData) -> EvalData:
    def cat(x: np.ndarray | None, y: np.ndarray | None) -> np.ndarray | None:
        return None if x is None or y is None else np.concatenate([x, y])

    return EvalData(
        texts=a.texts + b.texts, correct=np.concatenate([a.correct, b.correct]), experts=a.experts,
        categories=a.categories + b.categories, cost=cat(a.cost, b.cost), vectors=cat(a.vectors, b.vectors),
        preds=cat(a.preds, b.preds),
    )
