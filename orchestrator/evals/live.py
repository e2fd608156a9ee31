"""Live evaluation: labelled questions through the served pipeline, one configuration at a time.

Every question is a ``QueryRequest`` to the same ``Pipeline`` that ``concilium serve`` runs: the same scheduler
windows, routers, experts, prompts and aggregation. Each answer is graded against its gold answer, and its
end-to-end seconds (as a client sees them, with ``concurrency`` requests in flight), tokens and cost are kept.

A configuration with a router is measured one of two ways:
- cross-validated: per fold, the router is fitted on the training part's outcomes (the same ``make_router`` and
  ``fit`` as offline evaluation, and the same ``solve_lambda`` for a cost target), installed in the pipeline
  under a name of its own, and the test part is asked through it;
- served: the pipeline's own routers (a profile's, fitted on other questions) answer every question.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from orchestrator.engine.pipeline import Pipeline
from orchestrator.engine.requests import AllExpertsFailed, Answer, QueryRequest
from orchestrator.evals.candidates import Candidate
from orchestrator.evals.labelled import LabelledSet
from routers.base import RouteOptions, Router
from routers.scoring.crossval import EvalData, scored_as, solve_lambda
from routers.scoring.grading import grade
from routers.vocabulary import Aggregation, Grader

EVAL_ROUTER = "eval:fold"
"""The name under which a fold's router is installed in the pipeline while its test part is asked."""


@dataclass
class Result:
    """One question under one configuration."""

    correct: bool
    seconds: float
    tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    asked: tuple[str, ...] = ()
    """Every expert call of the answer (escalations and the aggregator included), in the order they were made."""
    answered_by: str | None = None
    """The expert whose text is the answer; None for a synthesis."""
    text: str = ""
    error: str | None = None


@dataclass
class Row:
    candidate: Candidate
    results: dict[int, Result] = field(default_factory=dict)
    """By question index in the evaluated set."""
    lambdas: list[float] = field(default_factory=list)
    """The cost weight each fold solved for its target."""


def to_result(answer: Answer, gold: str, grader: Grader, seconds: float) -> Result:
    completion = sum(u["completion_tokens"] for u in answer.usage.values())
    tokens = completion + sum(u["prompt_tokens"] for u in answer.usage.values())
    return Result(grade(answer.text, gold, grader), seconds, tokens, completion, answer.cost_usd,
                  tuple(answer.asked), answer.answered_by, answer.text)


class LiveRunner:
    def __init__(self, pipeline: Pipeline, data: LabelledSet, concurrency: int = 8, max_new_tokens: int | None = None,
                 on_answer: Callable[[], None] = lambda: None) -> None:
        self.pipeline, self.data, self.concurrency, self.on_answer = pipeline, data, concurrency, on_answer
        self.max_new_tokens = max_new_tokens

    def request(self, i: int, candidate: Candidate, router: str | None, options: RouteOptions) -> QueryRequest:
        """What ``concilium serve`` builds from a body with these settings, plus the question's category, the kind
        of answer its grader reads, and its id."""
        d = self.data
        experts = [candidate.alone] if candidate.alone is not None else None
        return QueryRequest(d.questions[i], options, candidate.aggregation, experts=experts, router=router,
                            max_new_tokens=self.max_new_tokens, category=d.categories[i], answer_kind=d.kinds[i],
                            ref=d.ids[i])

    async def ask(self, indices: list[int], make: Callable[[int], QueryRequest]) -> dict[int, Result]:
        """Every question once, ``concurrency`` at a time; a request whose experts all failed counts as wrong."""
        gate = asyncio.Semaphore(self.concurrency)

        async def one(i: int) -> tuple[int, Result]:
            async with gate:
                t0 = time.perf_counter()
                try:
                    answer = await self.pipeline.ask(make(i))
                except AllExpertsFailed as exc:
                    result = Result(False, time.perf_counter() - t0, error=str(exc))
                else:
                    result = to_result(answer, self.data.gold[i], self.data.graders[i], time.perf_counter() - t0)
            self.on_answer()
            return i, result

        return dict(await asyncio.gather(*(one(i) for i in indices)))

    async def served(self, candidate: Candidate) -> Row:
        """The configuration with the pipeline's own routers, on every question."""
        router = None if candidate.alone is not None else candidate.router
        options = RouteOptions(k=1) if candidate.alone is not None else candidate.options()
        row = Row(candidate)
        row.results = await self.ask(list(range(len(self.data))),
                                     lambda i: self.request(i, candidate, router, options))
        return row

    async def cross_validated(self, candidate: Candidate, fit: EvalData, splits: list[tuple[np.ndarray, np.ndarray]],
                              make: Callable[[str], Router]) -> Row:
        """Per fold: the router fitted on the training part's outcomes, then the test part asked through it."""
        if candidate.alone is not None:
            return await self.served(candidate)
        row = Row(candidate)
        for train_idx, test_idx in splits:
            train = fit.subset(train_idx)
            router = make(candidate.router)
            router.fit(train)
            options = candidate.options()
            if candidate.target is not None:
                options = solve_lambda(lambda: make(candidate.router), train, options,
                                       scored_as(candidate.aggregation, candidate.k), candidate.target)
                row.lambdas.append(options.cost_lambda)
            self.pipeline.use_router(EVAL_ROUTER, router)
            row.results.update(await self.ask([int(i) for i in test_idx],
                                              lambda i, o=options: self.request(i, candidate, EVAL_ROUTER, o)))
        return row


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion: honest at the small n and extreme rates of a starter set."""
    if n == 0:
        return 0.0, 0.0
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def summary(row: Row) -> dict[str, object]:
    results = list(row.results.values())
    n, right = len(results), sum(r.correct for r in results)
    seconds = [r.seconds for r in results]
    low, high = wilson(right, n)
    return {
        "name": row.candidate.name, "n": n, "accuracy": right / n if n else 0.0, "ci95": [low, high],
        "latency_p50_s": float(np.percentile(seconds, 50)) if n else 0.0,
        "latency_p95_s": float(np.percentile(seconds, 95)) if n else 0.0,
        "tokens_per_query": float(np.mean([r.tokens for r in results])) if n else 0.0,
        "cost_per_query_usd": float(np.mean([r.cost for r in results])) if n else 0.0,
        "calls_per_query": float(np.mean([len(r.asked) for r in results])) if n else 0.0,
        "errors": sum(r.error is not None for r in results),
        **({"lambdas": row.lambdas} if row.lambdas else {}),
        "aggregation": str(row.candidate.aggregation) if row.candidate.alone is None else str(Aggregation.BEST),
        "questions": {"correct": [row.results[i].correct for i in sorted(row.results)],
                      "answered_by": [row.results[i].answered_by for i in sorted(row.results)]},
    }
