"""Per-query cost estimates: what each expert would cost on this query, before it runs.

Where output lengths and prices are known (MMLU-Pro with ``prices.json``, or a
live profile, which counts every answer's tokens), the estimate is the query's
own prompt tokens times the input price plus the expert's predicted output
tokens times the output price. The predicted output length is the mean length
of that expert's answers in the query's cluster, shrunk to its overall mean.
Where only the cost of each call was recorded (RouterBench), the cost itself is
predicted the same way.
"""

from __future__ import annotations

import numpy as np

from routers.base import Prices
from routers.quality import ClusterQuality
from workers.types import CHARS_PER_TOKEN


def prompt_tokens(texts: list[str]) -> np.ndarray:
    return np.array([max(1.0, len(t) / CHARS_PER_TOKEN) for t in texts])


class CostModel:
    def __init__(self, clusters: int = 16, prior: float = 8.0) -> None:
        self.table = ClusterQuality(clusters=clusters, seeds=1, prior=prior)
        self.prices: Prices | None = None

    def fit(self, vectors: np.ndarray, cost: np.ndarray | None, output_tokens: np.ndarray | None,
            prices: Prices | None) -> bool:
        """Learn from output lengths and prices when both are known, else from the recorded costs; False when
        there is nothing to learn from."""
        if output_tokens is not None and prices is not None:
            self.prices = prices
            self.table.fit(vectors, output_tokens)
            return True
        if cost is not None:
            self.table.fit(vectors, cost)
            return True
        return False

    def predict(self, vectors: np.ndarray, texts: list[str]) -> np.ndarray:
        """[queries, experts] estimated USD."""
        predicted = self.table.predict(vectors)
        if self.prices is None:
            return predicted
        return prompt_tokens(texts)[:, None] * self.prices.input[None, :] + predicted * self.prices.output[None, :]

    def state(self) -> dict[str, np.ndarray]:
        out = {f"table.{k}": v for k, v in self.table.state().items()}
        if self.prices is not None:
            out.update({"prices.input": self.prices.input, "prices.output": self.prices.output})
        return out

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.table.load({k[6:]: v for k, v in state.items() if k.startswith("table.")})
        if "prices.input" in state:
            self.prices = Prices(state["prices.input"], state["prices.output"])
