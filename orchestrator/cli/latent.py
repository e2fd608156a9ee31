"""``concilium train-latent`` and ``concilium bench latent``: the latent mixture, trained and measured."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from orchestrator.cli.common import (
    MMLU_PRO,
    ConfigOpt,
    StoreOpt,
    UsageError,
    configure,
    err,
    friendly,
    int_list,
    names,
    offline_embedder,
    out,
)
from orchestrator.config import ConciliumConfig


def latent_parts(cfg: ConciliumConfig, only: list[str] | None):  # noqa: ANN201
    """The local transformers experts the latent mixture combines, loaded together (the latent group)."""
    from orchestrator.latent.experts import group_backends, load_experts
    from workers.config import TransformersExpert
    from workers.model_store import ModelStore

    local = [e for e in cfg.experts if isinstance(e, TransformersExpert)]
    chosen = [e for e in local if only is None or e.name in only]
    unknown = sorted(set(only or []) - {e.name for e in local})
    if unknown:
        raise UsageError(f"unknown or non-local expert(s) {', '.join(unknown)}; local transformers experts: "
                         f"{', '.join(e.name for e in local)}")
    if len(chosen) < 2:
        raise UsageError("a latent mixture needs at least two local transformers experts")
    return load_experts(group_backends(chosen, cfg.store_root), ModelStore(cfg.store_root))


def train_latent(
    out_path: Annotated[Path, typer.Option("--out", help="write the checkpoint here")],
    data: Annotated[Path | None, typer.Option(help="a JSONL of {prompt, answer}; default: built from --mmlu")]
    = None,
    mmlu: Annotated[Path, typer.Option(help="bench-data folder to build the default task from (dev questions)")]
    = MMLU_PRO,
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
    from orchestrator.latent.checkpoint import save_checkpoint
    from orchestrator.latent.experts import LatentSettings, build_mixture
    from orchestrator.latent.training import evaluate, load_examples, mmlu_examples, train

    cfg = configure(config, store)
    rows = load_examples(data) if data is not None else mmlu_examples(mmlu, examples, seed)
    random.Random(seed).shuffle(rows)
    cut = max(1, int(len(rows) * held_out))
    val_set, train_set = rows[:cut], rows[cut:]
    if not train_set:
        raise UsageError(f"{len(rows)} examples leave nothing to train on after holding out {held_out:.0%}")
    settings = LatentSettings(q=boundaries, d_latent=d_latent, heads=heads)
    with err.status("loading the experts and the embedder"):
        parts, shapes = latent_parts(cfg, names(experts))
        embedder = offline_embedder(cfg)
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
    from orchestrator.latent.checkpoint import load_mixture
    from orchestrator.latent.experts import LatentSettings, build_mixture
    from orchestrator.latent.latency import latency
    from routers.embedding import DIM

    cfg = configure(config, store)
    with err.status("loading the experts"):
        parts, shapes = latent_parts(cfg, None)
        if primary not in parts:
            raise UsageError(f"--primary {primary}: not one of {', '.join(parts)}")
        mixture = (load_mixture(checkpoint, parts, shapes) if checkpoint is not None
                   else build_mixture(parts, shapes, LatentSettings(), DIM))
    with err.status("timing"):
        rows = latency(mixture, primary, int_list(prompt_tokens, "--prompt-tokens"), new_tokens, repeats)
    table = Table(title=f"{primary} generating {new_tokens} tokens, greedy, CPU: seconds, median of {repeats}")
    for col in ("prompt tokens", "primary alone", "latent (peers encode + hooked decode)", "latent / alone"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r.prompt_tokens), f"{r.primary_alone_s:.3f}", f"{r.latent_s:.3f}", f"{r.ratio:.2f}x")
    out.print(table)


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    app.command("train-latent")(friendly(train_latent))
    bench_app.command("latent")(friendly(bench_latent))
