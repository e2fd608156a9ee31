"""The ``concilium`` command line.

Every known failure (bad config, unknown expert, missing model, empty prompt,
unreachable cluster) ends with a one-line message and exit code 2, never a
traceback; exit code 1 is left for failed work, such as an expert that errors.
"""

from __future__ import annotations

from orchestrator.runtime import prepare_ray_env

prepare_ray_env()  # before anything imports ray

import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import wraps  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Annotated, TypeVar  # noqa: E402

import typer  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from orchestrator.config import ConciliumConfig, ConfigError, load_config  # noqa: E402
from workers.model_store import BUNDLED, ModelStore, ModelStoreError  # noqa: E402
from workers.types import EmptyPromptError, Prompt, SamplingParams  # noqa: E402

if TYPE_CHECKING:  # sentence-transformers is slow to import; commands that need it import it themselves
    from routers.embedding import Embedder

app = typer.Typer(
    help="Concilium: one endpoint over many expert LLMs, routed per query and batched by expert.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(help="The local model store of converted bundled models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
bench_app = typer.Typer(help="Benchmarks; record their results in docs/benchmarks.md.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
cluster_app = typer.Typer(help="Concilium as a Ray Serve application on a running Ray cluster.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")

out = Console()
err = Console(stderr=True)

AddressOpt = Annotated[
    str, typer.Option(help="the cluster's head, HOST:PORT (its GCS port, 6379 by default), or 'auto' on a node")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="concilium.yaml; default: $CONCILIUM_CONFIG, ./concilium.yaml, or the embedded setup"),
]
StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", help="model store folder; default: $CONCILIUM_MODEL_STORE or ~/.cache/concilium/models"),
]

F = TypeVar("F", bound=Callable[..., object])


class UsageError(ValueError):
    """Input the CLI itself rejects."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from orchestrator.bench.load import LoadError
    from orchestrator.cluster import ClusterError
    from routers.latent import LatentError
    from orchestrator.runtime import RayConnectError
    from orchestrator.scheduler import RequestError
    from routers.base import RoutingError
    from routers.profiles import ProfileError
    from workers.placement import PlacementError
    from workers.pool import BudgetError, ExpertUnavailableError, UnknownExpertError
    from workers.recorded import RecordedDataError

    return (
        ConfigError, ModelStoreError, EmptyPromptError, UsageError, RayConnectError,
        PlacementError, UnknownExpertError, BudgetError, ExpertUnavailableError, RoutingError,
        RecordedDataError, RequestError, ProfileError, LoadError, ClusterError, LatentError,
    )


def friendly(fn: F) -> F:
    """Turn the errors a user can cause into a message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _store_root(config: ConciliumConfig, store: Path | None) -> Path | None:
    return store or config.model_store


@models_app.command("list")
@friendly
def models_list(store: StoreOpt = None, config: ConfigOpt = None) -> None:
    """List the bundled models and whether each is in the store."""
    ms = ModelStore(_store_root(load_config(config), store))
    table = Table(title=f"model store: {ms.root}")
    for col in ("name", "kind", "in store", "size", "path"):
        table.add_column(col, overflow="fold")
    for row in ms.list():
        table.add_row(
            row.name, row.kind, "yes" if row.pulled else "no",
            f"{row.size_bytes / 2**20:.0f} MiB" if row.pulled else "-", str(row.path),
        )
    out.print(table)


@models_app.command("pull")
@friendly
def models_pull(
    names: Annotated[list[str] | None, typer.Argument(help=f"models to pull: {', '.join(BUNDLED)}")] = None,
    all_: Annotated[bool, typer.Option("--all", help="pull every bundled model")] = False,
    force: Annotated[bool, typer.Option("--force", help="convert again even if a verified copy exists")] = False,
    store: StoreOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Convert bundled GGUF models into the store (idempotent; verifies what it wrote)."""
    if all_:
        names = list(BUNDLED)
    if not names:
        raise UsageError(f"name a model to pull ({', '.join(BUNDLED)}) or pass --all")
    ms = ModelStore(_store_root(load_config(config), store))
    for name in names:
        with err.status(f"{name}: starting") as status:
            path, converted = ms.pull(name, force=force, on_step=lambda s, n=name: status.update(f"{n}: {s}"))
        verdict = "converted and verified" if converted else "already in the store, verified"
        out.print(f"[green]✓[/] {name}: {verdict} → {path}")


async def _with_pool(config: ConciliumConfig, store: Path | None, work: Callable) -> object:
    from orchestrator.runtime import start_pool

    with err.status("starting expert actors"):
        pool = await start_pool(config, store)
    try:
        return await work(pool)
    finally:
        pool.shutdown()


@app.command()
@friendly
def experts(
    load: Annotated[bool, typer.Option("--load", help="load every expert first, to show real memory")] = False,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """List the configured experts with state, device and memory."""
    cfg = load_config(config)

    async def work(pool):  # noqa: ANN001, ANN202
        if load:
            for name, ok in pool.healthy().items():
                if ok:
                    async with pool.lease(name):
                        pass
        return await pool.info()

    infos = asyncio.run(_with_pool(cfg, store, work))
    table = Table(title="experts")
    for col in ("name", "backend", "source", "state", "device", "memory", "node", "GPUs"):
        table.add_column(col, overflow="fold")
    for info in infos:
        mem = info.memory_bytes or int(info.details.get("estimated_bytes", 0))
        mem_s = f"{mem / 2**20:.0f} MiB" + ("" if info.memory_bytes else " (est.)") if mem else "-"
        state = info.state + (f": {info.error}" if info.error else "")
        table.add_row(info.name, info.backend, info.source, state, info.device, mem_s, info.node_id[:8],
                      ",".join(info.gpu_ids) or "-")
    out.print(table)


def _params(cfg: ConciliumConfig, name: str, max_new_tokens: int | None, temperature: float | None) -> SamplingParams:
    gen = cfg.expert(name).generation
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if temperature is not None and temperature < 0:
        raise UsageError("--temperature must be 0 (greedy) or positive")
    return SamplingParams(
        max_new_tokens=max_new_tokens or gen.max_new_tokens,
        temperature=gen.temperature if temperature is None else temperature,
        top_p=gen.top_p,
        seed=gen.seed,
    )


MaxTokOpt = Annotated[int | None, typer.Option("--max-new-tokens", "-n", help="tokens to generate")]
TempOpt = Annotated[float | None, typer.Option("--temperature", "-t", help="0 is greedy")]


@app.command()
@friendly
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    expert: Annotated[str, typer.Option("--expert", "-e", help="which configured expert")],
    max_new_tokens: MaxTokOpt = None,
    temperature: TempOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Generate from one expert."""
    cfg = load_config(config)
    Prompt.of(prompt)
    single = cfg.model_copy(update={"experts": [cfg.expert(expert)]})
    params = _params(cfg, expert, max_new_tokens, temperature)

    async def work(pool):  # noqa: ANN001, ANN202
        return await pool.generate(expert, [prompt], params)

    result = asyncio.run(_with_pool(single, store, work))
    c = result.completions[0]
    out.print(c.text, highlight=False)
    err.print(
        f"[dim]{expert}: {c.prompt_tokens} prompt + {c.completion_tokens} completion tokens, "
        f"{result.generate_s:.2f} s, finish={c.finish_reason}[/]"
    )


@app.command()
@friendly
def ask(
    question: Annotated[str, typer.Argument(help="the question")],
    k: Annotated[int | None, typer.Option(help="experts recruited (default: routing.k; latent.k for --router "
                                            "latent)")] = None,
    router: Annotated[str | None, typer.Option(help="a router by name: skill, all, or latent (needs "
                                                    "latent.checkpoint); default: skill with profiles, else all")]
    = None,
    aggregation: Annotated[str | None, typer.Option(help="synthesize, vote, best, moa or self-moa")] = None,
    policy: Annotated[str | None, typer.Option(help="symbolic, topk or cost")] = None,
    experts: Annotated[str | None, typer.Option(help="comma-separated allow-list of experts")] = None,
    max_new_tokens: MaxTokOpt = None,
    temperature: TempOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Route the question to experts, run them batched, aggregate, and print the answer with its trace."""
    from orchestrator.pipeline import Pipeline
    from orchestrator.scheduler import AllExpertsFailed, QueryRequest
    from routers.base import RouteOptions

    cfg = load_config(config)
    Prompt.of(question)
    r = cfg.routing
    request = QueryRequest(
        query=question,
        options=RouteOptions(k=k or cfg.default_k(router), policy=policy or r.policy),
        aggregation=aggregation or r.aggregation,
        experts=_names(experts),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        router=router,
    )
    if router == "latent":
        if cfg.latent.checkpoint is None:
            raise UsageError("--router latent needs a checkpoint: train one with `concilium train-latent --out "
                             "PATH` and set latent.checkpoint to it in the config")
        from orchestrator.latent import checkpoint_experts

        mixture = checkpoint_experts(cfg.latent.checkpoint)
        if request.options.k > len(mixture):  # refused here, before Ray and the experts start
            raise UsageError(f"--k {request.options.k}: the latent mixture has {len(mixture)} experts "
                             f"({', '.join(mixture)})")

    async def main():  # noqa: ANN202
        pipeline = await Pipeline.start(cfg, store)
        try:
            with err.status("routing, solving, aggregating"):
                return await pipeline.ask(request)
        finally:
            await pipeline.close()

    try:
        answer = asyncio.run(main())
    except AllExpertsFailed as exc:  # work failed, the input was fine: exit 1
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    d = answer.decision
    out.print(f"[bold]{question}[/]", highlight=False)
    out.print(answer.text, highlight=False)
    table = Table(title="expert answers", show_lines=True)
    for col in ("expert", "answer", "tokens (prompt+completion)", "score"):
        table.add_column(col, overflow="fold")
    for a in answer.answers:
        table.add_row(a.expert, a.text, f"{a.prompt_tokens}+{a.completion_tokens}", f"{d.scores.get(a.expert, 0):.3f}")
    out.print(table)
    if answer.aggregation == "latent":
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


def _latent_parts(cfg: ConciliumConfig, store: Path | None, names: list[str] | None):  # noqa: ANN202
    """The bundled transformers experts the latent mixture combines, loaded together (the latent group)."""
    from orchestrator.latent import group_backends, load_experts
    from workers.config import TransformersExpert

    local = [e for e in cfg.experts if isinstance(e, TransformersExpert)]
    chosen = [e for e in local if names is None or e.name in names]
    unknown = sorted(set(names or []) - {e.name for e in local})
    if unknown:
        raise UsageError(f"unknown or non-local expert(s) {', '.join(unknown)}; local transformers experts: "
                         f"{', '.join(e.name for e in local)}")
    if len(chosen) < 2:
        raise UsageError("a latent mixture needs at least two local transformers experts")
    root = _store_root(cfg, store)
    return load_experts(group_backends(chosen, root), ModelStore(root))


@app.command("train-latent")
@friendly
def train_latent(
    out_path: Annotated[Path, typer.Option("--out", help="write the checkpoint here")],
    data: Annotated[Path | None, typer.Option(help="a JSONL of {prompt, answer}; default: built from --mmlu")]
    = None,
    mmlu: Annotated[Path, typer.Option(help="bench-data folder to build the default task from (dev questions)")]
    = Path("../shared/bench-data/mmlu-pro-28llm"),
    examples: Annotated[int, typer.Option(min=8, help="examples drawn for the default task")] = 400,
    held_out: Annotated[float, typer.Option(min=0.05, max=0.5, help="share kept out of training")] = 0.2,
    experts: Annotated[str | None, typer.Option(help="comma-separated experts (default: all local ones)")] = None,
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps")] = 300,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per step")] = 4,
    lr: Annotated[float, typer.Option(min=1e-7, help="AdamW learning rate")] = 1e-3,
    validate_every: Annotated[int, typer.Option(min=1, help="validation loss every N steps")] = 50,
    boundaries: Annotated[int, typer.Option(min=1, help="interaction boundaries per expert (Q)")] = 3,
    d_latent: Annotated[int, typer.Option(min=8, help="shared latent width")] = 256,
    heads: Annotated[int, typer.Option(min=1, help="cross-attention heads")] = 4,
    seed: int = 0,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Train the latent router and interaction layers on frozen experts; report held-out losses side by side."""
    import random

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from orchestrator.latent import (
        LatentSettings, build_mixture, evaluate, load_examples, mmlu_examples, save_checkpoint, train,
    )

    cfg = load_config(config)
    rows = load_examples(data) if data is not None else mmlu_examples(mmlu, examples, seed)
    random.Random(seed).shuffle(rows)
    cut = max(1, int(len(rows) * held_out))
    val_set, train_set = rows[:cut], rows[cut:]
    if not train_set:
        raise UsageError(f"{len(rows)} examples leave nothing to train on after holding out {held_out:.0%}")
    settings = LatentSettings(q=boundaries, d_latent=d_latent, heads=heads)
    with err.status("loading the experts and the embedder"):
        parts, shapes = _latent_parts(cfg, store, _names(experts))
        embedder = _offline_embedder()
        mixture = build_mixture(parts, shapes, settings, int(embedder.encode(["x"]).shape[1]), seed)
        before = evaluate(mixture, embedder, val_set)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("training", total=steps)

        def progress(step: int, losses, val: float | None) -> None:  # noqa: ANN001
            note = f"answer {losses.answer:.3f} router {losses.router:.3f}"
            if val is not None:
                bar.console.print(f"step {step}: validation answer loss (mixture) {val:.4f}", highlight=False)
            bar.update(task, advance=1, description=f"training ({note})")

        curve = train(mixture, embedder, train_set, val_set, steps, batch_size, lr, validate_every, progress, seed)
    after = evaluate(mixture, embedder, val_set)
    save_checkpoint(mixture, shapes, settings, out_path, {
        "steps": steps, "train_examples": len(train_set), "held_out": len(val_set), "curve": curve,
        "before": before.__dict__, "after": after.__dict__,
    })
    table = Table(title=f"held-out answer-token loss, {len(val_set)} examples (lower is better)")
    for col in ("", "primary alone", f"best single ({after.best_single_name})", "latent mixture",
                "router picks the best primary"):
        table.add_column(col)
    for name, h in (("untrained", before), (f"after {steps} steps", after)):
        table.add_row(name, f"{h.primary_alone:.4f}", f"{h.best_single:.4f}", f"{h.mixture:.4f}",
                      f"{h.router_accuracy:.0%}")
    out.print(table)
    out.print(f"checkpoint: {out_path}", highlight=False)


@app.command()
@friendly
def serve(
    host: Annotated[str | None, typer.Option(help="interface to bind (default: server.host, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="port (default: server.port, 8000)")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Run the HTTP API (plain and OpenAI-compatible) until interrupted; Ctrl-C drains and stops it."""
    import uvicorn

    from orchestrator.app import create_app
    from orchestrator.pipeline import check_artifacts
    from orchestrator.runtime import init_ray

    cfg = load_config(config)
    check_artifacts(cfg, store)
    server = cfg.server.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
    cfg = cfg.model_copy(update={"server": server})
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
    uvicorn.run(create_app(cfg, store, config_path=config), host=server.host, port=server.port, log_level="info",
                access_log=False, timeout_graceful_shutdown=server.drain_timeout_s)


def _names(text: str | None) -> list[str] | None:
    """A comma-separated option as a list of names; None when the option was not given."""
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _offline_embedder() -> Embedder:
    """MiniLM with the disk cache that makes repeated offline runs over the same questions cheap."""
    from routers.embedding import Embedder
    from workers.model_store import default_root, embedder_path

    return Embedder(embedder_path(), default_root().parent / "embeddings")


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{what} must be positive integers, got {text!r}")
    return values


@bench_app.command("models")
@friendly
def bench_models(
    models: Annotated[str, typer.Option(help="comma-separated store names")] = ",".join(BUNDLED),
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,4,16",
    new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate per prompt (greedy)")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="runs per batch size; the median is reported")] = 3,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads")] = 2,
    gguf: Annotated[bool, typer.Option(help="also time a load from the GGUF file (slow)")] = True,
    drop_caches: Annotated[
        bool, typer.Option(help="drop the OS page cache before each cold load (needs root)")
    ] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the figures as JSON")] = None,
    store: StoreOpt = None,
) -> None:
    """Load times (GGUF vs store) and tokens/s per batch size of the bundled models."""
    from orchestrator.bench.models import ModelsBenchSettings, run_models_bench

    names = _names(models) or []
    unknown = [n for n in names if n not in BUNDLED]
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)}; bundled: {', '.join(BUNDLED)}")
    sizes = _int_list(batch_sizes, "--batch-sizes")
    with err.status("benchmarking") as status:
        settings = ModelsBenchSettings(sizes, new_tokens, repeats, threads, gguf, drop_caches)
        results = run_models_bench(names, settings, ModelStore(store), status.update, json_out)
    loads = Table(title="load time (s)")
    for col in ("model", "from GGUF", "store, cold", "store, warm", "GGUF / store cold", "page cache dropped"):
        loads.add_column(col)
    for r in results:
        ratio = f"{r.gguf_load_s / r.store_cold_load_s:.1f}x" if r.gguf_load_s else "-"
        gguf_s = f"{r.gguf_load_s:.1f}" if r.gguf_load_s else "-"
        loads.add_row(r.model, gguf_s, f"{r.store_cold_load_s:.2f}", f"{r.store_warm_load_s:.2f}", ratio,
                      "yes" if r.caches_dropped else "no")
    out.print(loads)
    tput = Table(title=f"greedy generation, {new_tokens} new tokens, {threads} threads, median of {repeats}")
    for col in ("model", "batch", "tokens", "seconds", "tokens/s", "vs batch 1"):
        tput.add_column(col)
    for r in results:
        base = r.tokens_per_s[sizes[0]]
        for bs in sizes:
            tput.add_row(r.model, str(bs), str(r.tokens[bs]), f"{r.seconds[bs]:.2f}",
                         f"{r.tokens_per_s[bs]:.1f}", f"{r.tokens_per_s[bs] / base:.2f}x")
    out.print(tput)


@bench_app.command("router")
@friendly
def bench_router(
    questions: Annotated[Path, typer.Option(help="bench-data folder whose questions are routed")] = Path(
        "../shared/bench-data/mmlu-pro-28llm"
    ),
    experts: Annotated[str, typer.Option(help="comma-separated expert counts")] = "16,28",
    skills: Annotated[str, typer.Option(help="comma-separated profile-skill counts")] = "1000,10000,100000",
    windows: Annotated[str, typer.Option(help="comma-separated window sizes")] = "1,32,256",
    repeats: Annotated[int, typer.Option(min=1, help="windows per setting; the median is reported")] = 5,
) -> None:
    """Routing latency per query (median), cold (new texts) and warm (embeddings cached)."""
    from orchestrator.bench.router import run_router_bench
    from routers.embedding import Embedder
    from workers.model_store import embedder_path
    from workers.recorded import load_recorded

    texts = [r.text for r in load_recorded(questions).records]
    with err.status("benchmarking the router") as status:
        results = run_router_bench(
            lambda: Embedder(embedder_path()), texts, _int_list(experts, "--experts"),
            _int_list(skills, "--skills"), _int_list(windows, "--windows"), repeats, status.update,
        )
    table = Table(title=f"skill router, topk k=3: ms per query, median of {repeats} windows")
    for col in ("skills", "index", "experts", "window", "cold (new texts)", "warm (cached embeddings)"):
        table.add_column(col)
    for r in results:
        table.add_row(str(r.skills), r.index, str(r.experts), str(r.window),
                      f"{r.cold_ms_per_query:.2f}", f"{r.warm_ms_per_query:.3f}")
    out.print(table)


@bench_app.command("scheduler")
@friendly
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
    from orchestrator.runtime import init_ray

    sizes = _int_list(n, "--n")
    cfg = load_config(config)
    scale = time_scale(cfg.experts)
    init_ray(cfg.ray)
    with err.status("benchmarking the scheduler") as status:
        results = asyncio.run(
            run_scheduler_bench(cfg.experts, sizes, new_tokens, budget_gb, device, max_batch, status.update)
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


@bench_app.command("api")
@friendly
def bench_api(
    n: Annotated[int, typer.Option(min=10, help="timed rounds (each: direct, /v1/query, /v1/route)")] = 200,
    config: ConfigOpt = None,
) -> None:
    """API overhead: p50/p99 of /v1/route, and /v1/query against calling the pipeline directly.

    Without --config it runs two simulated experts (1 ms per step, nothing to load), so the experts' own
    time is small and the differences are the API's.
    """
    from orchestrator.bench.api import default_experts, run_api_bench
    from orchestrator.runtime import init_ray

    cfg = load_config(config) if config else ConciliumConfig(experts=default_experts())
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


@cluster_app.command("deploy")
@friendly
def cluster_deploy(address: AddressOpt, config: ConfigOpt = None) -> None:
    """Deploy (or update) the API as a Ray Serve application; the experts become shared, detached actors.

    Checks that every expert can be placed before anything starts. Experts whose config changed are restarted;
    the others keep their loaded models.
    """
    from orchestrator.cluster import deploy

    cfg = load_config(config)
    with err.status(f"deploying to {address}"):
        url, restarted = deploy(cfg, address)
    out.print(f"application {cfg.serve.app_name!r} is running at {url}", highlight=False)
    out.print(f"restarted experts: {', '.join(restarted) or 'none'}", highlight=False)


@cluster_app.command("status")
@friendly
def cluster_status(
    address: AddressOpt,
    config: ConfigOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """The application's state and replicas, the nodes, and where each expert runs (node and GPU)."""
    from dataclasses import asdict

    from orchestrator.cluster import status

    st = status(load_config(config), address)
    if json_out:
        out.print_json(json.dumps(asdict(st)))
        return
    out.print(f"application {st.app}: {st.app_status} {st.message}".rstrip(), highlight=False)
    out.print("replicas: " + (", ".join(f"{n} {k}" for k, n in st.replicas.items()) or "none"), highlight=False)
    nodes = Table(title="nodes")
    for col in ("node", "ip", "alive", "resources"):
        nodes.add_column(col, overflow="fold")
    for n in st.nodes:
        shown = {k: v for k, v in n["resources"].items() if not k.startswith("node:") and k != "object_store_memory"}
        nodes.add_row(n["node_id"][:8], n["ip"], str(n["alive"]), json.dumps(shown))
    out.print(nodes)
    experts = Table(title="experts")
    for col in ("name", "state", "node", "ip", "GPUs", "device", "pid"):
        experts.add_column(col, overflow="fold")
    for e in st.experts:
        experts.add_row(e.name, e.state, e.node_id[:8], e.node_ip, ",".join(e.gpu_ids) or "-", e.device,
                        str(e.pid or "-"))
    out.print(experts)


@cluster_app.command("down")
@friendly
def cluster_down(address: AddressOpt, config: ConfigOpt = None) -> None:
    """Delete the application and stop its shared experts; the Ray cluster itself keeps running."""
    from orchestrator.cluster import down

    cfg = load_config(config)
    stopped = down(cfg, address)
    out.print(f"deleted application {cfg.serve.app_name!r}; stopped experts: {', '.join(stopped) or 'none'}",
              highlight=False)


@bench_app.command("load")
@friendly
def bench_load(
    clients: Annotated[int, typer.Option(min=1, max=1024, help="concurrent clients")] = 64,
    requests: Annotated[int, typer.Option(min=1, max=1000, help="requests per client, one after another")] = 20,
    url: Annotated[str | None, typer.Option(help="a running server on loopback; default: start a replay server")]
    = None,
    data: Annotated[Path, typer.Option(help="bench-data folder the started server's replay experts answer from")]
    = Path("../shared/bench-data/mmlu-pro-28llm"),
    max_pending: Annotated[int, typer.Option(min=1, help="the started server's routing.max_pending")] = 32,
    time_limit_s: Annotated[float, typer.Option(min=1, help="stop the whole run after this long")] = 600,
    request_timeout_s: Annotated[float, typer.Option(min=0.1, help="client timeout per request")] = 120,
    api_key: Annotated[str | None, typer.Option(envvar="CONCILIUM_API_KEY", help="for a server with keys")] = None,
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


@bench_app.command("kernels")
@friendly
def bench_kernels(
    batches: Annotated[str, typer.Option(help="comma-separated batch sizes (sequences decoding at once)")] = "1,8,32",
    peer_lens: Annotated[str, typer.Option(help="comma-separated peer lengths (rows per sequence, at most)")]
    = "64,256,1024",
    heads: Annotated[int, typer.Option(min=1, help="attention heads")] = 8,
    dim: Annotated[int, typer.Option(min=1, help="head dim (a power of two for Triton)")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per point; the median is reported")] = 20,
    device: Annotated[str, typer.Option(help="cuda or cpu; default: cuda when torch sees a GPU")] = "auto",
) -> None:
    """The ragged decode-attention Triton kernel against padded SDPA, over batch sizes and peer lengths."""
    import torch

    from orchestrator.bench.kernels import run_kernel_bench

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu") or (device == "cuda" and not torch.cuda.is_available()):
        raise UsageError(f"--device {device}: use cpu, or cuda on a machine where torch sees a GPU")
    dev = torch.device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with err.status("benchmarking kernels") as status:
        results = run_kernel_bench(_int_list(batches, "--batches"), _int_list(peer_lens, "--peer-lens"), heads, dim,
                                   dev, dtype, repeats, status.update)
    name = torch.cuda.get_device_name(dev) if device == "cuda" else "CPU"
    table = Table(title=f"ragged decode attention, {heads} heads x {dim}, {dtype}, {name}: ms per call, median")
    for col in ("batch", "peers (max)", "padded SDPA", "Triton ragged", "SDPA / Triton", "max |diff|"):
        table.add_column(col)
    for r in results:
        table.add_row(str(r.batch), str(r.peer_len), f"{r.padded_sdpa_ms:.3f}",
                      "not measured on GPU" if r.triton_ms is None else f"{r.triton_ms:.3f}",
                      "-" if r.speedup is None else f"{r.speedup:.2f}x",
                      "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}")
    out.print(table)


@bench_app.command("latent")
@friendly
def bench_latent(
    checkpoint: Annotated[Path | None, typer.Option(help="a train-latent checkpoint; default: an untrained mixture")]
    = None,
    primary: Annotated[str, typer.Option(help="the expert that generates")] = "smollm2",
    prompt_tokens: Annotated[str, typer.Option(help="comma-separated prompt lengths")] = "64,256,1024",
    new_tokens: Annotated[int, typer.Option(min=1, help="tokens generated per run")] = 16,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per length; the median is reported")] = 3,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Generation latency of the latent mode over the primary alone, at several prompt lengths, side by side."""
    from orchestrator.latent import MINILM_DIM, LatentSettings, build_mixture, latency, load_mixture

    cfg = load_config(config)
    with err.status("loading the experts"):
        parts, shapes = _latent_parts(cfg, store, None)
        if primary not in parts:
            raise UsageError(f"--primary {primary}: not one of {', '.join(parts)}")
        mixture = (load_mixture(checkpoint, parts, shapes) if checkpoint is not None
                   else build_mixture(parts, shapes, LatentSettings(), MINILM_DIM))
    with err.status("timing"):
        rows = latency(mixture, primary, _int_list(prompt_tokens, "--prompt-tokens"), new_tokens, repeats)
    table = Table(title=f"{primary} generating {new_tokens} tokens, greedy, CPU: seconds, median of {repeats}")
    for col in ("prompt tokens", "primary alone", "latent (peers encode + hooked decode)", "latent / alone"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r.prompt_tokens), f"{r.primary_alone_s:.3f}", f"{r.latent_s:.3f}", f"{r.ratio:.2f}x")
    out.print(table)


@bench_app.command("calibrate")
@friendly
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
    from orchestrator.runtime import init_ray

    sizes = _int_list(batch_sizes, "--batch-sizes")
    cfg = load_config(config)
    init_ray(cfg.ray)
    with err.status("calibrating") as status:
        results = asyncio.run(calibrate(cfg.experts, sizes, new_tokens, repeats, status.update))
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


@app.command("eval")
@friendly
def eval_(
    train: Annotated[Path, typer.Option(help="bench-data folder (models.json + data.jsonl) to profile on")],
    router: Annotated[str, typer.Option(help="skill, knn, per_category, best_single, random")] = "skill",
    test: Annotated[Path | None, typer.Option(help="measure here instead of cross-validating on --train")] = None,
    pool: Annotated[str | None, typer.Option(help="a named pool, e.g. open-small")] = None,
    models: Annotated[str | None, typer.Option(help="comma-separated model names from the data")] = None,
    k: Annotated[int, typer.Option(help="experts recruited per query")] = 3,
    aggregation: Annotated[str, typer.Option(help="vote or best")] = "vote",
    policy: Annotated[str, typer.Option(help="symbolic (the paper's sampler), topk, or cost")] = "topk",
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
    from orchestrator.offline import evaluate
    from routers.base import RouteOptions

    if not train.is_dir():
        raise UsageError(f"--train {train} is not a folder")
    if budget_share is not None:
        policy = "cost"
    options = RouteOptions(k=k, policy=policy, cost_lambda=cost_lambda, seed=seed)
    with err.status("evaluating") as status:
        result = evaluate(
            train, test, _offline_embedder(), router, options, aggregation, folds, pool, _names(models),
            budget_share, seed,
            on_fold=lambda i: status.update(f"fold {i + 1} done"), plots=plots,
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


@app.command("profile")
@friendly
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
    from orchestrator.offline import load_eval_data
    from orchestrator.profiling import (
        live_outcomes,
        llm_keywords,
        load_tasks,
        rank_aggregators,
        save_artifacts,
    )
    from routers.annotators import LLMAnnotator

    if (data is None) == (tasks is None):
        raise UsageError("give exactly one source: --data DIR (imported) or --tasks FILE (live)")
    if annotator is not None and tasks is None:
        raise UsageError("--annotator needs a live run (--tasks): recorded outcomes carry no expert to ask")
    embedder = _offline_embedder()
    keywords, agg_accuracy = None, None
    if data is not None:
        with err.status("embedding the questions"):
            ev = load_eval_data(data, embedder, pool, _names(models))
        texts, correct, experts, cost = ev.texts, ev.correct, ev.experts, ev.cost
        source: dict[str, object] = {"kind": "imported", "data": str(data), "pool": pool}
    else:
        cfg = load_config(config)
        if annotator is not None:
            cfg.expert(annotator)
        questions, gold = load_tasks(tasks, limit)

        async def work(pool_):  # noqa: ANN001, ANN202
            from rich.progress import Progress

            async def gen(name: str, prompts: list[str]):  # noqa: ANN202
                return await pool_.generate(name, prompts, _params(cfg, name, max_new_tokens, None))

            with Progress(console=err) as bar:
                task = bar.add_task("experts answering", total=len(pool_.names))
                correct_, answers = await live_outcomes(
                    gen, pool_.names, questions, gold, on_expert=lambda _e: bar.advance(task)
                )
            kws, ranking = None, None
            if annotator is not None:
                llm = LLMAnnotator()

                async def sample(prompts: list[str], temperature: float):  # noqa: ANN202
                    params = _params(cfg, annotator, 32, temperature)
                    return await pool_.generate(annotator, prompts, params)

                with err.status(f"{annotator} is naming skills ({llm.samples} samples each)"):
                    kws = await llm_keywords(sample, questions, llm)
            if select_aggregator:
                with err.status("synthesis test for the aggregator ranking"):
                    ranking = await rank_aggregators(gen, pool_.names, questions, gold, answers, correct_)
            return correct_, kws, ranking

        correct, keywords, agg_accuracy = asyncio.run(_with_pool(cfg, store, work))
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


@app.command("check-config")
@friendly
def check_config(path: Annotated[Path, typer.Argument(help="the config file to validate")]) -> None:
    """Validate a config file and print the experts it defines."""
    cfg = load_config(path)
    out.print(f"[green]✓[/] {path} is valid: {len(cfg.experts)} experts ({', '.join(e.name for e in cfg.experts)})")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
