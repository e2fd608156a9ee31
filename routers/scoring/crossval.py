"""Offline evaluation on recorded outcomes, RouterBench-style, with k-fold cross-validation.

A router sees only the training folds. Its decisions on the test fold are scored
with the recorded outcomes of the experts it chose, by the rules that run live:
- a cascade's escalation is asked only when the first round's recorded answers
  disagree (``plans.agree``, the live consensus rule);
- vote: ``weighted_vote``, the live aggregator's vote, over the recorded
  answers of everyone asked, with multiplicity, each weighted by the
  decision's score for that expert; the winning voter's outcome counts.
  Without recorded answers, or when no one asked recorded one, the top-scored
  expert's outcome counts;
- best: the top-scored asked expert's outcome.
Cost is the sum of the asked calls' recorded costs (k samples cost k calls).
Calibration: a router's scores are its estimates of each expert's chance of
being right; their expected calibration error over 10 bins is reported.
A cost budget (``budget_share``) or a mean-experts budget (``max_experts``)
is met by solving λ on the training folds with cross-fitted decisions: each
training query routed by a router that did not see it, as the test queries
will be, so that the budget holds on the test folds too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import numpy as np

from routers.aggregation import weighted_vote
from routers.base import Decision, RouteOptions, Router, RoutingError, TrainingSet
from routers.plans import agree
from routers.registry import make_router
from routers.vocabulary import Aggregation, Policy

CALIBRATION_BINS = 10
BUDGET_MARGIN = 0.03
"""λ is solved for 97% of the budget: the cross-fitted training estimate and the test folds differ by a few
percent, and the budget must hold on the test folds."""


@dataclass
class EvalData(TrainingSet):
    """A training set that can be cut into folds."""

    def subset(self, idx: np.ndarray) -> EvalData:
        rows = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in rows.items():
            if isinstance(value, np.ndarray):
                rows[name] = value[idx]
            elif name in ("texts", "categories"):
                rows[name] = [value[i] for i in idx]
        return replace(self, **rows)

    def join(self, other: EvalData) -> EvalData:
        """This set's rows, then the other's (same experts): a training part and a test part as one."""
        rows = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, np.ndarray) and isinstance(theirs, np.ndarray):
                rows[f.name] = np.concatenate([mine, theirs])
            elif isinstance(mine, np.ndarray) or isinstance(theirs, np.ndarray):
                rows[f.name] = None  # recorded on one side only: unknown for the whole
            elif f.name in ("texts", "categories"):
                rows[f.name] = list(mine) + list(theirs)
        return replace(self, **rows)


@dataclass
class Outcome:
    accuracy: float
    mean_cost: float | None
    n_queries: int
    consensus_rate: float | None = None
    """Share of queries whose asked experts all gave one answer: the aggregator call is skipped there."""
    mean_experts: float = 1.0
    """Expert calls per query, escalations included."""
    calibration_error: float | None = None
    """ECE of the scores as probabilities of a right answer, over every (query, expert)."""
    picks: list[Pick] | None = None
    """Per query (in the data's order): who was asked and whose answer counted, to compare with a live run."""


@dataclass(frozen=True)
class Pick:
    asked: tuple[str, ...]
    """Every expert asked, escalations included, in the decision's order."""
    answered_by: str
    correct: float


@dataclass
class FoldScore:
    correct: np.ndarray
    cost: np.ndarray | None
    consensus: np.ndarray
    calls: np.ndarray
    picks: list[tuple[list[int], int]] = field(default_factory=list)
    """Per query: the experts asked and the one whose outcome counted (column indices)."""


def scored_as(aggregation: str, k: int) -> Aggregation:
    """How recorded outcomes score a deployment's aggregation. A vote is the recorded answers' vote. An
    aggregation that writes a new answer (synthesis, moa) is scored by its writer's own answer, the top-scored
    expert's, because no synthesis is recorded; a vote over free-text answers whose keys cannot be extracted
    would instead favour whichever expert rambles a key. One expert is scored by its own answer."""
    return Aggregation.VOTE if aggregation == Aggregation.VOTE and k > 1 else Aggregation.BEST


def asked(decision: Decision, data: TrainingSet, q: int) -> list[int]:
    """The experts a decision asks of query ``q``: its own, plus its escalation when their answers disagree."""
    col = {e: i for i, e in enumerate(data.experts)}
    first = [col[e] for e in decision.experts]
    if decision.escalate and data.answers is not None and not agree([data.answers[q, j] for j in first]):
        return first + [col[e] for e in decision.escalate]
    return first


def score(decisions: list[Decision], data: TrainingSet, aggregation: str) -> FoldScore:
    """Per-query correctness, cost, consensus and calls of a fold's decisions."""
    correct = np.zeros(len(decisions))
    consensus = np.zeros(len(decisions), dtype=bool)
    calls = np.zeros(len(decisions))
    cost = None if data.cost is None else np.zeros(len(decisions))
    picks: list[tuple[list[int], int]] = []
    for q, d in enumerate(decisions):
        chosen = asked(d, data, q)
        calls[q] = len(chosen)
        if cost is not None:
            cost[q] = data.cost[q, chosen].sum()
        if data.answers is not None and len(chosen) > 1:
            consensus[q] = agree([data.answers[q, j] for j in chosen])
        top = max(chosen, key=lambda j: d.scores.get(data.experts[j], 0.0))
        if aggregation == Aggregation.VOTE and data.answers is not None and len(chosen) > 1:
            winner = weighted_vote([data.answers[q, j] for j in chosen],
                                   [d.scores.get(data.experts[j], 0.0) for j in chosen])
            top = top if winner is None else chosen[winner]
        correct[q] = data.correct[q, top]
        picks.append((chosen, top))
    return FoldScore(correct, cost, consensus, calls, picks)


def calibration_error(probabilities: np.ndarray, outcomes: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error: the bin-weighted gap between mean predicted and observed rates."""
    p, y = np.ravel(probabilities), np.ravel(outcomes)
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.mean() * abs(p[in_bin].mean() - y[in_bin].mean())
    return float(total)


@dataclass(frozen=True)
class CostTarget:
    """What λ must hold on the test folds: a share of the best single expert's cost, or mean expert calls."""

    share: float | None = None
    max_experts: float | None = None

    def limit(self, train: TrainingSet) -> tuple[Callable[[FoldScore], float], float]:
        """The measure a fold is held to, and its limit on this training data."""
        if self.max_experts is not None:
            return (lambda s: float(s.calls.mean())), self.max_experts
        if train.cost is None:
            raise RoutingError("a budget needs cost data, and this file records none")
        best = int(np.argmax(train.correct.mean(axis=0)))
        return (lambda s: float(s.cost.mean())), self.share * float(train.cost[:, best].mean())


def run_router(
    make: Callable[[], Router],
    data: EvalData,
    options: RouteOptions,
    aggregation: str,
    splits: list[tuple[np.ndarray, np.ndarray]],
    on_fold: Callable[[int], None] = lambda _i: None,
    budget: CostTarget | None = None,
) -> Outcome:
    """Cross-validated accuracy, cost, calls and calibration. With a budget, λ is solved per training fold."""
    def fold_options(train: EvalData) -> list[RouteOptions]:
        return [options if budget is None else solve_lambda(make, train, options, aggregation, budget)]

    return sweep(make, data, fold_options, aggregation, splits, on_fold)[0]


def sweep(
    make: Callable[[], Router],
    data: EvalData,
    fold_options: Callable[[EvalData], list[RouteOptions]],
    aggregation: str,
    splits: list[tuple[np.ndarray, np.ndarray]],
    on_fold: Callable[[int], None] = lambda _i: None,
) -> list[Outcome]:
    """One outcome per option: each fold's router is fitted once and routes the test fold under every option its
    training part gives (a λ sweep, or a budget's solved λ)."""
    n, per_option = len(data.texts), None
    for i, (train_idx, test_idx) in enumerate(splits):
        train, test = data.subset(train_idx), data.subset(test_idx)
        choices = fold_options(train)
        router = make()
        router.fit(train)
        per_option = per_option or [_Tally(n, data) for _ in choices]
        for tally, opts in zip(per_option, choices):
            decisions = router.route(test.texts, opts, test.vectors, test.categories)
            tally.add(test_idx, decisions, score(decisions, test, aggregation), data.experts)
        on_fold(i)
    idx = np.concatenate([t for _, t in splits])
    return [tally.outcome(idx, data) for tally in per_option]


class _Tally:
    """Per-query results of one option across the folds."""

    def __init__(self, n: int, data: EvalData) -> None:
        self.correct, self.consensus, self.calls = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n)
        self.cost = None if data.cost is None else np.zeros(n)
        self.probabilities = np.zeros(data.correct.shape)
        self.picks: list[Pick | None] = [None] * n

    def add(self, idx: np.ndarray, decisions: list[Decision], fold: FoldScore, experts: list[str]) -> None:
        self.correct[idx], self.consensus[idx], self.calls[idx] = fold.correct, fold.consensus, fold.calls
        self.probabilities[idx] = [[d.scores.get(e, 0.0) for e in experts] for d in decisions]
        if self.cost is not None:
            self.cost[idx] = fold.cost
        for q, (asked_cols, top), right in zip(idx, fold.picks, fold.correct):
            self.picks[q] = Pick(tuple(experts[j] for j in asked_cols), experts[top], float(right))

    def outcome(self, idx: np.ndarray, data: EvalData) -> Outcome:
        return Outcome(
            accuracy=float(self.correct[idx].mean()),
            mean_cost=None if self.cost is None else float(self.cost[idx].mean()),
            n_queries=len(idx),
            consensus_rate=(float(self.consensus[idx].mean())
                            if data.answers is not None and self.calls[idx].max() > 1 else None),
            mean_experts=float(self.calls[idx].mean()),
            calibration_error=calibration_error(np.clip(self.probabilities[idx], 0, 1), data.correct[idx]),
            picks=self.picks,
        )


def solve_lambda(make: Callable[[], Router], train: EvalData, options: RouteOptions, aggregation: str,
                 budget: CostTarget, inner_folds: int = 3, steps: int = 20) -> RouteOptions:
    """Options whose λ keeps the budget on cross-fitted training decisions; the cost policy unless the options
    ask for a planned one.

    Bisection: the measure (mean cost, or mean calls) falls as λ grows, so the smallest λ that fits is the most
    accurate choice that does. Each inner router is fitted once; every step only routes again.
    """
    measure, limit = budget.limit(train)
    limit *= 1 - BUDGET_MARGIN
    policy = options.policy if options.policy in (Policy.ADAPTIVE, Policy.CASCADE) else Policy.COST
    inner = []
    for fit_idx, held_idx in cross_validation_splits(len(train.texts), inner_folds, options.seed or 0):
        router = make()
        router.fit(train.subset(fit_idx))
        inner.append((router, train.subset(held_idx)))

    per_call = budget.max_experts is not None

    def value(lam: float) -> float:
        opts = RouteOptions(k=options.k, policy=policy, cost_lambda=lam, seed=options.seed, per_call=per_call)
        parts = [(len(held.texts), measure(score(r.route(held.texts, opts, held.vectors, held.categories),
                                                  held, aggregation))) for r, held in inner]
        return sum(n * v for n, v in parts) / sum(n for n, _ in parts)

    lam = 0.0
    if value(0.0) > limit:
        hi = 1.0
        while value(hi) > limit:
            hi *= 4
            if hi > 1e12:
                raise RoutingError(f"no cost weight brings the mean under the budget {limit:g}")
        lo = 0.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if value(mid) <= limit else (mid, hi)
        lam = hi
    return RouteOptions(k=options.k, policy=policy, cost_lambda=lam, seed=options.seed, per_call=per_call)


def baselines(
    data: EvalData,
    splits: list[tuple[np.ndarray, np.ndarray]],
    k: int,
    seed: int,
    router_kwargs: dict[str, object],
) -> dict[str, dict[str, object]]:
    """best_single, per_category (top-1 and top-k vote), random and oracle, on the same splits: every router
    figure is reported beside these."""
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
