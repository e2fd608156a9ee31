"""Routers over a per-query quality estimate (``routers.quality``): ``cluster``, ``logistic`` and ``irt``.

Per query, the estimate gives each expert's probability of answering right;
the scores of the decision are those probabilities, so the vote that follows
weighs each answer by its expert's chance. The policies:
- topk, symbolic, cost: as for every router (``base.pick``), the cost policy
  with this query's own cost estimate (``routers.costs``), not a per-expert mean;
- adaptive: k per query, from the plans learned for its cluster (``routers.plans``);
- cascade: cheap experts first, more only when they disagree (the decision's
  ``escalate`` list), from the same plans.
"""

from __future__ import annotations

import numpy as np

from routers.base import Decision, RouteOptions, Router, RoutingError, TrainingSet, pick
from routers.costs import CostModel
from routers.embedding import TextEncoder
from routers.plans import PlanTable, escalation, first_stage
from routers.quality import QUALITY_MODELS, ClusterQuality, QualityModel
from routers.vocabulary import Policy

PLANNED = (Policy.ADAPTIVE, Policy.CASCADE)


class QualityRouter(Router):
    def __init__(self, embedder: TextEncoder, model: str = "cluster", **_: object) -> None:
        if model not in QUALITY_MODELS:
            raise RoutingError(f"unknown quality model {model!r}; choose one of {', '.join(QUALITY_MODELS)}")
        self.embedder, self.kind = embedder, model
        self.model: QualityModel = QUALITY_MODELS[model]()
        self.costs = CostModel()
        self.has_costs = False
        self.plans = PlanTable()
        self.experts: list[str] = []

    def supports(self, policy: str) -> bool:
        return True

    @property
    def clusters(self) -> ClusterQuality:
        """The clustering that plans are learned on: the model itself, or the prior it is shrunk to."""
        return self.model if isinstance(self.model, ClusterQuality) else self.model.prior

    def fit(self, train: TrainingSet) -> None:
        vectors = train.vectors if train.vectors is not None else self.embedder.encode(train.texts)
        self.experts = list(train.experts)
        self.model.fit(vectors, train.correct)
        self.has_costs = self.costs.fit(vectors, train.cost, train.output_tokens, train.prices)
        scores = self.model.predict(vectors)
        estimates = self.costs.predict(vectors, train.texts) if self.has_costs else None
        self.plans.fit(self.clusters.assign(vectors)[0], scores, estimates, train.correct, train.answers, train.cost)

    def estimate(self, texts: list[str], vectors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Per query and expert: the probability of a right answer, and the estimated cost (None if unknown)."""
        if not self.experts:
            raise RoutingError("this router has not been fitted: run `concilium profile` or call fit()")
        vecs = vectors if vectors is not None else self.embedder.encode(texts)
        return self.model.predict(vecs), (self.costs.predict(vecs, texts) if self.has_costs else None)

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        vecs = vectors if vectors is not None else self.embedder.encode(texts)
        scores, costs = self.estimate(texts, vecs)
        labels = self.clusters.assign(vecs)[0] if options.policy in PLANNED else None
        rng = np.random.default_rng(options.seed)
        out = []
        for q in range(len(texts)):
            p, c = scores[q], None if costs is None else costs[q]
            trace: dict[str, object] = {"model": self.kind}
            escalate: list[str] = []
            if options.policy in PLANNED:
                plan = self.plans.choose(int(labels[q]), options.policy, options.cost_lambda, options.per_call)
                first = first_stage(p, None if options.per_call else c, options.cost_lambda, options.policy)[: plan[0]]
                chosen = list(first)
                escalate = [self.experts[j] for j in escalation(p, first, plan[1])[plan[0]:]]
                trace.update(cluster=int(labels[q]), plan={"ask": plan[0], "up_to": plan[1]})
            else:
                chosen = pick(p, options, c, rng)
            if c is not None:
                trace["estimated_cost_usd"] = {e: round(float(x), 8) for e, x in zip(self.experts, c)}
            out.append(Decision(
                experts=[self.experts[j] for j in chosen], scores={e: float(s) for e, s in zip(self.experts, p)},
                aggregator=self.experts[int(np.argmax(p))], escalate=escalate, trace=trace,
            ))
        return out

    def state(self) -> dict[str, np.ndarray]:
        state = {**{f"model.{k}": v for k, v in self.model.state().items()},
                 **{f"plans.{k}": v for k, v in self.plans.state().items()},
                 "experts": np.array(self.experts, dtype=str)}
        if self.has_costs:
            state.update({f"costs.{k}": v for k, v in self.costs.state().items()})
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        self.experts = state["experts"].tolist()
        self.model.load(part("model."))
        self.plans.load(part("plans."))
        self.has_costs = any(k.startswith("costs.") for k in state)
        if self.has_costs:
            self.costs.load(part("costs."))
