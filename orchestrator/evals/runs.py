"""The two live flows over one started pipeline: ``concilium eval --live`` (the table) and the choice of the
served configuration for ``concilium profile`` (on live answers).

Both begin the same way: every configured expert alone answers every question through the pipeline. Those rows
are the table's first lines, the incumbent that every other configuration must beat, and, graded, the outcomes the
routers are fitted on (for a bench-data folder served by replay experts, the recorded outcomes themselves).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.config import ConciliumConfig
from orchestrator.engine.pipeline import Pipeline
from orchestrator.evals import outcomes
from orchestrator.evals.candidates import MAX_K, Candidate, grid
from orchestrator.evals.choose import Choice, Scored, choose
from orchestrator.evals.labelled import LabelledSet, load_labelled
from orchestrator.evals.live import LiveRunner, Row, summary
from orchestrator.offline.data import load_eval_data
from routers.embedding import TextEncoder
from routers.registry import make_router
from routers.scoring.crossval import (
    CostTarget,
    EvalData,
    Outcome,
    cross_validation_splits,
    run_router,
    scored_as,
    solve_lambda,
)
from routers.vocabulary import AUTO_ROUTER, Aggregation, Policy

HALVES = ("all", "profile", "report")


@dataclass
class LiveSettings:
    data: Path
    candidates: list[Candidate] | None = None
    """None: ``default_candidates`` (cross-validated), or none beside the served default (``served``)."""
    folds: int = 5
    seed: int = 0
    half: str = "all"
    """all, or one half of the set (``LabelledSet.halves``): profile on one, report on the other."""
    limit: int | None = None
    concurrency: int = 8
    max_new_tokens: int | None = None
    served: bool = False
    """Measure the pipeline's own routers (its profile's) and its served default, instead of cross-validating."""


def default_candidates(n_experts: int, target: CostTarget | None = None) -> list[Candidate]:
    """The configurations a live table shows by default: the cluster router alone and voting, its adaptive and
    cascade plans, the per-category table, and a synthesis; ``grid`` is every configuration."""
    top = min(MAX_K, n_experts)
    rows = [Candidate("cluster", 1, target=target), Candidate("per_category", 1, target=target)]
    if top > 1:
        rows += [Candidate("cluster", top, Aggregation.VOTE, target=target),
                 Candidate("cluster", top, Aggregation.VOTE, Policy.ADAPTIVE, target=target),
                 Candidate("cluster", top, Aggregation.VOTE, Policy.CASCADE, target=target),
                 Candidate("cluster", top, Aggregation.SYNTHESIZE, target=target)]
    return rows


def parity_candidates() -> list[Candidate]:
    """The configurations whose live picks are checked against offline evaluation's, question by question: a
    category table and a learned router voting at k = 3, a cascade held to two calls a query, and the cost policy
    held to 0.4x the best single expert's cost."""
    return [Candidate("per_category", 3, Aggregation.VOTE), Candidate("cluster", 3, Aggregation.VOTE),
            Candidate("cluster", 3, Aggregation.VOTE, Policy.CASCADE, target=CostTarget(max_experts=2.0)),
            Candidate("cluster", 1, Aggregation.BEST, Policy.COST, target=CostTarget(share=0.4))]


def labelled(settings: LiveSettings) -> tuple[LabelledSet, list[int]]:
    """The questions to ask, and their positions in the file (a bench-data folder's rows are cut the same way)."""
    full = load_labelled(settings.data)
    idx = list(range(len(full)))
    if settings.half != "all":
        idx = full.halves()[HALVES.index(settings.half) - 1]
    if settings.limit is not None:
        idx = idx[: settings.limit]
    return full.subset(idx), idx


class Flow:
    """One pipeline, one labelled set: the experts alone first, then configurations."""

    def __init__(self, pipeline: Pipeline, data: LabelledSet, settings: LiveSettings, encoder: TextEncoder,
                 on_answer: Callable[[], None]) -> None:
        self.pipeline, self.data, self.settings, self.encoder = pipeline, data, settings, encoder
        self.runner = LiveRunner(pipeline, data, settings.concurrency, settings.max_new_tokens, on_answer)
        self.experts = list(pipeline.catalog().experts)
        self.make = lambda name: make_router(name, embedder=encoder)
        self.splits = cross_validation_splits(len(data), settings.folds, settings.seed)

    async def alone(self) -> dict[str, Row]:
        return {e: await self.runner.served(Candidate(alone=e)) for e in self.experts}

    def fit_data(self, alone: dict[str, Row], rows: list[int], config: ConciliumConfig) -> EvalData:
        """The outcomes to fit routers on: recorded ones for a bench-data folder, else the experts' graded
        answers."""
        if self.settings.data.is_dir():
            return load_eval_data(self.settings.data, self.encoder, models=self.experts).subset(np.array(rows))
        return outcomes.from_answers(self.data, alone, {e.name: e.price for e in config.experts}, self.encoder)

    def offline(self, candidate: Candidate, fit: EvalData) -> Outcome:
        return offline(candidate, fit, self.splits, self.make)


def offline(candidate: Candidate, fit: EvalData, splits: list, make: Callable[[str], object]) -> Outcome:
    """The candidate scored on the outcomes by offline evaluation's own function, on the given folds."""
    return run_router(lambda: make(candidate.router), fit, candidate.options(),
                      scored_as(candidate.aggregation, candidate.k), splits, budget=candidate.target)


def parity(row: Row, offline: Outcome) -> dict[str, object]:
    """Question by question: the experts asked, whose answer counted, and whether it was right, live against
    offline. Any difference is a bug in one of the two paths."""
    differences = []
    for i, live in sorted(row.results.items()):
        pick = offline.picks[i]
        same = (sorted(live.asked) == sorted(pick.asked) and live.answered_by == pick.answered_by
                and live.correct == bool(pick.correct))
        if not same:
            differences.append({"question": i, "live": {"asked": list(live.asked), "answered_by": live.answered_by,
                                                         "correct": live.correct},
                                "offline": {"asked": list(pick.asked), "answered_by": pick.answered_by,
                                            "correct": bool(pick.correct)}})
    return {"configuration": row.candidate.name, "questions": len(row.results), "differences": len(differences),
            "live_accuracy": float(np.mean([r.correct for r in row.results.values()])),
            "offline_accuracy": offline.accuracy, "examples": differences[:5]}


async def served_default(flow: Flow, alone: dict[str, Row]) -> Row:
    """The pipeline's default configuration (``auto`` with the profile's served settings). Served as one expert
    alone (the ``best_single`` router at k = 1), it is that expert's row: the same requests, asked once."""
    d = flow.pipeline.defaults(None)
    served = flow.pipeline.served
    default = Candidate(AUTO_ROUTER, d.k, d.aggregation, d.policy, d.cost_lambda)
    expert = served.get("best_single", {}).get("expert") if served and served.get("router") == "best_single" else None
    if expert in alone and d.k == 1:
        return Row(default, alone[expert].results)
    return await flow.runner.served(default)


async def evaluate(flow: Flow, config: ConciliumConfig, rows: list[int]) -> dict[str, object]:
    """The live table: each expert alone, then each configuration; with a bench-data folder, each offline-scorable
    configuration's picks compared with offline evaluation's."""
    s = flow.settings
    alone = await flow.alone()
    table = list(alone.values())
    checks = []
    if s.served:
        table.append(await served_default(flow, alone))
        table += [await flow.runner.served(c) for c in s.candidates or []]
        protocol = f"served: {len(flow.data)} questions of {s.data} ({s.half}), the profile's routers"
    else:
        fit = flow.fit_data(alone, rows, config)
        for candidate in default_candidates(len(flow.experts)) if s.candidates is None else s.candidates:
            row = await flow.runner.cross_validated(candidate, fit, flow.splits, flow.make)
            table.append(row)
            if s.data.is_dir() and not candidate.synthesises:
                checks.append(parity(row, flow.offline(candidate, fit)))
        protocol = f"{s.folds}-fold CV on {len(flow.data)} questions of {s.data} ({s.half}), live"
    summaries = [summary(r) for r in table]
    best = max(summaries[: len(alone)], key=lambda r: r["accuracy"])
    return {"protocol": protocol, "n_questions": len(flow.data), "concurrency": s.concurrency,
            "best_single": {"name": best["name"], "accuracy": best["accuracy"]}, "rows": summaries,
            **({"parity": checks} if checks else {})}


def incumbent(fit: EvalData) -> Scored:
    """The best single expert alone: the most accurate on these questions (the first of a tie, as the
    ``best_single`` router picks it)."""
    best = int(np.argmax(fit.correct.mean(axis=0)))
    cost = float(fit.cost[:, best].mean()) if fit.cost is not None else 0.0
    return Scored(Candidate(alone=fit.experts[best]), fit.correct[:, best], cost, 1.0)


def scored_offline(candidate: Candidate, fit: EvalData, splits: list, make: Callable[[str], object]) -> Scored:
    o = offline(candidate, fit, splits, make)
    return Scored(candidate, np.array([p.correct for p in o.picks]), o.mean_cost or 0.0, o.mean_experts)


def choose_recorded(fit: EvalData, encoder: TextEncoder, folds: int = 5, seed: int = 0,
                    target: CostTarget | None = None) -> Choice:
    """The choice on recorded outcomes: every configuration whose answer is an expert's own (no synthesis was
    recorded), by offline evaluation's functions."""
    make = lambda name: make_router(name, embedder=encoder)  # noqa: E731
    splits = cross_validation_splits(len(fit.texts), folds, seed)
    return choose(incumbent(fit), [scored_offline(c, fit, splits, make)
                                   for c in grid(len(fit.experts), target=target) if not c.synthesises])


async def choose_served(flow: Flow, config: ConciliumConfig, rows: list[int], target: CostTarget | None = None
                        ) -> tuple[EvalData, Choice, dict[str, Row]]:
    """Every configuration of the grid scored by cross-validation on live answers (a synthesis by its synthesised
    answers, asked live), against the best single expert alone (``choose``)."""
    alone = await flow.alone()
    fit = flow.fit_data(alone, rows, config)
    scored = []
    for candidate in grid(len(fit.experts), target=target):
        if not candidate.synthesises:
            scored.append(scored_offline(candidate, fit, flow.splits, flow.make))
            continue
        row = await flow.runner.cross_validated(candidate, fit, flow.splits, flow.make)
        results = [row.results[i] for i in range(len(flow.data))]
        scored.append(Scored(candidate, np.array([float(r.correct) for r in results]),
                             float(np.mean([r.cost for r in results])), float(np.mean([len(r.asked) for r in results]))))
    return fit, choose(incumbent(fit), scored), alone


def served_settings(choice: Choice, fit: EvalData, encoder: TextEncoder) -> dict[str, object]:
    """The chosen configuration as the service will run it: with a cost target, λ solved on every question (as
    each fold solved it on its training part)."""
    served = choice.summary()
    c = choice.chosen.candidate
    if c.target is not None and c.alone is None:
        options = solve_lambda(lambda: make_router(c.router, embedder=encoder), fit, c.options(),
                               scored_as(c.aggregation, c.k), c.target)
        served.update(policy=str(options.policy), cost_lambda=options.cost_lambda)
    return served
