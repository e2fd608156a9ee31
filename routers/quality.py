"""Per-query quality estimates: each expert's probability of answering a query right, from its embedding.

Three estimators, each shrunk towards cluster statistics where data is thin:
- ``ClusterQuality`` (Avengers-Pro): spherical k-means over the training
  embeddings, several seeds averaged; a cluster's per-expert accuracy is shrunk
  towards the expert's overall accuracy like a Beta prior worth ``prior``
  queries. It is the others' prior, and a router on its own.
- ``LogisticQuality``: a multi-label logistic model whose offset is the
  cluster estimate's logit, so it learns only the per-query residual; L2 on the
  weights and early stopping on an inner validation split pull it back to the
  cluster estimate when the residual does not generalise.
- ``IrtQuality``: item response theory, P(right) = σ(θ_e·Ax + β_e − w·x + offset):
  each expert's ability vector θ_e against the query's skill demands Ax, and the
  query's difficulty w·x; the same offset, penalty and early stopping.

Written here rather than taken from scikit-learn: the offset (shrinkage to the
clusters) and the IRT factorisation are not in its estimators, and torch is
already a dependency of the service.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import faiss
import numpy as np

if TYPE_CHECKING:  # torch loads in about a second: the CLI imports this module only to list router names
    import torch

EPS = 1e-4
MIN_PER_CLUSTER = 8
"""Fewer clusters on little data: each holds this many training queries at least, and the prior does the rest."""


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


class QualityModel(ABC):
    """Learns P(right) for every (query, expert) from embeddings and a [queries, experts] 0..1 matrix."""

    @abstractmethod
    def fit(self, vectors: np.ndarray, correct: np.ndarray) -> None: ...

    @abstractmethod
    def predict(self, vectors: np.ndarray) -> np.ndarray:
        """[queries, experts] probabilities in (0, 1)."""

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Everything ``load`` needs, as arrays (saved with the profile)."""

    @abstractmethod
    def load(self, state: dict[str, np.ndarray]) -> None: ...


class ClusterQuality(QualityModel):
    def __init__(self, clusters: int = 16, seeds: int = 5, prior: float = 8.0) -> None:
        self.clusters, self.seeds, self.prior = clusters, seeds, prior
        self.centroids: np.ndarray | None = None
        """[seeds, clusters, dim] unit vectors."""
        self.tables: np.ndarray | None = None
        """[seeds, clusters, experts] smoothed accuracy."""

    def fit(self, vectors: np.ndarray, correct: np.ndarray) -> None:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        k = max(1, min(self.clusters, len(x) // MIN_PER_CLUSTER))
        overall = correct.mean(axis=0)
        centroids, tables = [], []
        for seed in range(self.seeds):
            km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False,
                              min_points_per_centroid=MIN_PER_CLUSTER)
            km.train(x)
            labels = km.index.search(x, 1)[1][:, 0]
            counts = np.bincount(labels, minlength=k)[:, None]
            sums = np.zeros((k, correct.shape[1]))
            np.add.at(sums, labels, correct)
            centroids.append(km.centroids)
            tables.append((sums + self.prior * overall) / (counts + self.prior))
        self.centroids, self.tables = np.stack(centroids), np.stack(tables)

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        """[seeds, queries]: each query's nearest centroid under every seed."""
        x = np.asarray(vectors, dtype=np.float32)
        return np.argmax(np.einsum("nd,skd->snk", x, self.centroids), axis=2)

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        labels = self.assign(vectors)
        return np.mean([self.tables[s][labels[s]] for s in range(len(self.tables))], axis=0)

    def state(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids, "tables": self.tables}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.centroids, self.tables = state["centroids"], state["tables"]


def _residual(dim: int, experts: int, rank: int | None) -> torch.nn.Module:
    """A logit residual over the cluster prior: linear (logistic) or ability × demand − difficulty (IRT)."""
    import torch

    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if rank is None:
                self.linear = torch.nn.Linear(dim, experts)
            else:
                self.demand = torch.nn.Linear(dim, rank, bias=False)
                self.ability = torch.nn.Parameter(torch.randn(experts, rank) * 0.1)
                self.bias = torch.nn.Parameter(torch.zeros(experts))
                self.difficulty = torch.nn.Linear(dim, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if rank is None:
                return self.linear(x)
            return self.demand(x) @ self.ability.T + self.bias - self.difficulty(x)

        def penalty(self) -> torch.Tensor:
            return sum((p ** 2).sum() for n, p in self.named_parameters() if "bias" not in n)

    return Residual()


class _ResidualQuality(QualityModel):
    rank: int | None = None

    def __init__(self, l2: float = 1e-3, lr: float = 5e-3, max_epochs: int = 400, patience: int = 20,
                 seed: int = 0, prior: ClusterQuality | None = None) -> None:
        self.l2, self.lr, self.max_epochs, self.patience, self.seed = l2, lr, max_epochs, patience, seed
        self.prior = prior or ClusterQuality()
        self.net: torch.nn.Module | None = None

    def fit(self, vectors: np.ndarray, correct: np.ndarray) -> None:
        import torch

        self.prior.fit(vectors, correct)
        x = torch.as_tensor(vectors, dtype=torch.float32)
        y = torch.as_tensor(correct, dtype=torch.float32)
        offset = torch.as_tensor(logit(self.prior.predict(vectors)), dtype=torch.float32)
        order = np.random.default_rng(self.seed).permutation(len(x))
        val, train = order[: max(1, len(x) // 7)], order[max(1, len(x) // 7):]
        torch.manual_seed(self.seed)
        net = _residual(x.shape[1], y.shape[1], self.rank)
        optimizer = torch.optim.Adam(net.parameters(), lr=self.lr)
        loss = torch.nn.functional.binary_cross_entropy_with_logits
        best, best_state, waited = float("inf"), net.state_dict(), 0
        for _ in range(self.max_epochs):
            optimizer.zero_grad()
            (loss(net(x[train]) + offset[train], y[train]) + self.l2 * net.penalty()).backward()
            optimizer.step()
            with torch.no_grad():
                held = loss(net(x[val]) + offset[val], y[val]).item()
            if held < best - 1e-5:
                best, best_state, waited = held, {k: v.clone() for k, v in net.state_dict().items()}, 0
            else:
                waited += 1
                if waited > self.patience:
                    break
        net.load_state_dict(best_state)
        self.net = net.eval()

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        import torch

        offset = torch.as_tensor(logit(self.prior.predict(vectors)), dtype=torch.float32)
        with torch.no_grad():
            return torch.sigmoid(self.net(torch.as_tensor(vectors, dtype=torch.float32)) + offset).numpy()

    def state(self) -> dict[str, np.ndarray]:
        weights = {f"net.{k}": v.numpy() for k, v in self.net.state_dict().items()}
        return {**{f"prior.{k}": v for k, v in self.prior.state().items()}, **weights}

    def load(self, state: dict[str, np.ndarray]) -> None:
        import torch

        self.prior.load({k[6:]: v for k, v in state.items() if k.startswith("prior.")})
        weights = {k[4:]: torch.as_tensor(v) for k, v in state.items() if k.startswith("net.")}
        dim = (weights.get("linear.weight") if self.rank is None else weights["demand.weight"]).shape[1]
        experts = self.prior.tables.shape[2]
        self.net = _residual(dim, experts, self.rank)
        self.net.load_state_dict(weights)
        self.net.eval()


class LogisticQuality(_ResidualQuality):
    rank = None


class IrtQuality(_ResidualQuality):
    rank = 16


QUALITY_MODELS: dict[str, type[QualityModel]] = {
    "cluster": ClusterQuality,
    "logistic": LogisticQuality,
    "irt": IrtQuality,
}
