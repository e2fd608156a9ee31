"""``concilium eval`` and ``concilium profile``: routers measured and profiled on recorded or live outcomes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from orchestrator.cli.common import (
    ConfigOpt,
    EncoderOpt,
    MaxTokOpt,
    StoreOpt,
    UsageError,
    configure,
    err,
    friendly,
    names,
    offline_embedder,
    out,
    with_pool,
)
from orchestrator.config import ConciliumConfig
from routers.base import RouteOptions
from routers.learned import PLANNED
from routers.registry import ROUTERS
from routers.vocabulary import AUTO_ROUTER, OFFLINE_AGGREGATIONS, POLICIES, Aggregation, Encoder, Policy


def eval_(
    train: Annotated[Path, typer.Option(help="bench-data folder (models.json + data.jsonl) to profile on")],
    router: Annotated[str, typer.Option(help=f"{AUTO_ROUTER} (select by nested CV), " + ", ".join(ROUTERS))]
    = AUTO_ROUTER,
    test: Annotated[Path | None, typer.Option(help="measure here instead of cross-validating on --train")] = None,
    pool: Annotated[str | None, typer.Option(help="a named pool, e.g. open-small")] = None,
    models: Annotated[str | None, typer.Option(help="comma-separated model names from the data")] = None,
    k: Annotated[int, typer.Option(help="experts recruited per query")] = 3,
    aggregation: Annotated[str, typer.Option(help=" or ".join(OFFLINE_AGGREGATIONS))] = Aggregation.VOTE,
    policy: Annotated[str, typer.Option(help=", ".join(POLICIES))] = Policy.TOPK,
    cost_lambda: Annotated[float, typer.Option("--lambda", help="cost weight for --policy cost")] = 0.0,
    budget_share: Annotated[
        float | None, typer.Option(help="hold mean cost <= F x the most accurate single expert's (solves lambda)")
    ] = None,
    max_experts: Annotated[
        float | None, typer.Option(help="hold the mean expert calls per query <= N (solves lambda; adaptive, cascade)")
    ] = None,
    embedder: EncoderOpt = Encoder.STATIC,
    folds: Annotated[int, typer.Option(help="cross-validation folds")] = 5,
    seed: Annotated[int, typer.Option(help="seed for folds and sampling")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the result as JSON")] = None,
    plots: Annotated[Path | None, typer.Option(help="write PNG plots here: accuracy vs k, cost frontier")] = None,
) -> None:
    """Evaluate a router offline on recorded outcomes, with its baselines on the same folds."""
    from orchestrator.offline.evaluation import EvalSettings, evaluate
    from routers.scoring.crossval import CostTarget

    if not train.is_dir():
        raise UsageError(f"--train {train} is not a folder")
    if budget_share is not None and max_experts is not None:
        raise UsageError("give --budget-share or --max-experts, not both")
    if budget_share is not None and policy not in PLANNED:
        policy = Policy.COST
    options = RouteOptions(k=k, policy=policy, cost_lambda=cost_lambda, seed=seed)
    budget = None if budget_share is None and max_experts is None else CostTarget(budget_share, max_experts)
    settings = EvalSettings(train, router, options, aggregation, folds, test, pool, names(models), budget, seed, plots)
    with err.status("evaluating") as status:
        result = evaluate(settings, offline_embedder(configure(None), embedder),
                          on_fold=lambda i: status.update(f"fold {i + 1} done"))
    table = Table(title=f"{router} ({policy}, k={k}, {aggregation}): {result['protocol']}")
    for col in ("method", "accuracy", "mean cost (USD)"):
        table.add_column(col)

    def row(name: str, acc: float, cost: float | None) -> None:
        table.add_row(name, f"{acc:.2%}", "-" if cost is None else f"{cost:.6f}")

    row(f"{router} router", result["accuracy"], result["mean_cost"])
    for name, b in result["baselines"].items():
        row(name + (f" ({b['name']})" if "name" in b else ""), b["accuracy"], b["mean_cost"])
    out.print(table)
    _notes(result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))


def _notes(result: dict) -> None:
    """What the table does not show: calls, calibration, the budget on the test folds, selection, AIQ."""
    if "mean_experts" in result:
        out.print(f"expert calls per query: {result['mean_experts']:.2f}; calibration error (ECE, 10 bins): "
                  f"{result['calibration_error']:.4f}")
    if "budget" in result:
        out.print(f"budget on the test folds: {result['budget']}", highlight=False)
    if "chosen_per_fold" in result:
        out.print(f"selection chose, per outer fold: {', '.join(result['chosen_per_fold'])}")
    if result.get("consensus_rate") is not None:
        out.print(f"consensus (aggregator skipped): {result['consensus_rate']:.1%} of queries")
    if "aiq" in result:
        a = result["aiq"]
        out.print(f"AIQ over the single models' cost range: router {a['router']:.4f}, "
                  f"single models {a['single_models']:.4f}")


def profile(
    out_dir: Annotated[Path | None, typer.Option("--out", help="artifacts folder; each run adds a version "
                                                 "(default: routing.profiles)")] = None,
    data: Annotated[Path | None, typer.Option(help="imported: a bench-data folder of recorded outcomes")] = None,
    pool: Annotated[str | None, typer.Option(help="imported: a named pool, e.g. open-small")] = None,
    models: Annotated[str | None, typer.Option(help="imported: comma-separated model names")] = None,
    tasks: Annotated[Path | None, typer.Option(help="live: a task file with gold answers (*_train.json)")] = None,
    starter: Annotated[bool, typer.Option(help="live: the 32 starter questions that ship with Concilium (what "
                                          "`make serve` profiles the bundled experts on)")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="live: use only the first N questions")] = None,
    annotator: Annotated[
        str | None, typer.Option(help="live: a configured expert that names each question's skills (5 samples)")
    ] = None,
    select_aggregator: Annotated[
        bool, typer.Option(help="live: rank aggregators by the synthesis test (one right, two wrong answers)")
    ] = True,
    embedder: EncoderOpt = Encoder.STATIC,
    max_new_tokens: MaxTokOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Fit every candidate router on recorded outcomes (--data) or a live run (--tasks), pick the best by
    cross-validation, and save them all as a profile version; `auto`, the service's default router, is the pick."""
    from orchestrator import artifacts
    from orchestrator.offline.data import load_eval_data

    if starter:
        if tasks is not None:
            raise UsageError("give --starter or --tasks, not both")
        tasks = STARTER_TASKS
    if (data is None) == (tasks is None):
        raise UsageError("give exactly one source: --data DIR (imported), --tasks FILE or --starter (live)")
    if annotator is not None and tasks is None:
        raise UsageError("--annotator needs a live run (--tasks): recorded outcomes carry no expert to ask")
    from routers.scoring.crossval import scored_as

    cfg = configure(config, store)
    encoder = offline_embedder(cfg, embedder)
    keywords, agg_accuracy = None, None
    if data is not None:
        with err.status("embedding the questions"):
            outcomes = load_eval_data(data, encoder, pool, names(models))
        source: dict[str, object] = {"kind": "imported", "data": str(data), "pool": pool}
    else:
        outcomes, keywords, agg_accuracy = _live(cfg, tasks, limit, max_new_tokens, annotator, select_aggregator)
        source = {"kind": "live", "tasks": str(tasks), "limit": limit, "annotator": annotator or "embedding"}
    r = cfg.routing
    with err.status("fitting and selecting routers, building the skill index"):
        folder, summary = artifacts.save(outcomes, encoder, embedder, out_dir or r.profiles, source, _options(cfg),
                                        scored_as(r.aggregation, r.k), keywords, agg_accuracy)
    _print_profile(folder, summary)


def _options(cfg: ConciliumConfig) -> RouteOptions:
    """The deployment's routing settings, under which the candidates compete."""
    return RouteOptions(k=cfg.routing.k, policy=cfg.routing.policy)


def _live(cfg: ConciliumConfig, tasks: Path, limit: int | None, max_new_tokens: int | None, annotator: str | None,
          select_aggregator: bool) -> tuple:
    """The configured experts answer the task file: their outcomes, an annotator's keywords, aggregator scores."""
    from orchestrator.offline.profiling import load_tasks, profile_live

    if annotator is not None:
        cfg.expert(annotator)
    loaded = load_tasks(tasks, limit)
    with Progress(console=err) as bar:
        task = bar.add_task("experts answering", total=len(cfg.experts))
        live = asyncio.run(with_pool(cfg, lambda p: profile_live(
            p, loaded, max_new_tokens, annotator, select_aggregator,
            on_expert=lambda _e: bar.advance(task), on_stage=lambda s: bar.update(task, description=s),
        )))
    return live.data, live.keywords, live.aggregator_accuracy


def _print_profile(folder: Path, summary: dict) -> None:
    table = Table(title=f"profiles saved to {folder}")
    for col in ("expert", "accuracy", "global strength", "best skills"):
        table.add_column(col, overflow="fold")
    for name, e in summary["experts"].items():
        table.add_row(name, f"{e['accuracy']:.1%}", f"{e['global_strength']:.3f}", ", ".join(e["best_skills"]))
    out.print(table)
    selection = summary["selection"]
    scores = ", ".join(f"{n} {s:.2%}" for n, s in selection.get("scores", {}).items())
    out.print(f"router selected: {selection['chosen']} ({scores or selection['rule']})", highlight=False)


STARTER_TASKS = Path(__file__).resolve().parents[1] / "data" / "starter_tasks.json"
"""Plain questions with gold answers, written for the bundled experts: enough to profile them in a minute."""


def register(app: typer.Typer) -> None:
    app.command("eval")(friendly(eval_))
    app.command()(friendly(profile))

