"""Baseline routers behind the same interface: random, best single, per-category best, kNN.

The oracle needs the test outcomes, so the evaluator computes it rather than
a router.
"""

from __future__ import annotations

import numpy as np

from routers.base import Decision, RouteOptions, Router, TrainingSet, pick
from routers.embedding import Embedder
from routers.vocabulary import Policy


def _decision(experts: list[str], chosen: list[int], scores: np.ndarray, **extra: object) -> Decision:
    return Decision(
        experts=[experts[i] for i in chosen],
        scores={e: float(s) for e, s in zip(experts, scores)},
        aggregator=experts[int(np.argmax(scores))],
        **extra,
    )


class RandomRouter(Router):
    """k distinct experts chosen uniformly: the floor any router must clear."""

    def __init__(self, **_: object) -> None:
        self.experts: list[str] = []

    def fit(self, train: TrainingSet) -> None:
        self.experts = train.experts

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        rng = np.random.default_rng(options.seed)
        m, k = len(self.experts), min(options.k, len(self.experts))
        return [_decision(self.experts, list(rng.choice(m, k, replace=False)), np.ones(m)) for _ in texts]


class BestSingleRouter(Router):
    """Always the expert with the best training accuracy (or best utility under the cost policy)."""

    def __init__(self, **_: object) -> None:
        self.experts: list[str] = []

    def fit(self, train: TrainingSet) -> None:
        self.experts = train.experts
        self.accuracy = train.correct.mean(axis=0)
        self.cost = None if train.cost is None else train.cost.mean(axis=0)

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        single = RouteOptions(k=1, policy=Policy.COST if options.policy == Policy.COST else Policy.TOPK,
                              cost_lambda=options.cost_lambda)
        chosen = pick(self.accuracy, single, self.cost, np.random.default_rng(0))
        return [_decision(self.experts, chosen, self.accuracy) for _ in texts]


class PerCategoryRouter(Router):
    """Composition of Experts' two steps: a category per query, then that category's best experts.

    Categories come from the data when present. Otherwise, and for categories
    unseen in training, the overall accuracy decides.
    """

    def __init__(self, **_: object) -> None:
        self.experts: list[str] = []

    def fit(self, train: TrainingSet) -> None:
        self.experts = train.experts
        self.overall = train.correct.mean(axis=0)
        self.cost = None if train.cost is None else train.cost.mean(axis=0)
        self.by_category: dict[str, np.ndarray] = {}
        cats = np.array([c or "" for c in train.categories])
        for cat in set(cats.tolist()) - {""}:
            self.by_category[cat] = train.correct[cats == cat].mean(axis=0)

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        rng = np.random.default_rng(options.seed)
        cats = categories or [None] * len(texts)
        out = []
        for cat in cats:
            scores = self.by_category.get(cat or "", self.overall)
            out.append(_decision(self.experts, pick(scores, options, self.cost, rng), scores, skills=[cat or ""]))
        return out


class KnnRouter(Router):
    """The experts that did best on the n most similar training queries (cosine, MiniLM)."""

    def __init__(self, embedder: Embedder, neighbours: int = 64, prior: float = 4.0, **_: object) -> None:
        self.embedder = embedder
        self.neighbours = neighbours
        self.prior = prior

    def fit(self, train: TrainingSet) -> None:
        import faiss

        vecs = train.vectors if train.vectors is not None else self.embedder.encode(train.texts)
        self.index = faiss.IndexFlatIP(vecs.shape[1])
        self.index.add(np.ascontiguousarray(vecs, dtype=np.float32))
        self.correct = train.correct
        self.experts = train.experts
        self.overall = train.correct.mean(axis=0)
        self.cost = None if train.cost is None else train.cost.mean(axis=0)

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        vecs = vectors if vectors is not None else self.embedder.encode(texts)
        n = min(self.neighbours, self.index.ntotal)
        _, ids = self.index.search(np.ascontiguousarray(vecs, dtype=np.float32), n)
        rng = np.random.default_rng(options.seed)
        out = []
        for row in ids:
            scores = (self.correct[row].sum(axis=0) + self.prior * self.overall) / (len(row) + self.prior)
            out.append(_decision(self.experts, pick(scores, options, self.cost, rng), scores))
        return out


class AllExpertsRouter(Router):
    """Every expert answers once. The pipeline's fallback when no profiles exist for its experts."""

    def __init__(self, experts: list[str] | None = None, fallback: str | None = None, **_: object) -> None:
        self.experts = list(experts or [])
        self.fallback = fallback

    def fit(self, train: TrainingSet) -> None:
        self.experts = train.experts

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        if not self.experts:
            raise RuntimeError("the all-experts router has no experts: call fit() or pass experts")
        scores = np.linspace(1.0, 0.5, len(self.experts))  # config order breaks ties
        return [
            _decision(self.experts, list(range(len(self.experts))), scores, fallback=self.fallback) for _ in texts
        ]
