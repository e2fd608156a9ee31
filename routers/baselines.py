"""Baseline routers behind the same interface: random, best single, per-category best, kNN, every expert.

Each is a first-class router: it can be fitted, saved with a profile, and served live.

The oracle needs the test outcomes, so the evaluator computes it rather than
a router.
"""

from __future__ import annotations

import numpy as np

from routers.base import Decision, RouteOptions, Router, TrainingSet, pick
from routers.embedding import TextEncoder
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

    def state(self) -> dict[str, np.ndarray]:
        return {"experts": np.array(self.experts)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.experts = state["experts"].tolist()


class BestSingleRouter(Router):
    """Always the expert with the best training accuracy (or best utility under the cost policy)."""

    def __init__(self, **_: object) -> None:
        self.experts: list[str] = []

    def fit(self, train: TrainingSet) -> None:
        self.experts = list(train.experts)
        self.accuracy = train.correct.mean(axis=0)
        self.cost = np.zeros(0) if train.cost is None else train.cost.mean(axis=0)

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        single = RouteOptions(k=1, policy=Policy.COST if options.policy == Policy.COST else Policy.TOPK,
                              cost_lambda=options.cost_lambda)
        chosen = pick(self.accuracy, single, self.cost if len(self.cost) else None, np.random.default_rng(0))
        return [_decision(self.experts, chosen, self.accuracy) for _ in texts]

    def state(self) -> dict[str, np.ndarray]:
        return {"experts": np.array(self.experts), "accuracy": self.accuracy, "cost": self.cost}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.experts, self.accuracy, self.cost = state["experts"].tolist(), state["accuracy"], state["cost"]


class PerCategoryRouter(Router):
    """Composition of Experts' two steps: a category per query, then that category's best experts.

    Offline, the categories come from the data; live, from the request when its
    caller knows it. A query without one takes the nearest category centroid of
    the training embeddings (a nearest-centroid classifier); for a category
    unseen in training, or with no embeddings to go on, the overall accuracy
    decides.
    """

    def __init__(self, embedder: TextEncoder | None = None, **_: object) -> None:
        self.embedder = embedder
        self.experts: list[str] = []
        self.names: list[str] = []
        self.centroids = np.zeros((0, 0), dtype=np.float32)

    def fit(self, train: TrainingSet) -> None:
        self.experts = list(train.experts)
        self.overall = train.correct.mean(axis=0)
        self.cost = np.zeros(0) if train.cost is None else train.cost.mean(axis=0)
        cats = np.array([c or "" for c in train.categories])
        self.names = sorted(set(cats.tolist()) - {""})
        self.table = np.array([train.correct[cats == c].mean(axis=0) for c in self.names]).reshape(-1, len(self.experts))
        vecs = train.vectors if train.vectors is not None or self.embedder is None else self.embedder.encode(train.texts)
        if vecs is not None and self.names:
            means = np.array([vecs[cats == c].mean(axis=0) for c in self.names], dtype=np.float32)
            self.centroids = means / np.linalg.norm(means, axis=1, keepdims=True)

    def categories_of(self, texts: list[str], vectors: np.ndarray | None) -> list[str | None]:
        """The nearest category centroid of each query: what stands in for a category live."""
        if not len(self.centroids) or (vectors is None and self.embedder is None):
            return [None] * len(texts)
        vecs = vectors if vectors is not None else self.embedder.encode(texts)
        return [self.names[i] for i in np.argmax(vecs @ self.centroids.T, axis=1)]

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        rng = np.random.default_rng(options.seed)
        given = categories or [None] * len(texts)
        guessed = self.categories_of(texts, vectors) if None in given else given
        index = {c: i for i, c in enumerate(self.names)}
        cost = self.cost if len(self.cost) else None
        out = []
        for known, nearest in zip(given, guessed):
            cat = known if known is not None else nearest
            scores = self.table[index[cat]] if cat in index else self.overall
            out.append(_decision(self.experts, pick(scores, options, cost, rng), scores, skills=[cat or ""],
                                 trace={"category": cat, "from": "data" if known is not None else "nearest centroid"}))
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {"experts": np.array(self.experts), "overall": self.overall, "cost": self.cost,
                "names": np.array(self.names), "table": self.table, "centroids": self.centroids}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.experts, self.names = state["experts"].tolist(), state["names"].tolist()
        self.overall, self.cost, self.table, self.centroids = (state[k] for k in ("overall", "cost", "table",
                                                                                  "centroids"))


class KnnRouter(Router):
    """The experts that did best on the n most similar training queries (cosine)."""

    def __init__(self, embedder: TextEncoder, neighbours: int = 64, prior: float = 4.0, **_: object) -> None:
        self.embedder = embedder
        self.neighbours = neighbours
        self.prior = prior

    def _index(self, vectors: np.ndarray) -> None:
        import faiss

        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.IndexFlatIP(self.vectors.shape[1])
        self.index.add(self.vectors)

    def fit(self, train: TrainingSet) -> None:
        self._index(train.vectors if train.vectors is not None else self.embedder.encode(train.texts))
        self.correct = train.correct
        self.experts = list(train.experts)
        self.overall = train.correct.mean(axis=0)
        self.cost = np.zeros(0) if train.cost is None else train.cost.mean(axis=0)

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        vecs = vectors if vectors is not None else self.embedder.encode(texts)
        n = min(self.neighbours, self.index.ntotal)
        _, ids = self.index.search(np.ascontiguousarray(vecs, dtype=np.float32), n)
        rng = np.random.default_rng(options.seed)
        cost = self.cost if len(self.cost) else None
        out = []
        for row in ids:
            scores = (self.correct[row].sum(axis=0) + self.prior * self.overall) / (len(row) + self.prior)
            out.append(_decision(self.experts, pick(scores, options, cost, rng), scores))
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {"experts": np.array(self.experts), "vectors": self.vectors, "correct": self.correct,
                "overall": self.overall, "cost": self.cost}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._index(state["vectors"])
        self.experts = state["experts"].tolist()
        self.correct, self.overall, self.cost = state["correct"], state["overall"], state["cost"]


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
