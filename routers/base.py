"""The Router interface: queries and training outcomes in, decisions out.

A router knows nothing about Ray, HTTP or redis. That keeps it testable offline
on recorded outcomes. Implementations register by name, as in RouteLLM, so the
CLI and the service pick one by a string.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


class RoutingError(ValueError):
    """Input a router cannot route: k < 1, an empty pool, unknown names."""


@dataclass
class TrainingSet:
    """What a router learns from: per-query outcomes of every expert in the pool."""

    texts: list[str]
    correct: np.ndarray
    """[queries, experts] in [0, 1]."""
    experts: list[str]
    categories: list[str | None]
    cost: np.ndarray | None = None
    """[queries, experts] in USD, where recorded."""
    vectors: np.ndarray | None = None
    """[queries, dim] query embeddings, when the caller has them already."""

    def __post_init__(self) -> None:
        if len(self.texts) == 0:
            raise RoutingError("the training set is empty")
        if self.correct.shape != (len(self.texts), len(self.experts)):
            raise RoutingError(
                f"correctness is {self.correct.shape}, expected ({len(self.texts)}, {len(self.experts)})"
            )


@dataclass
class Decision:
    """One query's routing: who answers (with multiplicity), who aggregates, and why."""

    experts: list[str]
    """Recruited experts; a name twice means two samples from that expert."""
    scores: dict[str, float]
    """Per-expert score the policy used (expected accuracy, utility or weight)."""
    aggregator: str | None = None
    skills: list[str] = field(default_factory=list)
    fallback: str | None = None
    """Set when the normal path could not run, e.g. no skills found: says what was done instead."""
    trace: dict[str, object] = field(default_factory=dict)


@dataclass
class RouteOptions:
    k: int = 3
    policy: str = "topk"
    """'symbolic' (the paper's sampler), 'topk', or 'cost'."""
    cost_lambda: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise RoutingError(f"k must be at least 1, got {self.k}")
        if self.policy not in POLICIES:
            raise RoutingError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.cost_lambda < 0:
            raise RoutingError("the cost weight lambda must be non-negative")


POLICIES = ("symbolic", "topk", "cost")


class Router(Protocol):
    name: str

    def fit(self, train: TrainingSet) -> None: ...

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None) -> list[Decision]:
        """Route a whole window at once (one embedding pass, one index search)."""
        ...


@runtime_checkable
class OnlineRouter(Protocol):
    """A router that learns from feedback on its live decisions."""

    def learn(self, decision: Decision, expert: str, correct: float) -> bool:
        """Count one more answer by ``expert`` for this decision's query, ``correct`` of it right (0..1)."""
        ...


@runtime_checkable
class BoundedRouter(Protocol):
    """A router with limits of its own on the options, which it checks before a request queues."""

    def check(self, options: RouteOptions, allowed: list[str] | None) -> None:
        """Raise RoutingError when ``options`` or the expert allow-list ask for what this router cannot do."""
        ...


ROUTERS: dict[str, Callable[..., Router]] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        ROUTERS[name] = cls
        cls.name = name
        return cls

    return deco


def make_router(name: str, **kwargs: object) -> Router:
    import routers.baselines  # noqa: F401  (registers the built-in routers)
    import routers.symbolic  # noqa: F401

    try:
        factory = ROUTERS[name]
    except KeyError:
        raise RoutingError(f"unknown router {name!r}; available: {', '.join(sorted(ROUTERS))}") from None
    return factory(**kwargs)


def pick(scores: np.ndarray, options: RouteOptions, cost: np.ndarray | None, rng: np.random.Generator) -> list[int]:
    """Choose expert indices for one query from per-expert expected accuracy.

    - topk: the k best, without replacement.
    - cost: the k best by accuracy − λ·cost (cost in the profile's units).
    - symbolic: k draws with replacement, in proportion to the scores (callers pass paper weights).
    """
    m = len(scores)
    if options.policy == "symbolic":
        w = np.clip(scores, 0, None)
        w = w / w.sum() if w.sum() > 0 else np.full(m, 1.0 / m)
        return list(rng.choice(m, size=options.k, replace=True, p=w))
    utility = scores if options.policy == "topk" or cost is None else scores - options.cost_lambda * cost
    k = min(options.k, m)
    return list(np.argsort(-utility, kind="stable")[:k])
