"""Choosing the served configuration on what is served.

Every candidate is scored by cross-validation on the same questions: the ones whose answer is an expert's own
(``best``, a vote, adaptive and cascade plans) on the live outcomes matrix, by the scoring functions of offline
evaluation (the same vote, the same agreement rule); the ones that synthesise by their synthesised answers,
asked live. The best single expert alone is the incumbent. A candidate replaces it only when it is right more
often on the same questions by a margin a coin would rarely give: an exact one-sided sign test on the questions
where exactly one of the two is right (p < 0.05; three wins and no loss is p = 0.125, not enough). So a fleet is
not served in a configuration whose gain over its best expert is noise of the profiling set. Among the candidates that pass, the most accurate wins, and a
tie goes to the cheaper one, then to the one with fewer expert calls, then to the simpler one (the grid's order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from orchestrator.evals.candidates import Candidate

SIGNIFICANCE = 0.05
"""One-sided: how unlikely under a coin a candidate's wins over the best single expert must be."""


@dataclass
class Scored:
    """A candidate's cross-validated results, question by question."""

    candidate: Candidate
    correct: np.ndarray
    cost: float
    calls: float

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


@dataclass
class Choice:
    chosen: Scored
    incumbent: Scored
    scored: list[Scored]
    significant: dict[str, float]
    """Each candidate's one-sided sign-test p against the incumbent."""

    def summary(self) -> dict[str, object]:
        c = self.chosen.candidate
        return {
            "name": c.name, "router": c.router if c.alone is None else "best_single", "k": c.k,
            "aggregation": str(c.aggregation), "policy": str(c.policy), "cost_lambda": c.cost_lambda,
            "cv_accuracy": self.chosen.accuracy, "mean_cost_usd": self.chosen.cost, "calls_per_query": self.chosen.calls,
            "best_single": {"expert": self.incumbent.candidate.alone, "cv_accuracy": self.incumbent.accuracy},
            "n_questions": len(self.chosen.correct),
            "rule": "the best single expert alone, unless a candidate beats it on the same questions by an exact "
                    f"one-sided sign test (p < {SIGNIFICANCE}); then the most accurate such candidate, ties to the "
                    "cheaper, then to fewer calls",
            "candidates": [{"name": s.candidate.name, "cv_accuracy": s.accuracy, "mean_cost_usd": s.cost,
                            "calls_per_query": s.calls, "p": self.significant.get(s.candidate.name)}
                           for s in self.scored],
        }


def sign_test(candidate: np.ndarray, incumbent: np.ndarray) -> float:
    """The one-sided p of the candidate's wins over the incumbent among the questions exactly one of them got
    right: the chance of at least that many wins if each such question were a fair coin."""
    candidate, incumbent = np.asarray(candidate, dtype=float), np.asarray(incumbent, dtype=float)
    wins = int(np.sum((candidate > 0.5) & (incumbent < 0.5)))
    n = wins + int(np.sum((candidate < 0.5) & (incumbent > 0.5)))
    return sum(math.comb(n, j) for j in range(wins, n + 1)) / 2**n


def choose(incumbent: Scored, scored: list[Scored]) -> Choice:
    p = {s.candidate.name: sign_test(s.correct, incumbent.correct) for s in scored}
    passing = [s for s in scored if p[s.candidate.name] < SIGNIFICANCE and s.accuracy > incumbent.accuracy]
    order = {id(s): i for i, s in enumerate(scored)}
    chosen = min(passing, key=lambda s: (-s.accuracy, s.cost, s.calls, order[id(s)]), default=incumbent)
    return Choice(chosen, incumbent, [incumbent, *scored], p)
