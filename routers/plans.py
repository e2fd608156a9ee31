"""Recruitment plans for the ``adaptive`` and ``cascade`` policies, learned per cluster from recorded answers.

A plan is (a, b): ask the first ``a`` experts; stop if they all give the same
answer, otherwise also ask up to the first ``b`` and take the weighted vote of
everyone asked. ``a == b`` is a fixed k. The ``adaptive`` policy chooses among
fixed-k plans, the ``cascade`` policy among all of them, and for a cascade the
first stage is ordered by value for money (score − λ·cost) and the escalation
by score alone, so cheap experts go first and strong ones are kept for the
disagreements.

For every cluster of the training queries, each plan's vote accuracy and mean
cost are measured on the recorded answers, replaying the live rules
(``aggregation.weighted_vote``, the same agreement test). At routing time a
query takes, in its cluster, the plan with the best accuracy − λ·cost: one more
vote is recruited only where, on past queries like it, it paid for its cost.
Without recorded answers there is nothing to measure agreement or votes with,
and every query is asked of one expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routers.aggregation import weighted_vote
from routers.vocabulary import Policy

CANDIDATES: tuple[tuple[int, int], ...] = (
    (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (7, 7),
    (2, 3), (2, 4), (2, 5), (2, 7), (3, 4), (3, 5), (3, 7),
)


def first_stage(p: np.ndarray, c: np.ndarray | None, lam: float, policy: str) -> np.ndarray:
    """The experts in asking order: by score, or for a cascade by score − λ·cost (cheap and good first)."""
    utility = p - lam * c if policy == Policy.CASCADE and c is not None else p
    return np.argsort(-utility, kind="stable")


def escalation(p: np.ndarray, asked: np.ndarray, b: int) -> np.ndarray:
    """Up to ``b`` experts in all: the asked ones, then the best-scored of the rest."""
    rest = [j for j in np.argsort(-p, kind="stable") if j not in set(asked.tolist())]
    return np.array(list(asked) + rest[: max(0, b - len(asked))], dtype=int)


def agree(answers: list[str | None]) -> bool:
    """The consensus rule of the live aggregator: every answer extracted, and all the same."""
    return None not in answers and len(set(answers)) == 1


@dataclass
class Outcome:
    """One query's result under one plan."""

    winner: int
    asked: np.ndarray


def replay(p: np.ndarray, c: np.ndarray | None, answers: np.ndarray, plan: tuple[int, int], lam: float,
           policy: str) -> Outcome:
    """Run a plan on one query's recorded answers, as the scheduler would run it live."""
    a, b = plan
    first = first_stage(p, c, lam, policy)[:a]
    asked = first if a == b or agree([answers[j] for j in first]) else escalation(p, first, b)
    winner = weighted_vote([answers[j] for j in asked], [p[j] for j in asked])
    return Outcome(int(asked[0] if winner is None else asked[winner]), asked)


class PlanTable:
    """Per cluster and plan: the vote accuracy and the mean cost on the training queries.

    The training replays' inputs are kept (they are small: scores, cost estimates, answers, outcomes), because
    a cascade's first stage depends on λ: the table for a λ is computed on first use and kept.
    """

    def __init__(self) -> None:
        self.data: dict[str, np.ndarray] = {}
        self._tables: dict[tuple[str, float, bool], tuple[np.ndarray, np.ndarray]] = {}

    def fit(self, labels: np.ndarray, scores: np.ndarray, costs: np.ndarray | None, correct: np.ndarray,
            answers: np.ndarray | None, actual_cost: np.ndarray | None) -> None:
        self.data = {"labels": labels, "scores": scores, "correct": correct}
        if costs is not None:
            self.data["costs"] = costs
        if answers is not None:
            self.data["answers"] = np.array([[a or "" for a in row] for row in answers], dtype=str)
        if actual_cost is not None:
            self.data["actual_cost"] = actual_cost
        self._tables.clear()

    def _table(self, policy: str, lam: float, per_call: bool) -> tuple[np.ndarray, np.ndarray]:
        # Only a cascade's first stage depends on λ, and only when λ prices dollars.
        key = (policy, lam if policy == Policy.CASCADE and not per_call else 0.0, per_call)
        if key not in self._tables:
            self._tables[key] = self._measure(policy, lam, per_call)
        return self._tables[key]

    def _measure(self, policy: str, lam: float, per_call: bool) -> tuple[np.ndarray, np.ndarray]:
        d = self.data
        labels, scores, correct = d["labels"], d["scores"], d["correct"]
        costs = None if per_call else d.get("costs")
        actual = None if per_call else d.get("actual_cost")
        answers = d.get("answers")
        clusters = int(labels.max()) + 1
        acc = np.full((clusters, len(CANDIDATES)), -np.inf)
        spent = np.zeros((clusters, len(CANDIDATES)))
        for i, plan in enumerate(CANDIDATES):
            usable = plan == (1, 1) or (answers is not None and (policy == Policy.CASCADE or plan[0] == plan[1]))
            if not usable:
                continue
            right, paid = np.zeros(len(scores)), np.zeros(len(scores))
            for q in range(len(scores)):
                said = [a or None for a in answers[q]] if answers is not None else [None] * scores.shape[1]
                out = replay(scores[q], None if costs is None else costs[q], np.array(said, dtype=object), plan,
                             lam, policy)
                right[q] = correct[q, out.winner]
                paid[q] = len(out.asked) if actual is None else actual[q, out.asked].sum()
            for k in range(clusters):
                rows = labels == k
                if rows.any():
                    acc[k, i], spent[k, i] = right[rows].mean(), paid[rows].mean()
        return acc, spent

    def choose(self, label: int, policy: str, lam: float, per_call: bool = False) -> tuple[int, int]:
        """The plan with the best accuracy − λ·cost in the query's cluster (cost in calls when ``per_call``)."""
        acc, spent = self._table(policy, lam, per_call)
        return CANDIDATES[int(np.argmax(acc[label] - lam * spent[label]))]

    def state(self) -> dict[str, np.ndarray]:
        return dict(self.data)

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.data = dict(state)
        self._tables.clear()
