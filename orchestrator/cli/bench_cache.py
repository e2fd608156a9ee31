"""``concilium bench cache`` and ``bench tracing``: the semantic cache's threshold curve and lookup time, and
what tracing costs a request."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from orchestrator import env
from orchestrator.cli.common import err, friendly, out
from routers.vocabulary import Encoder


def bench_cache(
    encoders: Annotated[list[Encoder], typer.Option("--encoder", help="encoders to measure (repeat)")] = (
        Encoder.MINILM, Encoder.STATIC),
    entries: Annotated[int, typer.Option(min=0, help="cached queries when lookups are timed; 0: no timing")] = 100_000,
    redis_url: Annotated[str | None, typer.Option(help="time lookups against this redis (default: in-process)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write every figure here")] = None,
) -> None:
    """The semantic cache on the 315 labelled pairs (orchestrator/data/paraphrases.jsonl): paraphrases served
    and near misses served (false hits) at each threshold, the least threshold with at most 1% false hits, and
    the lookup time among ``entries`` cached queries (docs/benchmarks.md, "Semantic cache")."""
    from orchestrator.bench.cache import MAX_FALSE, curve, lookup_time

    reports = []
    for kind in encoders:
        with err.status(f"{kind}: the curve") as status:
            report = curve(kind, env.model_store_root())
            if entries:
                lookup_time(report, kind, env.model_store_root(), entries, redis_url, status.update)
        reports.append(report)
        table = Table(title=f"{kind}: {report.pairs} labelled pairs; chosen threshold {report.chosen} "
                            f"(the least with false hits <= {MAX_FALSE:.0%})")
        for column in ("threshold", "paraphrases served", "near misses served", "without the guard"):
            table.add_column(column, justify="right")
        for p in report.curve:
            table.add_row(f"{p.threshold:.2f}", f"{p.hit_rate:.1%}", f"{p.false_rate:.1%}",
                          f"{p.false_rate_unguarded:.1%}")
        out.print(table)
        out.print(f"{kind}: the rule cross-validated by question (5 folds): paraphrases served "
                  f"{report.cv_hit_rate:.1%}, near misses served {report.cv_false_rate:.1%}", highlight=False)
        if entries:
            out.print(f"{kind}: lookup among {report.entries:,} entries ({'redis' if redis_url else 'in-process'}"
                      f" store): p50 hit {report.p50('hit'):.2f} ms ({len(report.hit_ms)}), p50 miss "
                      f"{report.p50('miss'):.2f} ms ({len(report.miss_ms)}); index built in "
                      f"{report.index_build_s:.1f} s", highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps([asdict(r) for r in reports], indent=2))


def bench_tracing(
    requests: Annotated[int, typer.Option(min=2, help="requests on each side")] = 400,
    block: Annotated[int, typer.Option(min=1, help="requests per block; on and off blocks alternate")] = 20,
) -> None:
    """What tracing costs ``/v1/query``: the in-memory exporter on against off, alternated in one server
    (docs/benchmarks.md, "Tracing")."""
    from orchestrator.bench.tracing import run_tracing

    with err.status("tracing bench") as status:
        r = run_tracing(requests, block, status.update)
    table = Table(title=f"/v1/query, 2 simulated experts with a synthesis; medians of {len(r.on_ms)} requests each")
    for column in ("exporter off (ms)", "exporter on (ms)", "difference (ms)", "spans per request"):
        table.add_column(column, justify="right")
    table.add_row(f"{r.off_p50:.2f}", f"{r.on_p50:.2f}", f"{r.on_p50 - r.off_p50:+.2f}", f"{r.spans_per_request:.1f}")
    out.print(table)


def register(bench_app: typer.Typer) -> None:
    bench_app.command("cache")(friendly(bench_cache))
    bench_app.command("tracing")(friendly(bench_tracing))
