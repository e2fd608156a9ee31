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
from routers.registry import ROUTERS
from routers.vocabulary import OFFLINE_AGGREGATIONS, POLICIES, Aggregation, Policy


def eval_(
    train: Annotated[Path, typer.Option(help="bench-data folder (models.json + data.jsonl) to profile on")],
    router: Annotated[str, typer.Option(help=", ".join(ROUTERS))] = "skill",
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
    folds: Annotated[int, typer.Option(help="cross-validation folds")] = 5,
    seed: Annotated[int, typer.Option(help="seed for folds and sampling")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the result as JSON")] = None,
    plots: Annotated[Path | None, typer.Option(help="write PNG plots here: accuracy vs k, cost frontier")] = None,
) -> None:
    """Evaluate a router offline on recorded outcomes, with its baselines on the same folds."""
    from orchestrator.offline.evaluation import evaluate
    from routers.base import RouteOptions

    if not train.is_dir():
        raise UsageError(f"--train {train} is not a folder")
    if budget_share is not None:
        policy = Policy.COST
    options = RouteOptions(k=k, policy=policy, cost_lambda=cost_lambda, seed=seed)
    with err.status("evaluating") as status:
        result = evaluate(
            train, test, offline_embedder(configure(None)), router, options, aggregation, folds, pool, names(models),
            budget_share, seed, on_fold=lambda i: status.update(f"fold {i + 1} done"), plots=plots,
        )
    table = Table(title=f"{router} ({policy}, k={k}, {aggregation}): {result['protocol']}")
    for col in ("method", "accuracy", "mean cost (USD)"):
        table.add_column(col)

    def row(name: str, acc: float, cost: float | None) -> None:
        table.add_row(name, f"{acc:.2%}", "-" if cost is None else f"{cost:.6f}")

    row(f"{router} router", result["accuracy"], result["mean_cost"])
    for name, b in result["baselines"].items():
        row(name + (f" ({b['name']})" if "name" in b else ""), b["accuracy"], b["mean_cost"])
    out.print(table)
    if result.get("consensus_rate") is not None:
        out.print(f"consensus (aggregator skipped): {result['consensus_rate']:.1%} of queries")
    if "aiq" in result:
        a = result["aiq"]
        out.print(f"AIQ over the single models' cost range: router {a['router']:.4f}, "
                  f"single models {a['single_models']:.4f}")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))


def profile(
    out_dir: Annotated[Path, typer.Option("--out", help="artifacts folder; each run adds a version")] = Path(
        "artifacts/profiles"
    ),
    data: Annotated[Path | None, typer.Option(help="imported: a bench-data folder of recorded outcomes")] = None,
    pool: Annotated[str | None, typer.Option(help="imported: a named pool, e.g. open-small")] = None,
    models: Annotated[str | None, typer.Option(help="imported: comma-separated model names")] = None,
    tasks: Annotated[Path | None, typer.Option(help="live: a task file with gold answers (*_train.json)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="live: use only the first N questions")] = None,
    annotator: Annotated[
        str | None, typer.Option(help="live: a configured expert that names each question's skills (5 samples)")
    ] = None,
    select_aggregator: Annotated[
        bool, typer.Option(help="live: rank aggregators by the synthesis test (one right, two wrong answers)")
    ] = True,
    max_new_tokens: MaxTokOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Build expert profiles and the FAISS skill index from recorded outcomes (--data) or a live run (--tasks)."""
    from orchestrator.offline.evaluation import load_eval_data
    from orchestrator.offline.profiling import load_tasks, profile_live, save_artifacts

    if (data is None) == (tasks is None):
        raise UsageError("give exactly one source: --data DIR (imported) or --tasks FILE (live)")
    if annotator is not None and tasks is None:
        raise UsageError("--annotator needs a live run (--tasks): recorded outcomes carry no expert to ask")
    cfg = configure(config, store)
    embedder = offline_embedder(cfg)
    keywords, agg_accuracy = None, None
    if data is not None:
        with err.status("embedding the questions"):
            ev = load_eval_data(data, embedder, pool, names(models))
        texts, correct, experts, cost = ev.texts, ev.correct, ev.experts, ev.cost
        source: dict[str, object] = {"kind": "imported", "data": str(data), "pool": pool}
    else:
        if annotator is not None:
            cfg.expert(annotator)
        questions, gold = load_tasks(tasks, limit)
        with Progress(console=err) as bar:
            task = bar.add_task("experts answering", total=len(cfg.experts))
            live = asyncio.run(with_pool(cfg, lambda p: profile_live(
                p, questions, gold, max_new_tokens, annotator, select_aggregator,
                on_expert=lambda _e: bar.advance(task), on_stage=lambda s: bar.update(task, description=s),
            )))
        correct, keywords, agg_accuracy = live.correct, live.keywords, live.aggregator_accuracy
        texts, experts, cost = questions, [e.name for e in cfg.experts], None
        source = {"kind": "live", "tasks": str(tasks), "limit": limit, "annotator": annotator or "embedding"}
    with err.status("annotating skills and building the index"):
        folder, summary = save_artifacts(
            texts, correct, experts, cost, embedder, out_dir, source, keywords, agg_accuracy
        )
    table = Table(title=f"profiles saved to {folder}")
    for col in ("expert", "accuracy", "global strength", "best skills"):
        table.add_column(col, overflow="fold")
    for name, e in summary["experts"].items():
        table.add_row(name, f"{e['accuracy']:.1%}", f"{e['global_strength']:.3f}", ", ".join(e["best_skills"]))
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(friendly(eval_))
    app.command()(friendly(profile))

