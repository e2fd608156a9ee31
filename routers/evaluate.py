"""Offline evaluation on recorded outcomes, RouterBench-style, with k-fold cross-validation.

A router sees only the training folds. Its decisions on the test fold are scored
with the recorded outcomes of the experts it chose:
- vote: ``weighted_vote``, the vote the live aggregator runs, over the
  recorded answers, with multiplicity, each weighted by the decision's score
  for that expert. The winning voter's recorded outcome counts. Without
  recorded answers, or when no recruit recorded one, the top-scored expert's
  outcome counts.
- best: the top-scored recruited expert's outcome.
Cost is the sum of the recruited calls' recorded costs (k samples cost k calls).
The baselines run in the same call, on the same folds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from routers.aggregation import weighted_vote
from routers.base import Decision, RouteOptions, Router, RoutingError, TrainingSet, pick
from routers.registry import make_router
from routers.vocabulary import Aggregation, Policy


@dataclass
class EvalData(TrainingSet):
    """A training set plus what scoring needs: the recorded answers."""

    preds: np.ndarray | None = None
    """[queries, experts] recorded answers (e.g. option letters, None where none was extracted)."""

    def subset(self, idx: np.ndarray) -> EvalData:
        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return EvalData(
            texts=[self.texts[i] for i in idx], correct=self.correct[idx], experts=self.experts,
            categories=[self.categories[i] for i in idx], cost=take(self.cost), vectors=take(self.vectors),
            preds=take(self.preds),
        )


@dataclass
class Outcome:
    accuracy: float
    mean_cost: float | None
    n_queries: int
    consensus_rate: float | None = None
    """Share of queries whose recruited experts all gave one answer: the aggregator call is skipped there."""


@dataclass
class FoldScore:
    correct: np.ndarray
    cost: np.ndarray | None
    consensus: np.ndarray


def score(decisions: list[Decision], data: EvalData, aggregation: str) -> FoldScore:
    """Per-query correctness, cost and consensus of a fold's decisions."""
    col = {e: i for i, e in enumerate(data.experts)}
    correct = np.zeros(len(decisions))
    consensus = np.zeros(len(decisions), dtype=bool)
    cost = None if data.cost is None else np.zeros(len(decisions))
    for q, d in enumerate(decisions):
        chosen = [col[e] for e in d.experts]
        if cost is not None:
            cost[q] = data.cost[q, chosen].sum()
        if data.preds is not None and len(chosen) > 1:
            answers = {data.preds[q, j] for j in chosen}
            consensus[q] = len(answers) == 1 and None not in answers  # as the live consensus skip decides
        top = max(chosen, key=lambda j: d.scores.get(data.experts[j], 0.0))
        if aggregation == Aggregation.VOTE and data.preds is not None and len(chosen) > 1:
            winner = weighted_vote([data.preds[q, j] for j in chosen],
                                   [d.scores.get(data.experts[j], 0.0) for j in chosen])
            top = top if winner is None else chosen[winner]
        correct[q] = data.correct[q, top]
    return FoldScore(correct, cost, consensus)


def run_router(
    make: Callable[[], Router],
    data: EvalData,
    options: RouteOptions,
    aggregation: str,
    splits: list[tuple[np.ndarray, np.ndarray]],
    on_fold: Callable[[int], None] = lambda _i: None,
    budget_share: float | None = None,
) -> Outcome:
    """Cross-validated accuracy and cost. With ``budget_share``, λ is solved per training fold."""
    correct = np.zeros(len(data.texts))
    consensus = np.zeros(len(data.texts), dtype=bool)
    cost = None if data.cost is None else np.zeros(len(data.texts))
    for i, (train_idx, test_idx) in enumerate(splits):
        train = data.subset(train_idx)
        router = make()
        router.fit(train)
        if budget_share is not None:
            options = _budgeted(router, train, options, budget_share)
        test = data.subset(test_idx)
        decisions = router.route(test.texts, options, test.vectors, test.categories)
        fold = score(decisions, test, aggregation)
        correct[test_idx] = fold.correct
        consensus[test_idx] = fold.consensus
        if cost is not None:
            cost[test_idx] = fold.cost
        on_fold(i)
    idx = np.concatenate([t for _, t in splits])
    return Outcome(
        accuracy=float(correct[idx].mean()),
        mean_cost=None if cost is None else float(cost[idx].mean()),
        n_queries=len(idx),
        consensus_rate=float(consensus[idx].mean()) if data.preds is not None and options.k > 1 else None,
    )


def _budgeted(router: Router, train: EvalData, options: RouteOptions, share: float) -> RouteOptions:
    """Options whose λ holds mean cost ≤ share × the cost of the most accurate single expert (on train)."""
    if train.cost is None:
        raise RoutingError("a budget needs cost data, and this file records none")
    best = int(np.argmax(train.correct.mean(axis=0)))
    budget = share * float(train.cost[:, best].mean())
    lam = solve_lambda(router, train, options, budget)
    return RouteOptions(k=options.k, policy=Policy.COST, cost_lambda=lam, seed=options.seed)


def oracle(data: EvalData, idx: np.ndarray) -> Outcome:
    """Right whenever any expert was right, at the cheapest right expert's cost."""
    c = data.correct[idx]
    right = c.max(axis=1)
    mean_cost = None
    if data.cost is not None:
        costs = np.where(c >= right[:, None], data.cost[idx], np.inf)
        mean_cost = float(costs.min(axis=1).mean())
    return Outcome(float(right.mean()), mean_cost, len(idx))


def cross_validation_splits(n: int, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of a seeded k-fold split; every query is tested exactly once."""
    if k < 2:
        raise RoutingError(f"cross-validation needs at least 2 folds, got {k}")
    if n < k:
        raise RoutingError(f"{n} queries cannot be split into {k} folds")
    parts = [np.sort(p) for p in np.array_split(np.random.default_rng(seed).permutation(n), k)]
    return [(np.sort(np.concatenate(parts[:i] + parts[i + 1 :])), parts[i]) for i in range(k)]


def baselines(
    data: EvalData,
    splits: list[tuple[np.ndarray, np.ndarray]],
    k: int,
    seed: int,
    router_kwargs: dict[str, object],
) -> dict[str, dict[str, object]]:
    """best_single, per_category (top-1 and top-k vote), random and oracle, on the same splits."""
    idx = np.concatenate([t for _, t in splits])
    out: dict[str, dict[str, object]] = {}

    def one(name: str, opts: RouteOptions, aggregation: str) -> Outcome:
        return run_router(lambda: make_router(name, **router_kwargs), data, opts, aggregation, splits)

    single = one("best_single", RouteOptions(k=1), Aggregation.BEST)
    # The most frequent choice across folds names the best single expert.
    full = make_router("best_single")
    full.fit(data)
    out["best_single"] = {"accuracy": single.accuracy, "mean_cost": single.mean_cost,
                          "name": full.route(["-"], RouteOptions(k=1))[0].experts[0]}
    if any(c for c in data.categories):
        top1 = one("per_category", RouteOptions(k=1), Aggregation.BEST)
        topk = one("per_category", RouteOptions(k=k), Aggregation.VOTE)
        out["per_category"] = {"accuracy": top1.accuracy, "mean_cost": top1.mean_cost}
        out[f"per_category_top{k}_vote"] = {"accuracy": topk.accuracy, "mean_cost": topk.mean_cost}
    rnd = one("random", RouteOptions(k=1, seed=seed), Aggregation.BEST)
    out["random"] = {"accuracy": rnd.accuracy, "mean_cost": rnd.mean_cost}
    orc = oracle(data, idx)
    out["oracle"] = {"accuracy": orc.accuracy, "mean_cost": orc.mean_cost}
    return out


def solve_lambda(
    router: Router,
    train: EvalData,
    options: RouteOptions,
    budget: float,
    steps: int = 24,
) -> float:
    """The smallest cost weight λ whose routing of the training data keeps mean cost within ``budget``.

    Bisection on λ over the training folds only. Mean cost falls as λ grows, so
    the smallest λ that fits the budget is the most accurate choice that does.
    The fitted router scores the training queries once. Every router's cost
    policy picks by those scores − λ × each expert's mean training cost, so
    each step of the bisection only re-picks.
    """
    decisions = router.route(train.texts, RouteOptions(k=options.k, seed=options.seed), train.vectors)
    scores = np.array([[d.scores.get(e, 0.0) for e in train.experts] for d in decisions])
    unit_cost = train.cost.mean(axis=0)
    rng = np.random.default_rng(options.seed)

    def mean_cost(lam: float) -> float:
        opts = RouteOptions(k=options.k, policy=Policy.COST, cost_lambda=lam)
        return float(np.mean([train.cost[q, pick(s, opts, unit_cost, rng)].sum() for q, s in enumerate(scores)]))

    if mean_cost(0.0) <= budget:
        return 0.0
    hi = 1.0
    while mean_cost(hi) > budget:
        hi *= 4
        if hi > 1e12:
            raise RoutingError(f"no cost weight brings the mean cost under the budget {budget:g}")
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if mean_cost(mid) <= budget else (mid, hi)
    return hi
