"""The Router interface: queries and training outcomes in, decisions out.

A router knows nothing about Ray, HTTP or redis. That keeps it testable offline
on recorded outcomes. The implementations are listed by name in
``routers.registry``, as in RouteLLM, so that this module imports none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from routers.vocabulary import POLICIES, Mode, Policy
from workers.errors import UserError


class RoutingError(UserError, ValueError):
    """Input a router cannot route: k < 1, an empty pool, unknown names."""


@dataclass(frozen=True)
class Prices:
    """USD per token, per expert, in the training set's expert order."""

    input: np.ndarray
    output: np.ndarray


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
    answers: np.ndarray | None = None
    """[queries, experts] the answers as the vote compares them (an option letter, a number), None where none was
    extracted: what agreement and votes are measured on."""
    output_tokens: np.ndarray | None = None
    """[queries, experts] the length of each answer, where recorded: what per-query cost estimates learn."""
    prices: Prices | None = None
    """USD per input and output token of each expert, where known."""

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
    escalate: list[str] = field(default_factory=list)
    """A cascade's second round: asked only when the first round's answers disagree."""
    mode: Mode = Mode.ENSEMBLE
    """How the scheduler runs it: separate answers then aggregation, or the latent mixture's one pass."""

    @property
    def latent(self) -> bool:
        return self.mode == Mode.LATENT


@dataclass
class RouteOptions:
    k: int = 3
    policy: str = Policy.TOPK
    cost_lambda: float = 0.0
    seed: int | None = None
    per_call: bool = False
    """λ prices an expert call instead of a dollar: a budget on the number of experts (adaptive, cascade)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise RoutingError(f"k must be at least 1, got {self.k}")
        if self.policy not in POLICIES:
            raise RoutingError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.cost_lambda < 0:
            raise RoutingError("the cost weight lambda must be non-negative")


class Router(ABC):
    """Learns from recorded outcomes, then routes whole windows of queries."""

    @abstractmethod
    def fit(self, train: TrainingSet) -> None:
        """Learn from every expert's outcomes on the training queries."""

    @abstractmethod
    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        """Route a whole window at once (one embedding pass, one index search). ``vectors`` are the texts'
        embeddings when the caller has them; ``categories`` are known labels, which only offline data has."""

    def supports(self, policy: str) -> bool:
        """Whether this router can route under a policy: the planned ones need a per-query quality estimate."""
        return policy not in (Policy.ADAPTIVE, Policy.CASCADE)

    def state(self) -> dict[str, np.ndarray]:
        """What a fitted router needs to route again, as arrays: saved with a profile."""
        raise RoutingError(f"{type(self).__name__} cannot be saved")

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        raise RoutingError(f"{type(self).__name__} cannot be loaded")

    def save(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / f"{name}.npz", **self.state())

    def restore(self, folder: Path, name: str) -> None:
        """Load what ``save`` wrote; a missing or corrupt file is a ProfileError that names it."""
        from routers.profiles import read_artifact

        def arrays(path: Path) -> dict[str, np.ndarray]:
            with np.load(path) as npz:
                return {k: npz[k] for k in npz.files}

        self.load_state(read_artifact(folder / f"{name}.npz", arrays))


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


def pick(scores: np.ndarray, options: RouteOptions, cost: np.ndarray | None, rng: np.random.Generator) -> list[int]:
    """Choose expert indices for one query from per-expert expected accuracy.

    - topk: the k best, without replacement.
    - cost: the k best by accuracy − λ·cost (cost in the profile's units).
    - symbolic: k draws with replacement, in proportion to the scores (callers pass paper weights).
    """
    m = len(scores)
    if options.policy in (Policy.ADAPTIVE, Policy.CASCADE):
        raise RoutingError(f"the {options.policy} policy needs a router with a per-query quality estimate "
                           "(cluster, logistic or irt)")
    if options.policy == Policy.SYMBOLIC:
        w = np.clip(scores, 0, None)
        w = w / w.sum() if w.sum() > 0 else np.full(m, 1.0 / m)
        return list(rng.choice(m, size=options.k, replace=True, p=w))
    utility = scores if options.policy == Policy.TOPK or cost is None else scores - options.cost_lambda * cost
    k = min(options.k, m)
    return list(np.argsort(-utility, kind="stable")[:k])
