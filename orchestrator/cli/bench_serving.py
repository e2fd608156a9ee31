"""``concilium bench scheduler``, ``bench calibrate``, ``bench api``, ``bench load``, ``bench budget``,
``bench chaos`` and ``bench remote``: what serving costs, side by side with the naive ways of doing it, and what it holds under
concurrent load and faults."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table

from orchestrator import env
from orchestrator.cli.common import MMLU_PRO, ConfigOpt, configure, err, friendly, int_list, out
from orchestrator.config import ConciliumConfig
from workers.errors import UserError


def bench_scheduler(
    n: Annotated[str, typer.Option(help="queries per burst; a comma list runs each size, e.g. 64,128,256")] = "128",
    new_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per answer (greedy)")] = 8,
    budget_gb: Annotated[float, typer.Option(min=0.001, help="a tight memory budget, e.g. one that fits one expert")]
    = 1.2,
    device: Annotated[str, typer.Option(help="the device the tight budget applies to: cpu or cuda:N")] = "cpu",
    max_batch: Annotated[int, typer.Option(min=1, help="the scheduler's window size")] = 64,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the figures as JSON")] = None,
    config: ConfigOpt = None,
) -> None:
    """Batched-by-expert vs naive per-query (load/generate/unload) vs resident without batching.

    With a config of simulated experts (from `concilium bench calibrate`, or a projection such as
    deploy/projection-16x8b.yaml) the same comparison runs on the cost model.
    """
    from dataclasses import asdict

    from orchestrator.bench.scheduler import run_scheduler_bench, time_scale
    from orchestrator.engine.runtime import init_ray

    sizes = int_list(n, "--n")
    cfg = configure(config)
    scale = time_scale(cfg.experts)
    init_ray(cfg.ray)
    with err.status("benchmarking the scheduler") as status:
        results = asyncio.run(
            run_scheduler_bench(cfg, sizes, new_tokens, budget_gb, device, max_batch, status.update)
        )
    kind = "" if scale == 1.0 else f", SIMULATED (time scale {scale:g}; clock figures in modelled seconds)"
    table = Table(title=f"scheduler, {new_tokens} new tokens per answer, {len(cfg.experts)} experts{kind}")
    for col in ("N", "budget", "variant", "loads", "wall s", "device s", "q/s", "q/s one device", "tok/s",
                "p50 s", "p95 s", "overhead ms/q"):
        table.add_column(col)
    for r in results:
        overhead = "-" if r.overhead_ms_per_query is None else f"{r.overhead_ms_per_query:.2f}"
        table.add_row(str(r.n), r.budget, r.variant, str(r.loads), f"{r.wall_s:.1f}", f"{r.device_s:.1f}",
                      f"{r.queries_per_s:.2f}", f"{r.serial_queries_per_s:.2f}", f"{r.tokens_per_s:.1f}",
                      f"{r.p50_s:.1f}", f"{r.p95_s:.1f}", overhead)
    out.print(table)
    by = {(r.n, r.budget, r.variant): r for r in results}
    for size in sizes:
        for (_, budget, variant) in [k for k in by if k[0] == size and k[2] != "batched"]:
            b, o = by[(size, budget, "batched")], by[(size, budget, variant)]
            out.print(f"N={size}, {budget}: batched / {variant} throughput = {b.queries_per_s / o.queries_per_s:.1f}x"
                      f" (on one shared device: {b.serial_queries_per_s / o.serial_queries_per_s:.1f}x)")
    if json_out is not None:
        json_out.write_text(json.dumps(
            [{**asdict(r), "serial_queries_per_s": r.serial_queries_per_s} for r in results], indent=2
        ))


def bench_calibrate(
    out_file: Annotated[Path, typer.Option("--out", help="write the simulated config here (YAML)")],
    batch_sizes: Annotated[str, typer.Option(help="batch sizes to time")] = "1,4,16",
    new_tokens: Annotated[int, typer.Option(min=1, help="tokens per timed call")] = 8,
    repeats: Annotated[int, typer.Option(min=1, help="timed repeats per point (medians are kept)")] = 3,
    time_scale: Annotated[float, typer.Option(min=1e-6, max=1.0, help="the simulated experts' time scale")] = 1.0,
    config: ConfigOpt = None,
) -> None:
    """Time each real expert's load and batched decoding, and write a config of simulated copies of them."""
    from orchestrator.bench.calibrate import calibrate, simulated_config
    from orchestrator.engine.runtime import init_ray

    sizes = int_list(batch_sizes, "--batch-sizes")
    cfg = configure(config)
    init_ray(cfg.ray)
    with err.status("calibrating") as status:
        results = asyncio.run(calibrate(cfg, sizes, new_tokens, repeats, status.update))
    table = Table(title="calibrated cost model (medians)")
    for col in ("expert", "device", "memory GB", "load s", "step ms by batch", "step ms", "ms per extra row"):
        table.add_column(col)
    for c in results:
        steps = ", ".join(f"{b}: {t * 1000:.1f}" for b, t in c.step_s_by_batch.items())
        table.add_row(c.expert, c.device, f"{c.memory_gb:.2f}", f"{c.load_s:.2f}", steps,
                      f"{c.step_s * 1000:.2f}", f"{c.step_s_per_row * 1000:.2f}")
    out.print(table)
    out_file.write_text(
        "# Written by `concilium bench calibrate`: simulated copies of the configured experts.\n"
        + yaml.safe_dump(simulated_config(cfg, results, time_scale), sort_keys=False)
    )
    err.print(f"wrote {out_file}; run: concilium bench scheduler --config {out_file}", highlight=False)


def bench_api(
    n: Annotated[int | None, typer.Option(min=10, help="timed rounds (default: 200, or 20 with --stream)")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="time to first token of streamed answers")] = False,
    max_tokens: Annotated[int, typer.Option(min=1, help="tokens per streamed answer")] = 32,
    config: ConfigOpt = None,
) -> None:
    """API overhead: p50/p99 of /v1/route, and /v1/query against calling the pipeline directly.

    Without --config it runs two simulated experts (1 ms per step, nothing to load), so the experts' own
    time is small and the differences are the API's. With --stream: time to first token and to the end for
    the first expert's stream from the pool, the same through /v1/chat/completions, and a synthesis; without
    --config, the bundled experts.
    """
    from orchestrator.bench.api import default_experts, run_api_bench
    from orchestrator.engine.runtime import init_ray

    if stream:
        cfg = configure(config)
        init_ray(cfg.ray)
        _bench_streams(cfg, n or 20, max_tokens)
        return
    n = n or 200
    cfg = configure(config) if config else ConciliumConfig(experts=default_experts())
    init_ray(cfg.ray)
    with err.status("benchmarking the API") as status:
        results = asyncio.run(run_api_bench(cfg, n, status.update))
    table = Table(title=f"API latency, {n} sequential rounds, experts {[e.name for e in cfg.experts]}")
    for col in ("path", "n", "p50 ms", "p99 ms"):
        table.add_column(col)
    for r in results:
        table.add_row(r.path, str(r.n), f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}")
    out.print(table)
    direct, http = results[0], results[1]
    out.print(f"/v1/query overhead over the pipeline: p50 {http.p50_ms - direct.p50_ms:+.2f} ms "
              f"({http.p50_ms / direct.p50_ms:.2f}x)")


def _bench_streams(cfg: ConciliumConfig, n: int, max_tokens: int) -> None:
    from orchestrator.bench.api import run_stream_bench

    with err.status("benchmarking streams") as status:
        results = asyncio.run(run_stream_bench(cfg, n, max_tokens, status.update))
    table = Table(title=f"Streamed answers, {n} sequential rounds, {max_tokens} tokens, "
                        f"experts {[e.name for e in cfg.experts]}")
    for col in ("path", "n", "TTFT p50 ms", "TTFT p99 ms", "total p50 ms", "total p99 ms"):
        table.add_column(col)
    for r in results:
        table.add_row(r.path, str(r.n), *(f"{v:.1f}" for v in (r.ttft_p50_ms, r.ttft_p99_ms, r.total_p50_ms,
                                                                 r.total_p99_ms)))
    out.print(table)
    direct, api = results[0], results[1]
    out.print(f"first token through the API vs the pool: p50 {api.ttft_p50_ms - direct.ttft_p50_ms:+.1f} ms "
              f"({api.ttft_p50_ms / direct.ttft_p50_ms:.2f}x)")


def bench_load(
    clients: Annotated[int, typer.Option(min=1, max=1024, help="concurrent clients")] = 64,
    requests: Annotated[int, typer.Option(min=1, max=1000, help="requests per client, one after another")] = 20,
    url: Annotated[str | None, typer.Option(help="a running server on loopback; default: start a replay server")]
    = None,
    data: Annotated[Path, typer.Option(help="bench-data folder the started server's replay experts answer from")]
    = MMLU_PRO,
    max_pending: Annotated[int, typer.Option(min=1, help="the started server's routing.max_pending")] = 32,
    time_limit_s: Annotated[float, typer.Option(min=1, help="stop the whole run after this long")] = 600,
    request_timeout_s: Annotated[float, typer.Option(min=0.1, help="client timeout per request")] = 120,
    api_key: Annotated[str | None, typer.Option(envvar=env.CLIENT_API_KEY, help="for a server with keys")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write every request's outcome as JSON")] = None,
) -> None:
    """Many concurrent clients against the API; every request is accounted for (answered, rejected, lost).

    Without --url it starts `concilium serve` with three replay experts (recorded MMLU-Pro answers, the cache
    off) and checks each answer against the recording. Exits 1 if any request was lost, unfinished or
    duplicated.
    """
    from orchestrator.bench.load import (
        StartedServer,
        expected_answers,
        replay_server_config,
        require_loopback,
        run_load,
        write_report,
    )
    from workers.recorded import load_recorded

    server, expected = None, None
    if url is not None:
        require_loopback(url)
        questions = [r.text for r in load_recorded(data).records]
    else:
        config = replay_server_config(data, max_pending)
        expected = expected_answers(config)
        questions = list(expected)
        with err.status("starting a replay server"):
            server = StartedServer(config)
        url = server.url
    try:
        with err.status("load test") as status:
            report = asyncio.run(run_load(url, clients, requests, questions, expected, time_limit_s,
                                          request_timeout_s, api_key, status.update))
    finally:
        if server is not None:
            server.stop()
    table = Table(title=f"{clients} clients x {requests} requests against {url}, {report.wall_s:.1f} s")
    table.add_column("figure")
    table.add_column("value", justify="right")
    c = report.counts
    rows = [("sent", report.sent), *((k, c.get(k, 0)) for k in ("answered", "rejected", "lost", "unfinished")),
            ("duplicated", report.duplicated), ("p50 ms (answered)", f"{report.p50_ms or 0:.1f}"),
            ("p99 ms (answered)", f"{report.p99_ms or 0:.1f}"), ("answered per s", f"{report.answered_per_s:.1f}")]
    for name, value in rows:
        table.add_row(name, str(value))
    out.print(table)
    out.print("answers checked against the recording: " + ("yes" if report.checked_answers else "no (--url)"))
    for o in [o for o in report.outcomes if o.outcome in ("lost", "unfinished")][:10]:
        out.print(f"  {o.request_id}: {o.outcome}: {o.detail}", highlight=False)
    if json_out is not None:
        write_report(report, json_out)
    out.print("every request accounted for: answered + rejected = sent, none duplicated" if report.accounted
              else "[bold red]NOT every request is accounted for[/]")
    if not report.accounted:
        raise typer.Exit(1)


def bench_budget(
    requests: Annotated[int, typer.Option(min=1, max=1024, help="concurrent requests of the limited key")] = 64,
    fits: Annotated[int, typer.Option(min=1, help="the budget fits this many requests like the probe")] = 10,
    usd: Annotated[bool, typer.Option("--usd", help="a USD budget instead of a token budget")] = False,
    over_budget: Annotated[str, typer.Option(help="refuse (reserve all a plan can spend) or fit (the first round)")]
    = "refuse",
    query: Annotated[str, typer.Option(help="what every request asks")] = "What is the capital of France?",
    max_tokens: Annotated[int, typer.Option(min=1, help="each request's max_tokens")] = 32,
    expert: Annotated[list[str] | None, typer.Option(help="only these experts (repeat the option); default: as "
                                                    "the server routes")] = None,
    timeout_s: Annotated[float, typer.Option(min=1, help="client timeout per request")] = 600,
    repeats: Annotated[int, typer.Option(min=1, help="lone requests per key for the reservation's latency")] = 10,
    config: ConfigOpt = None,
) -> None:
    """Concurrent requests of one key against a daily budget that fits --fits of them: nothing may overshoot.

    Starts `concilium serve` with the config's experts (the cache off), learns one request's usage from a probe,
    times lone requests with and without a budget (--repeats each, alternated), sets the budget to --fits times
    the probe, then sends --requests at once. Exits 1 on any overshoot, a reservation
    left held, or an outcome other than 200 or 429 budget_exceeded.
    """
    from orchestrator.bench.budget import BudgetBench, run_budget

    if over_budget not in ("refuse", "fit"):
        raise UserError(f"--over-budget: {over_budget!r} is neither refuse nor fit")
    body: dict[str, object] = {"query": query, "max_tokens": max_tokens, **({"experts": expert} if expert else {})}
    with err.status("starting a server"):
        bench = BudgetBench(configure(config).model_dump(mode="json"))
    try:
        with err.status(f"{requests} concurrent requests against a budget that fits {fits}"):
            report = asyncio.run(run_budget(bench, body, requests, fits, "usd" if usd else "tokens", over_budget,
                                            timeout_s, repeats))
    finally:
        bench.stop()
    table = Table(title=f"{requests} concurrent requests, a {report.unit} budget that fits {fits}, "
                        f"over_budget {over_budget}, {report.wall_s:.1f} s")
    table.add_column("figure")
    table.add_column("value", justify="right")
    fmt = (lambda v: f"{v:g}") if report.unit == "tokens" else (lambda v: f"${v:.8f}")
    for name, value in [("sent", report.sent), ("served (200)", report.served),
                        ("refused (429 budget_exceeded)", report.refused), ("other", len(report.other)),
                        ("served with a degraded note", report.degraded),
                        ("one request (probe)", fmt(report.probe)), ("budget", fmt(report.budget)),
                        ("spent", fmt(report.spent)), ("served answers' own usage", fmt(report.served_spent)),
                        ("overshoot", fmt(report.overshoot)), ("still reserved", fmt(report.reserved)),
                        ("lone request p50, no budget (ms)", f"{report.free_ms:.1f}"),
                        ("lone request p50, with a budget (ms)", f"{report.metered_ms:.1f}"),
                        ("with / without", f"{report.metered_ms / report.free_ms:.3f}x")]:
        table.add_row(name, str(value))
    out.print(table)
    for line in report.other[:5]:
        out.print(f"  other: {line}", highlight=False)
    out.print("no overshoot, every request accounted for" if report.ok else "FAILED: see the table")
    raise typer.Exit(0 if report.ok else 1)


def bench_chaos(
    runs: Annotated[int, typer.Option(min=1, max=20, help="how many times to run the whole scenario")] = 3,
    duration_s: Annotated[float, typer.Option(min=10, help="load per run, with the faults in its first 4/5")] = 40,
    streams: Annotated[int, typer.Option(min=1, max=256, help="streaming clients (the openai package)")] = 32,
    queries: Annotated[int, typer.Option(min=0, max=64, help="plain /v1/query clients")] = 4,
    jobs: Annotated[int, typer.Option(min=0, max=64, help="job-submitting clients")] = 4,
) -> None:
    """Streaming load on two API processes sharing redis, while an expert actor is killed mid-stream, another
    stalls, redis-server restarts and an API process is killed (docs/reliability.md, "Chaos").

    Exits 1 if any run had a client that hung, a connection cut anywhere but on the killed process, a lost
    job, or usage that differs from the costs of the answers served by a cent or more.
    """
    from orchestrator.bench.chaos import ChaosSettings, run_chaos

    settings = ChaosSettings(duration_s=duration_s, streams=streams, queries=queries, jobs=jobs)
    reports = []
    for run in range(1, runs + 1):
        with err.status(f"chaos run {run} of {runs}") as status:
            reports.append(asyncio.run(run_chaos(settings, status.update)))
        report = reports[-1]
        table = Table(title=f"chaos run {run} of {runs}: outcomes by client kind")
        for column in ("client", "outcome", "requests", "e.g."):
            table.add_column(column)
        for (kind, result), n in sorted(report.counts().items()):
            example = next((o.detail for o in report.outcomes if (o.kind, o.result) == (kind, result) and o.detail), "")
            table.add_row(kind, result, str(n), example[:90])
        out.print(table)
        for at, what in report.faults:
            out.print(f"  t={at:>5.1f} s  {what}", highlight=False)
        states = Counter(report.jobs.values())
        out.print(f"  jobs: {dict(states)}; usage ${report.usage_usd:.6f} against the answers' ${report.served_usd:.6f} "
                  f"(difference ${report.usage_usd - report.served_usd:+.6f}); hung {report.hung}, cuts off the killed "
                  f"process {report.stray_cuts}: " + ("ok" if report.ok else "FAILED"), highlight=False)
    raise typer.Exit(0 if all(r.ok for r in reports) else 1)


def bench_remote(
    n: Annotated[int, typer.Option(min=1, help="alternated pairs for time to first token and call overhead")] = 50,
    faulted: Annotated[int, typer.Option(min=0, help="streamed requests while the proxy injects faults")] = 500,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="requests in flight in the faulted part")] = 16,
    seed: Annotated[int, typer.Option(help="the faults' random draw")] = 0,
) -> None:
    """A remote expert: its time to first token and call overhead against the upstream alone, then streamed
    requests under injected 429s, 503s and cuts (docs/reliability.md, "Remote experts").

    Exits 1 if a faulted request failed, or a client could not tell its final answer from what it received.
    """
    from orchestrator.bench.remote import run_remote

    with err.status("remote expert bench") as status:
        r = run_remote(n, faulted, concurrency, seed, status.update)
    table = Table(title=f"a remote expert, medians of {n} alternated pairs")
    for column in ("figure", "upstream alone", "through Concilium", "difference"):
        table.add_column(column, justify="right")
    table.add_row("time to first token, streamed (ms)", f"{r.ttft_direct_ms:.1f}", f"{r.ttft_front_ms:.1f}",
                  f"{r.ttft_front_ms - r.ttft_direct_ms:+.1f}")
    table.add_row("one streamed call: bare httpx vs the backend (ms)", f"{r.call_bare_ms:.1f}",
                  f"{r.call_backend_ms:.1f}", f"{r.call_backend_ms - r.call_bare_ms:+.1f}")
    out.print(table)
    out.print(f"faulted: {r.sent} streamed requests, {len(r.failed)} failed, {r.restarts} restarts announced, "
              f"{r.unreadable} clients unable to tell their final answer, {r.retried_answers} answers that needed "
              f"retries; the proxy: {r.proxy}", highlight=False)
    for line in r.failed[:5]:
        out.print(f"  failed: {line}", highlight=False)
    for reason, count in Counter(r.reasons).most_common(5):
        out.print(f"  restarted {count}x: {reason}", highlight=False)
    raise typer.Exit(0 if not r.failed and not r.unreadable else 1)


def register(bench_app: typer.Typer) -> None:
    bench_app.command("scheduler")(friendly(bench_scheduler))
    bench_app.command("calibrate")(friendly(bench_calibrate))
    bench_app.command("api")(friendly(bench_api))
    bench_app.command("load")(friendly(bench_load))
    bench_app.command("budget")(friendly(bench_budget))
    bench_app.command("chaos")(friendly(bench_chaos))
    bench_app.command("remote")(friendly(bench_remote))
