"""``concilium ask`` and ``concilium serve``: the routed pipeline once, from the shell, or as the HTTP API."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.table import Table

from orchestrator.cli.common import (
    ConfigOpt,
    MaxTokOpt,
    StoreOpt,
    TempOpt,
    UsageError,
    configure,
    err,
    friendly,
    names,
    out,
)
from orchestrator.config import ConciliumConfig
from routers.vocabulary import AGGREGATIONS, LATENT_ROUTER, POLICIES
from workers.types import Prompt


def ask(
    question: Annotated[str, typer.Argument(help="the question")],
    k: Annotated[int | None, typer.Option(help="experts recruited (default: the profile's served configuration, "
                                            "else routing.k; latent.k for --router latent)")] = None,
    router: Annotated[str | None, typer.Option(help="a router by name: auto (the profile's selected router), any "
                                                    "candidate it holds (cluster, logistic, irt, skill, knn, "
                                                    "per_category, best_single), all, or latent (needs "
                                                    "latent.checkpoint); default: auto with a profile, else all")]
    = None,
    aggregation: Annotated[str | None, typer.Option(help=", ".join(AGGREGATIONS))] = None,
    policy: Annotated[str | None, typer.Option(help=", ".join(POLICIES))] = None,
    experts: Annotated[str | None, typer.Option(help="comma-separated allow-list of experts")] = None,
    max_new_tokens: MaxTokOpt = None,
    temperature: TempOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Route the question to experts, run them batched, aggregate, and print the answer with its trace."""
    from orchestrator.engine.pipeline import Pipeline
    from orchestrator.engine.requests import AllExpertsFailed, QueryRequest
    from routers.base import RouteOptions

    cfg = configure(config, store)
    Prompt.of(question)
    if router == LATENT_ROUTER:
        _check_latent(cfg, k or cfg.latent.k)

    async def main():  # noqa: ANN202
        pipeline = await Pipeline.start(cfg)
        try:
            served = pipeline.defaults(router)
            request = QueryRequest(
                query=question,
                options=RouteOptions(k=k or served.k, policy=policy or served.policy,
                                     cost_lambda=served.cost_lambda if policy in (None, served.policy) else 0.0),
                aggregation=aggregation or served.aggregation, experts=names(experts),
                max_new_tokens=max_new_tokens, temperature=temperature, router=router,
            )
            pipeline.validate(request)
            with err.status("routing, solving, aggregating"):
                return await pipeline.ask(request)
        finally:
            await pipeline.close()

    try:
        answer = asyncio.run(main())
    except AllExpertsFailed as exc:  # work failed, the input was fine: exit 1
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    _print_answer(question, answer)


def _check_latent(cfg: ConciliumConfig, k: int) -> None:
    """Refuse a latent request here, before Ray and the experts start, when it cannot run."""
    if cfg.latent.checkpoint is None:
        raise UsageError("--router latent needs a checkpoint: train one with `concilium train-latent --out "
                         "PATH` and set latent.checkpoint to it in the config")
    from orchestrator.latent.checkpoint import checkpoint_experts

    mixture = checkpoint_experts(cfg.latent.checkpoint)
    if k > len(mixture):
        raise UsageError(f"--k {k}: the latent mixture has {len(mixture)} experts ({', '.join(mixture)})")


def _print_answer(question: str, answer) -> None:  # noqa: ANN001  (an engine Answer)
    d = answer.decision
    out.print(f"[bold]{question}[/]", highlight=False)
    out.print(answer.text, highlight=False)
    table = Table(title="expert answers", show_lines=True)
    for col in ("expert", "answer", "tokens (prompt+completion)", "score"):
        table.add_column(col, overflow="fold")
    for a in answer.answers:
        table.add_row(a.expert, a.text, f"{a.prompt_tokens}+{a.completion_tokens}", f"{d.scores.get(a.expert, 0):.3f}")
    out.print(table)
    if d.latent:
        err.print(f"latent mode: primary {d.experts[0]} generated while reading the prompt latents of "
                  f"{', '.join(d.experts[1:]) or 'no peers (k = 1)'}", highlight=False)
    else:
        agg = answer.aggregator or f"skipped ({answer.aggregation_skipped})"
        err.print(f"aggregation: {answer.aggregation}, aggregator: {agg}; chosen by "
                  f"{d.trace.get('aggregator_choice')}", highlight=False)
    if "moa_layers" in d.trace:
        err.print(f"moa proposers per layer: {d.trace['moa_layers']}", highlight=False)
    err.print(f"routing: experts {d.experts}, skills {d.skills or '-'}"
              + (f", fallback: {d.fallback}" if d.fallback else ""), highlight=False)
    for note in answer.degraded:
        err.print(f"[yellow]degraded:[/] {note}", highlight=False)
    t = answer.timings
    err.print(
        f"cost ${answer.cost_usd:.6f}; queue {t['queue_s']:.2f} s, route {t['route_s']:.2f} s, "
        f"solve {t['solve_s']:.2f} s, aggregate {t['aggregate_s']:.2f} s, total {t['total_s']:.2f} s",
        highlight=False,
    )


def serve(
    host: Annotated[str | None, typer.Option(help="interface to bind (default: server.host, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="port (default: server.port, 8000)")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Run the HTTP API (plain and OpenAI-compatible) until interrupted; Ctrl-C drains and stops it."""
    import uvicorn

    from orchestrator.api.app import create_app
    from orchestrator.engine.pipeline import check_artifacts
    from orchestrator.engine.runtime import init_ray

    cfg = configure(config, store).bound_to(host, port)
    check_artifacts(cfg)
    server = cfg.server
    url = f"http://{server.host}:{server.port}"
    err.print(f"Concilium on [bold]{url}[/] (API docs: {url}/docs). Try:", highlight=False)
    err.print(
        f"  curl -s {url}/v1/query -H 'content-type: application/json' "
        "-d '{\"query\": \"What is the capital of France?\", \"max_tokens\": 32}'",
        highlight=False, soft_wrap=True,
    )
    # Ray first: ray.init installs a SIGTERM handler that exits at once. Started before uvicorn, it is replaced
    # by uvicorn's own while serving, so SIGTERM drains in-flight requests instead of dropping them.
    init_ray(cfg.ray)
    uvicorn.run(create_app(cfg, config_path=config), host=server.host, port=server.port, log_level="info",
                access_log=False, timeout_graceful_shutdown=server.drain_timeout_s)


def register(app: typer.Typer) -> None:
    app.command()(friendly(ask))
    app.command()(friendly(serve))
