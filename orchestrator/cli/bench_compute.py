"""``concilium bench models``, ``bench router`` and ``bench kernels``: what the models, the router and the kernel
cost on this machine. Each runs its competing variants side by side and reports ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from orchestrator.cli.common import (
    MMLU_PRO,
    StoreOpt,
    UsageError,
    configure,
    err,
    friendly,
    int_list,
    names,
    out,
)
from routers.vocabulary import Encoder
from workers.model_store import LLMS, ModelStore


def bench_models(
    models: Annotated[str, typer.Option(help="comma-separated store names")] = ",".join(LLMS),
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,4,16",
    new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate per prompt (greedy)")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="runs per batch size; the median is reported")] = 3,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads")] = 2,
    gguf: Annotated[bool, typer.Option(help="also time a load from the GGUF file (slow)")] = True,
    drop_caches: Annotated[
        bool, typer.Option(help="drop the OS page cache before each cold load (needs root)")
    ] = True,
    backend: Annotated[str, typer.Option(help="comma-separated backends, run side by side: transformers, vllm")]
    = "transformers",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the figures as JSON")] = None,
    store: StoreOpt = None,
) -> None:
    """Load times (GGUF vs store), time to first token and tokens/s per batch size of the bundled models, on
    each backend."""
    from orchestrator.bench.models import BACKENDS, ModelsBenchSettings, run_models_bench

    chosen = names(models) or []
    unknown = [n for n in chosen if n not in LLMS]
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)}; bundled LLMs: {', '.join(LLMS)}")
    backends = tuple(names(backend) or [])
    if not backends or any(b not in BACKENDS for b in backends):
        raise UsageError(f"--backend {backend!r}: choose from {', '.join(BACKENDS)}")
    sizes = int_list(batch_sizes, "--batch-sizes")
    with err.status("benchmarking") as status:
        settings = ModelsBenchSettings(sizes, new_tokens, repeats, threads, gguf, drop_caches, backends)
        results = run_models_bench(chosen, settings, ModelStore(configure(None, store).store_root), status.update,
                                   json_out)
    out.print(_load_table(results))
    out.print(_throughput_table(results, sizes, f"greedy generation, {new_tokens} new tokens, median of {repeats}"))


def _load_table(results: list) -> Table:
    loads = Table(title="load time (s); a vLLM load is its engine's start")
    for col in ("model", "backend", "from GGUF", "store, cold", "store, warm", "GGUF / store cold",
                "page cache dropped", "first token (s)"):
        loads.add_column(col)
    for r in results:
        ratio = f"{r.gguf_load_s / r.store_cold_load_s:.1f}x" if r.gguf_load_s else "-"
        gguf_s = f"{r.gguf_load_s:.1f}" if r.gguf_load_s else "-"
        warm = f"{r.store_warm_load_s:.2f}" if r.store_warm_load_s is not None else "-"
        loads.add_row(r.model, r.backend, gguf_s, f"{r.store_cold_load_s:.2f}", warm, ratio,
                      "yes" if r.caches_dropped else "no", f"{r.ttft_s:.3f}")
    return loads


def _throughput_table(results: list, sizes: list[int], title: str) -> Table:
    """Tokens/s per batch size, against batch 1 and against the first backend's figure for the same model."""
    tput = Table(title=title)
    for col in ("model", "backend", "batch", "tokens", "seconds", "tokens/s", "vs batch 1", "vs first backend"):
        tput.add_column(col)
    first = {}
    for r in results:
        first.setdefault(r.model, r)
        for bs in sizes:
            tput.add_row(r.model, r.backend, str(bs), str(r.tokens[bs]), f"{r.seconds[bs]:.2f}",
                         f"{r.tokens_per_s[bs]:.1f}", f"{r.tokens_per_s[bs] / r.tokens_per_s[sizes[0]]:.2f}x",
                         f"{r.tokens_per_s[bs] / first[r.model].tokens_per_s[bs]:.2f}x")
    return tput


def bench_router(
    questions: Annotated[Path, typer.Option(help="bench-data folder whose questions are routed")] = MMLU_PRO,
    encoders: Annotated[str, typer.Option(help=f"comma-separated encoders: {', '.join(Encoder)}")]
    = ",".join(Encoder),
    experts: Annotated[str, typer.Option(help="comma-separated expert counts")] = "16,28",
    skills: Annotated[str, typer.Option(help="comma-separated profile-skill counts")] = "1000,10000,100000",
    windows: Annotated[str, typer.Option(help="comma-separated window sizes")] = "1,32,256",
    repeats: Annotated[int, typer.Option(min=1, help="windows per setting; the median is reported")] = 5,
    store: StoreOpt = None,
) -> None:
    """Routing latency per query (median): the skill and cluster routers on each encoder, cold (new texts) and
    warm (embeddings cached)."""
    from orchestrator.bench.router import run_router_bench
    from orchestrator.embedders import encoder
    from workers.recorded import load_recorded

    chosen = names(encoders) or []
    unknown = [e for e in chosen if e not in list(Encoder)]
    if unknown:
        raise UsageError(f"unknown encoder(s) {', '.join(unknown)}; choose from {', '.join(Encoder)}")
    root = configure(None, store).store_root
    texts = [r.text for r in load_recorded(questions).records]
    with err.status("benchmarking the router") as status:
        results = run_router_bench(
            {e: (lambda e=e: encoder(e, root)) for e in chosen}, texts, int_list(experts, "--experts"),
            int_list(skills, "--skills"), int_list(windows, "--windows"), repeats, status.update,
        )
    table = Table(title=f"routing latency, topk k=3: ms per query, median of {repeats} windows")
    for col in ("router", "encoder", "skills", "index", "experts", "window", "cold (new texts)", "warm (cached)"):
        table.add_column(col)
    for r in results:
        table.add_row(r.router, r.encoder, "-" if r.skills is None else str(r.skills), r.index, str(r.experts),
                      str(r.window), f"{r.cold_ms_per_query:.3f}", f"{r.warm_ms_per_query:.3f}")
    out.print(table)


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
        results = run_kernel_bench(int_list(batches, "--batches"), int_list(peer_lens, "--peer-lens"), heads, dim,
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


def register(bench_app: typer.Typer) -> None:
    bench_app.command("models")(friendly(bench_models))
    bench_app.command("router")(friendly(bench_router))
    bench_app.command("kernels")(friendly(bench_kernels))
