"""``concilium eval``: a router measured on recorded outcomes, with its baselines on the same splits.

The router runs through the same functions that route live (``routers``); only
the experts' answers come from the recording. ``--router auto`` measures the
selection itself by nested cross-validation (``routers.scoring.selection``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.offline.data import load_eval_data
from orchestrator.offline.plots import plot_accuracy_vs_k, plot_frontier
from routers.base import RouteOptions, RoutingError
from routers.embedding import TextEncoder
from routers.learned import PLANNED
from routers.registry import make_router
from routers.scoring.crossval import (
    CostTarget,
    EvalData,
    baselines,
    cross_validation_splits,
    run_router,
    sweep,
)
from routers.scoring.frontier import aiq
from routers.scoring.selection import candidate_factory, nested
from routers.vocabulary import AUTO_ROUTER, OFFLINE_AGGREGATIONS, Aggregation, Policy

LAMBDAS = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 1e5)


@dataclass
class EvalSettings:
    train: Path
    router: str
    options: RouteOptions
    aggregation: str
    folds: int = 5
    test: Path | None = None
    pool: str | None = None
    models: list[str] | None = None
    budget: CostTarget | None = None
    seed: int = 0
    plots: Path | None = None


def _check(s: EvalSettings, embedder: TextEncoder) -> None:
    """Reject bad settings before any work."""
    if s.aggregation not in OFFLINE_AGGREGATIONS:
        raise RoutingError(f"unknown aggregation {s.aggregation!r}; choose one of {', '.join(OFFLINE_AGGREGATIONS)}")
    if s.budget is not None and s.budget.share is not None and s.budget.share <= 0:
        raise RoutingError("--budget-share must be positive")
    if s.budget is not None and s.budget.max_experts is not None and s.budget.max_experts < 1:
        raise RoutingError("--max-experts must be at least 1")
    if s.router != AUTO_ROUTER:
        make_router(s.router, embedder=embedder)


def _data(s: EvalSettings, embedder: TextEncoder) -> tuple[EvalData, list, str]:
    data = load_eval_data(s.train, embedder, s.pool, s.models)
    if s.test is None:
        return data, cross_validation_splits(len(data.texts), s.folds, s.seed), f"{s.folds}-fold CV on {s.train}"
    test = load_eval_data(s.test, embedder, models=data.experts)
    n_train = len(data.texts)
    joined = data.join(test)
    return joined, [(np.arange(n_train), np.arange(n_train, len(joined.texts)))], \
        f"profiles on {s.train}, measured on {s.test}"


def evaluate(s: EvalSettings, embedder: TextEncoder, on_fold: Callable[[int], None] = lambda _i: None
             ) -> dict[str, object]:
    """The JSON result of ``concilium eval``: the router and its baselines on the same splits."""
    _check(s, embedder)
    data, splits, protocol = _data(s, embedder)
    if s.budget is not None and s.budget.share is not None and data.cost is None:
        raise RoutingError("a budget needs cost data, and this file records none")
    result: dict[str, object] = {
        "router": s.router, "policy": str(s.options.policy), "k": s.options.k, "aggregation": str(s.aggregation),
        "protocol": protocol, "experts": data.experts,
        "baselines": baselines(data, splits, s.options.k, s.seed, {"embedder": embedder}),
    }
    if s.router == AUTO_ROUTER:
        picked = nested(data, candidate_factory(embedder), s.options, s.aggregation, splits, seed=s.seed,
                        on_fold=on_fold, target=s.budget)
        result.update(accuracy=picked.accuracy, mean_cost=picked.mean_cost, n_queries=len(data.texts),
                      chosen_per_fold=picked.chosen, inner_scores=picked.inner_scores)
        if s.budget is not None:
            result["budget"] = _held(s.budget, data, splits, picked.mean_cost, picked.mean_experts)
        return result
    make = lambda: make_router(s.router, embedder=embedder)  # noqa: E731
    outcome = run_router(make, data, s.options, s.aggregation, splits, on_fold, s.budget)
    result.update(accuracy=outcome.accuracy, mean_cost=outcome.mean_cost, n_queries=outcome.n_queries,
                  consensus_rate=outcome.consensus_rate, mean_experts=outcome.mean_experts,
                  calibration_error=outcome.calibration_error)
    if s.budget is not None:
        result["budget"] = _held(s.budget, data, splits, outcome.mean_cost, outcome.mean_experts)
    if data.cost is not None:
        result.update(cost_frontier(make, data, splits, s.options))
    if s.plots is not None:
        _plots(s, make, data, splits, result)
    return result


def _held(budget: CostTarget, data: EvalData, splits: list, mean_cost: float | None, mean_experts: float) -> dict:
    """What the budget asked for, and what the test folds got."""
    if budget.max_experts is not None:
        return {"max_experts": budget.max_experts, "test_mean_experts": mean_experts}
    idx = np.concatenate([t for _, t in splits])
    best = int(np.argmax(data.correct[idx].mean(axis=0)))
    return {"share": budget.share, "test_share": mean_cost / float(data.cost[idx, best].mean()),
            "reference": data.experts[best]}


def _plots(s: EvalSettings, make: Callable, data: EvalData, splits: list, result: dict) -> None:
    s.plots.mkdir(parents=True, exist_ok=True)
    by_k = accuracy_by_k(make, data, splits, s.options, result["baselines"]["best_single"]["accuracy"])
    result["accuracy_by_k"] = by_k
    plot_accuracy_vs_k(by_k, s.router, s.plots / "accuracy_vs_k.png")
    if data.cost is not None:
        plot_frontier([tuple(p) for p in result["frontier"]], result["single_models"], s.router, result["aiq"],
                      s.plots / "cost_frontier.png")


def cost_frontier(make: Callable, data: EvalData, splits: list, options: RouteOptions) -> dict[str, object]:
    """The router's (cost, accuracy) points over a λ sweep, the single models' points, and both AIQs.

    The sweep runs the requested policy when it plans (adaptive, cascade: λ trades accuracy for cost in its
    plans), else the cost policy with one expert. AIQ is taken over the single models' cost range, so that
    routers and single models are compared over the same budgets.
    """
    planned = options.policy in PLANNED
    sweep_options = [RouteOptions(k=options.k if planned else 1, policy=options.policy if planned else Policy.COST,
                                  cost_lambda=lam, seed=options.seed) for lam in LAMBDAS]
    outcomes = sweep(make, data, lambda _train: sweep_options, Aggregation.VOTE if planned else Aggregation.BEST,
                     splits)
    points = [(o.mean_cost, o.accuracy) for o in outcomes]
    idx = np.concatenate([t for _, t in splits])
    singles = {e: (float(data.cost[idx, j].mean()), float(data.correct[idx, j].mean()))
               for j, e in enumerate(data.experts)}
    cost_range = (min(c for c, _ in singles.values()), max(c for c, _ in singles.values()))
    return {
        "frontier": points,
        "frontier_policy": str(options.policy if planned else Policy.COST),
        "single_models": singles,
        "aiq": {"router": aiq(points, cost_range), "single_models": aiq(list(singles.values()), cost_range),
                "cost_range": cost_range},
    }


def accuracy_by_k(make: Callable, data: EvalData, splits: list, options: RouteOptions, best_single: float
                  ) -> list[dict[str, float]]:
    rows = []
    for k in range(1, 6):
        opts = RouteOptions(k=k, policy=options.policy if options.policy == Policy.SYMBOLIC else Policy.TOPK,
                            seed=options.seed)
        agg = Aggregation.VOTE if k > 1 else Aggregation.BEST
        r = run_router(make, data, opts, agg, splits)
        pc = run_router(lambda: make_router("per_category"), data, RouteOptions(k=k), agg, splits)
        rows.append({"k": k, "router": r.accuracy, "per_category_vote": pc.accuracy, "best_single": best_single})
    return rows
