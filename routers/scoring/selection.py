"""Router selection: every candidate is fitted on the data and the one that scores best in cross-validation is
used, so that no deployment runs a router that loses to a simple baseline on its own data.

- ``select``: k-fold cross-validation of every candidate on one data set, all
  under the same options and aggregation; the best mean accuracy wins (ties go
  to the earlier candidate, the simpler ones come last so they must be beaten
  outright). This is what ``concilium profile`` records.
- ``nested``: the honest score of selecting. For each outer fold, ``select``
  runs on the outer training part only, and its choice is scored on the outer
  test part. This is ``concilium eval --router auto``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from routers.base import RouteOptions, Router
from routers.registry import make_router
from routers.scoring.crossval import CostTarget, EvalData, cross_validation_splits, run_router
from routers.selected import CANDIDATES, options_for


@dataclass
class Selection:
    chosen: str
    scores: dict[str, float]
    """Each candidate's cross-validated accuracy."""
    folds: int
    options: dict[str, object] = field(default_factory=dict)
    repeats: int = 1

    def summary(self) -> dict[str, object]:
        return {"chosen": self.chosen, "scores": self.scores, "folds": self.folds, "repeats": self.repeats,
                "options": self.options,
                "rule": "the best cross-validated accuracy (the mean over the repeats); ties go to the earlier "
                        "candidate"}


SMALL_SET = 200
"""Below this many questions one split decides too much (a starter profile has 32): the CV is repeated."""
SMALL_SET_REPEATS = 5


def select(data: EvalData, make: Callable[[str], Router], options: RouteOptions, aggregation: str,
           folds: int = 3, seed: int = 0, candidates: tuple[str, ...] = CANDIDATES,
           on_candidate: Callable[[str], None] = lambda _c: None, target: CostTarget | None = None) -> Selection:
    """Each candidate's accuracy by k-fold CV, repeated with other seeds on a small set, and the best one. With a
    cost target, each candidate is held to it (its λ solved on every training part), as a budgeted deployment
    will be."""
    repeats = SMALL_SET_REPEATS if len(data.texts) < SMALL_SET else 1
    splits = [cross_validation_splits(len(data.texts), folds, seed + r) for r in range(repeats)]
    scores = {}
    for name in candidates:
        scores[name] = float(np.mean([run_router(lambda n=name: make(n), data, options_for(name, options),
                                                 aggregation, s, budget=target).accuracy for s in splits]))
        on_candidate(name)
    chosen = max(candidates, key=lambda c: (scores[c], -candidates.index(c)))
    return Selection(chosen, scores, folds, {"k": options.k, "policy": str(options.policy),
                                             "aggregation": str(aggregation)}, repeats)


@dataclass
class NestedOutcome:
    accuracy: float
    chosen: list[str]
    """The candidate each outer fold's selection chose."""
    inner_scores: list[dict[str, float]]
    mean_cost: float | None = None
    mean_experts: float = 1.0


def nested(data: EvalData, make: Callable[[str], Router], options: RouteOptions, aggregation: str,
           splits: list[tuple[np.ndarray, np.ndarray]], inner_folds: int = 3, seed: int = 0,
           on_fold: Callable[[int], None] = lambda _i: None, target: CostTarget | None = None) -> NestedOutcome:
    right, spent, calls = np.zeros(len(data.texts)), np.zeros(len(data.texts)), np.zeros(len(data.texts))
    chosen, inner = [], []
    for i, (train_idx, test_idx) in enumerate(splits):
        pick = select(data.subset(train_idx), make, options, aggregation, inner_folds, seed, target=target)
        chosen.append(pick.chosen)
        inner.append(pick.scores)
        outcome_split = [(np.arange(len(train_idx)), np.arange(len(train_idx), len(train_idx) + len(test_idx)))]
        joined = data.subset(train_idx).join(data.subset(test_idx))
        fold = run_router(lambda n=pick.chosen: make(n), joined, options_for(pick.chosen, options), aggregation,
                          outcome_split, budget=target)
        right[test_idx] = fold.accuracy
        spent[test_idx] = fold.mean_cost or 0.0
        calls[test_idx] = fold.mean_experts
        on_fold(i)
    idx = np.concatenate([t for _, t in splits])
    return NestedOutcome(float(right[idx].mean()), chosen, inner,
                         None if data.cost is None else float(spent[idx].mean()), float(calls[idx].mean()))


def candidate_factory(embedder: object) -> Callable[[str], Router]:
    return lambda name: make_router(name, embedder=embedder)
