"""Served configurations: what a request is sent with, named, and the grid that selection chooses from.

A configuration is a router, how many experts it recruits, how their answers become one, the policy and its cost
weight (or a cost target from which λ is solved on training data), or an expert answering alone. The grid for a
fleet holds the best single expert alone, every candidate router at k = 1 and as a weighted vote at each k up
to three, the learned routers' adaptive and cascade plans, and one synthesis: enough to let a fleet beat its
best expert, or to show that it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from routers.base import RouteOptions
from routers.scoring.crossval import CostTarget
from routers.selected import CANDIDATES, LEARNED
from routers.vocabulary import SYNTHESISING, Aggregation, Policy

MAX_K = 3
"""The largest k the grid tries: past three, votes of small fleets gain little and cost linearly."""


@dataclass(frozen=True)
class Candidate:
    router: str = "best_single"
    k: int = 1
    aggregation: Aggregation = Aggregation.BEST
    policy: Policy = Policy.TOPK
    cost_lambda: float = 0.0
    target: CostTarget | None = None
    """A cost target to hold: λ is solved on the training part (``crossval.solve_lambda``), and overrides
    ``cost_lambda``."""
    alone: str | None = None
    """An expert that answers by itself: the allow-list holds it alone, k = 1, its own answer."""
    seed: int = field(default=0, compare=False)

    @property
    def name(self) -> str:
        if self.alone is not None:
            return f"{self.alone} alone"
        parts = [self.router, f"k={self.k}", str(self.aggregation)]
        if self.policy != Policy.TOPK:
            parts.append(str(self.policy))
        if self.target is not None:
            parts.append(f"calls<={self.target.max_experts:g}" if self.target.max_experts is not None
                         else f"cost<={self.target.share:g}x best")
        elif self.cost_lambda:
            parts.append(f"lambda={self.cost_lambda:g}")
        return " ".join(parts)

    @property
    def synthesises(self) -> bool:
        """Whether an aggregator writes the answer: then only a live run can score it."""
        return self.alone is None and self.aggregation in SYNTHESISING and self.k > 1

    def options(self) -> RouteOptions:
        return RouteOptions(k=self.k, policy=self.policy, cost_lambda=self.cost_lambda, seed=self.seed)


def grid(n_experts: int, routers: tuple[str, ...] = CANDIDATES, synthesis_router: str = "cluster",
         target: CostTarget | None = None) -> list[Candidate]:
    """Every configuration selection weighs for a fleet of this size (the best single expert alone is added by
    the caller, who knows which expert that is). With a cost target, each is held to it."""
    top = min(MAX_K, n_experts)
    policy = Policy.COST if target is not None and target.share is not None else Policy.TOPK
    out = [Candidate(r, 1, Aggregation.BEST, policy, target=target) for r in routers]
    for k in range(2, top + 1):
        out += [Candidate(r, k, Aggregation.VOTE, policy, target=target) for r in routers]
    if top > 1:
        for plan in (Policy.ADAPTIVE, Policy.CASCADE):
            out += [Candidate(r, top, Aggregation.VOTE, plan, target=target) for r in routers if r in LEARNED]
        out.append(Candidate(synthesis_router, top, Aggregation.SYNTHESIZE, policy, target=target))
    return out
