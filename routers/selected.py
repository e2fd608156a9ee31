"""``auto``: the router that selection (``routers.scoring.selection``) chose on a profile's data, served under
that name, and the candidates selection chooses among.

Candidates that cannot run a planned policy (adaptive, cascade) route with top-k under the same k, live as in
selection.
"""

from __future__ import annotations

import numpy as np

from routers.base import Decision, RouteOptions, Router, TrainingSet
from routers.learned import PLANNED
from routers.vocabulary import Policy

CANDIDATES: tuple[str, ...] = ("cluster", "logistic", "irt", "skill", "knn", "per_category", "best_single")
LEARNED = ("cluster", "logistic", "irt")


def options_for(name: str, options: RouteOptions) -> RouteOptions:
    """A candidate's options: its own policy, or top-k where it has no per-query estimate to plan with."""
    if options.policy in PLANNED and name not in LEARNED:
        return RouteOptions(k=options.k, policy=Policy.TOPK, seed=options.seed)
    return options


class Selected(Router):
    """``auto``: the router that selection chose on a profile's data. Its decisions name the choice and the
    cross-validated scores it was chosen by, so a trace says why this router routed."""

    def __init__(self, router: Router, name: str, why: dict[str, object]) -> None:
        self.router, self.name, self.why = router, name, why

    def fit(self, train: TrainingSet) -> None:
        self.router.fit(train)

    def supports(self, policy: str) -> bool:
        return True  # a policy the chosen router cannot plan with runs as top-k (``options_for``)

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        if self.name not in LEARNED:
            options = options_for(self.name, options)
        decisions = self.router.route(texts, options, vectors, categories)
        for d in decisions:
            d.trace["selected"] = {"router": self.name, **self.why}
        return decisions
