"""The live halves of ``concilium eval`` (``--live``) and ``concilium profile`` (``--tasks``, ``--starter``): a
pipeline is started on the configured experts, and labelled questions go through it as served queries."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.cli.common import UsageError, err, out
from orchestrator.config import ConciliumConfig
from orchestrator.evals.candidates import Candidate, grid

if TYPE_CHECKING:  # the flows start a pipeline (Ray, torch): imported when a command runs, not for its --help
    from orchestrator.evals.runs import Flow, LiveSettings
    from routers.embedding import TextEncoder
    from routers.scoring.crossval import CostTarget

STARTER = Path(__file__).resolve().parents[1] / "data" / "starter.jsonl"
"""Labelled questions written for the bundled experts: short facts, arithmetic, yes/no, easy multiple choice."""
CANDIDATE_SETS = ("default", "grid", "parity", "none")

T = TypeVar("T")


def _bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err)


def run_flow(cfg: ConciliumConfig, settings: LiveSettings, encoder: TextEncoder, rows_per_question: int,
             work: Callable[[Flow, list[int]], Awaitable[T]]) -> T:
    """Start the pipeline, run ``work`` on a flow over the settings' questions with a progress bar, and stop."""
    from orchestrator.engine.pipeline import Pipeline
    from orchestrator.evals.runs import HALVES, Flow, labelled

    if settings.half not in HALVES:
        raise UsageError(f"--half must be one of {', '.join(HALVES)}")
    data, rows = labelled(settings)

    async def main() -> T:
        with err.status("starting the pipeline"):
            pipeline = await Pipeline.start(cfg)
        try:
            with _bar() as bar:
                task = bar.add_task("answers", total=len(data) * rows_per_question)
                flow = Flow(pipeline, data, settings, encoder, lambda: bar.advance(task))
                return await work(flow, rows)
        finally:
            await pipeline.close()

    return asyncio.run(main())


def candidates(kind: str, experts: int, given: Candidate | None, target: CostTarget | None) -> list[Candidate]:
    from orchestrator.evals.runs import default_candidates, parity_candidates

    if given is not None:
        return [given]
    if kind not in CANDIDATE_SETS:
        raise UsageError(f"--candidates must be one of {', '.join(CANDIDATE_SETS)}")
    if kind == "parity":
        return parity_candidates()
    if kind == "none":
        return []
    return grid(experts, target=target) if kind == "grid" else default_candidates(experts, target)


def live_eval(cfg: ConciliumConfig, settings: LiveSettings, encoder: TextEncoder, json_out: Path | None,
              plot: Path | None) -> dict:
    from orchestrator.evals.report import plot as draw
    from orchestrator.evals.report import table
    from orchestrator.evals.runs import evaluate

    per_question = len(cfg.experts) + len(settings.candidates or []) + (1 if settings.served else 0)
    result = run_flow(cfg, settings, encoder, per_question, lambda flow, rows: evaluate(flow, cfg, rows))
    out.print(table(result["rows"], f"live: {result['protocol']}"))
    best = result["best_single"]
    out.print(f"best single expert alone: {best['name']} {best['accuracy']:.1%}; latency is end to end with "
              f"{settings.concurrency} requests in flight", highlight=False)
    for check in result.get("parity", []):
        out.print(f"offline = live, {check['configuration']}: {check['questions'] - check['differences']} of "
                  f"{check['questions']} questions identical (live {check['live_accuracy']:.2%}, offline "
                  f"{check['offline_accuracy']:.2%})", highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))
    if plot is not None:
        draw(result["rows"], plot)
    return result


def live_profile(cfg: ConciliumConfig, settings: LiveSettings, encoder: TextEncoder, annotator: str | None,
                 select_aggregator: bool, target: CostTarget | None) -> tuple:
    """The served configuration chosen on live answers, and what the profile may add: an expert's skill keywords
    and the aggregator ranking. (fit data, choice, keywords, aggregator scores)."""
    from orchestrator.evals.runs import choose_served
    from orchestrator.offline.profiling import llm_keywords, rank_aggregators

    live_rows = len(cfg.experts) + sum(c.synthesises for c in grid(len(cfg.experts), target=target))

    async def work(flow: Flow, rows: list[int]) -> tuple:
        fit, choice, alone = await choose_served(flow, cfg, rows, target)
        questions = flow.data.questions
        keywords = await llm_keywords(flow.pipeline.generate, annotator, questions) if annotator else None
        ranking = None
        if select_aggregator:
            texts = {e: [alone[e].results[i].text for i in range(len(questions))] for e in fit.experts}
            ranking = await rank_aggregators(flow.pipeline.generate, fit.experts, questions, flow.data.gold, texts,
                                             fit.correct)
        return fit, choice, keywords, ranking

    return run_flow(cfg, settings, encoder, live_rows, work)
