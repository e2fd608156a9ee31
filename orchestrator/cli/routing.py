"""``concilium eval`` and ``concilium profile``: routers measured and profiled on recorded or live outcomes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from orchestrator.cli import live as live_cli
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
)
from routers.base import RouteOptions
from routers.learned import PLANNED
from routers.registry import ROUTERS
from routers.vocabulary import AUTO_ROUTER, OFFLINE_AGGREGATIONS, POLICIES, Aggregation, Encoder, Policy

if TYPE_CHECKING:
    from orchestrator.offline.evaluation import EvalSettings


def eval_(
    train: Annotated[Path | None, typer.Option(help="bench-data folder (models.json + data.jsonl); with --live, "
                                                    "also a labelled JSONL or task file")] = None,
    router: Annotated[str, typer.Option(help=f"{AUTO_ROUTER} (select by nested CV; with --live, a set of "
                                             "configurations), " + ", ".join(ROUTERS))] = AUTO_ROUTER,
    test: Annotated[Path | None, typer.Option(help="measure here instead of cross-validating on --train")] = None,
    pool: Annotated[str | None, typer.Option(help="a named pool, e.g. open-small")] = None,
    models: Annotated[str | None, typer.Option(help="comma-separated model names from the data")] = None,
    k: Annotated[int, typer.Option(help="experts recruited per query")] = 3,
    aggregation: Annotated[str, typer.Option(help=" or ".join(OFFLINE_AGGREGATIONS) + "; live also "
                                                  "synthesize")] = Aggregation.VOTE,
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
    plots: Annotated[Path | None, typer.Option(help="write PNG plots here (live: live.png, accuracy against "
                                                    "latency and cost)")] = None,
    live: Annotated[bool, typer.Option(help="ask the questions through the served pipeline (the configured "
                                            "experts), each expert alone and each configuration")] = False,
    starter: Annotated[bool, typer.Option(help="live: the starter questions that ship with Concilium")] = False,
    half: Annotated[str, typer.Option(help="live: all, profile or report (the half profile does not use)")] = "all",
    limit: Annotated[int | None, typer.Option(min=1, help="live: the first N questions")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="live: requests in flight")] = 8,
    candidates: Annotated[str, typer.Option(help="live, --router auto: default, grid, parity (the "
                                                  "configurations checked against offline picks) or none "
                                                  "(the experts alone, and with --served the default)")] = "default",
    served: Annotated[bool, typer.Option(help="live: the newest profile's routers and served default, no CV")] = False,
    max_new_tokens: MaxTokOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Evaluate routing: offline on recorded outcomes with its baselines on the same folds, or with --live the
    answers the service returns, graded, beside each expert alone."""
    from orchestrator.offline.evaluation import EvalSettings
    from routers.scoring.crossval import CostTarget

    if budget_share is not None and max_experts is not None:
        raise UsageError("give --budget-share or --max-experts, not both")
    if budget_share is not None and policy not in PLANNED:
        policy = Policy.COST
    target = None if budget_share is None and max_experts is None else CostTarget(budget_share, max_experts)
    if live:
        from orchestrator.evals.candidates import Candidate
        from orchestrator.evals.runs import LiveSettings

        cfg = configure(config)
        given = None if router == AUTO_ROUTER else Candidate(router, k, Aggregation(aggregation), Policy(policy),
                                                             cost_lambda, target, seed=seed)
        data = live_cli.STARTER if starter else train
        if data is None:
            raise UsageError("give --train FILE or --starter")
        chosen = live_cli.candidates(candidates, len(cfg.experts), given, target)
        settings = LiveSettings(data, chosen, folds, seed, half, limit, concurrency, max_new_tokens, served)
        live_cli.live_eval(cfg, settings, offline_embedder(cfg, embedder), json_out, plots and plots / "live.png")
        return
    if train is None or not train.is_dir():
        raise UsageError(f"--train {train} is not a folder")
    _offline(EvalSettings(train, router, RouteOptions(k=k, policy=policy, cost_lambda=cost_lambda, seed=seed),
                          aggregation, folds, test, pool, names(models), target, seed, plots), embedder, json_out)


def _offline(settings: EvalSettings, embedder: str, json_out: Path | None) -> None:
    """The offline evaluation's table and notes."""
    from orchestrator.offline.evaluation import evaluate

    router, policy, k, aggregation = settings.router, settings.options.policy, settings.options.k, settings.aggregation
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
    tasks: Annotated[Path | None, typer.Option(help="live: labelled questions (JSONL, a task file, or a "
                                               "bench-data folder with gold answers)")] = None,
    starter: Annotated[bool, typer.Option(help="live: the starter questions that ship with Concilium, their "
                                          "profile half (what `make serve` profiles the bundled experts on)")] = False,
    half: Annotated[str | None, typer.Option(help="live: all, profile or report (default: profile with --starter, "
                                             "else all)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="live: use only the first N questions")] = None,
    annotator: Annotated[
        str | None, typer.Option(help="live: a configured expert that names each question's skills (5 samples)")
    ] = None,
    select_aggregator: Annotated[
        bool, typer.Option(help="live: rank aggregators by the synthesis test (one right, two wrong answers)")
    ] = True,
    budget_share: Annotated[float | None, typer.Option(help="hold every configuration's mean cost <= F x the best "
                                                       "single expert's (a budgeted deployment)")] = None,
    folds: Annotated[int, typer.Option(min=2, help="cross-validation folds")] = 5,
    concurrency: Annotated[int, typer.Option(min=1, help="live: requests in flight")] = 8,
    embedder: EncoderOpt = Encoder.STATIC,
    max_new_tokens: MaxTokOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Choose the served configuration (router, k, aggregation, policy, cost weight) by cross-validation, on live
    answers (--tasks, --starter) or recorded outcomes (--data), against the best single expert alone; fit every
    candidate router on all the questions, and save them as a profile version that `auto` serves."""
    from orchestrator import artifacts
    from orchestrator.evals.runs import LiveSettings, choose_recorded, served_settings
    from orchestrator.offline.data import load_eval_data
    from routers.scoring.crossval import CostTarget

    if starter and tasks is not None:
        raise UsageError("give --starter or --tasks, not both")
    tasks = live_cli.STARTER if starter else tasks
    if (data is None) == (tasks is None):
        raise UsageError("give exactly one source: --data DIR (imported), --tasks FILE or --starter (live)")
    if annotator is not None and tasks is None:
        raise UsageError("--annotator needs a live run (--tasks): recorded outcomes carry no expert to ask")
    cfg = configure(config, store)
    encoder = offline_embedder(cfg, embedder)
    target = None if budget_share is None else CostTarget(share=budget_share)
    keywords, agg_accuracy = None, None
    if data is not None:
        with err.status("embedding the questions, then selecting the served configuration"):
            fit = load_eval_data(data, encoder, pool, names(models))
            choice = choose_recorded(fit, encoder, folds, target=target)
        source: dict[str, object] = {"kind": "imported", "data": str(data), "pool": pool}
    else:
        if annotator is not None:
            cfg.expert(annotator)
        settings = LiveSettings(tasks, None, folds, 0, half or ("profile" if starter else "all"), limit,
                                concurrency, max_new_tokens)
        fit, choice, keywords, agg_accuracy = live_cli.live_profile(cfg, settings, encoder, annotator,
                                                                    select_aggregator, target)
        source = {"kind": "live", "tasks": str(tasks), "half": settings.half, "limit": limit,
                  "annotator": annotator or "embedding"}
    with err.status("fitting every router on all the questions, building the skill index"):
        folder, summary = artifacts.save(fit, encoder, embedder, out_dir or cfg.routing.profiles, source,
                                        served_settings(choice, fit, encoder), keywords, agg_accuracy)
    _print_profile(folder, summary)


def _print_profile(folder: Path, summary: dict) -> None:
    table = Table(title=f"profiles saved to {folder}")
    for col in ("expert", "accuracy", "global strength", "best skills"):
        table.add_column(col, overflow="fold")
    for name, e in summary["experts"].items():
        table.add_row(name, f"{e['accuracy']:.1%}", f"{e['global_strength']:.3f}", ", ".join(e["best_skills"]))
    out.print(table)
    served = summary["served"]
    best = served["best_single"]
    out.print(f"served: {served['name']} (CV accuracy {served['cv_accuracy']:.2%} on {served['n_questions']} "
              f"questions; best single expert alone, {best['expert']}: {best['cv_accuracy']:.2%})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(friendly(eval_))
    app.command()(friendly(profile))

