"""``concilium models``, ``experts``, ``generate``, ``check-config`` and ``key-id``: the model store, the experts,
and the config that names them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from orchestrator.api.security import digest, key_id
from orchestrator.cli.common import (
    ConfigOpt,
    MaxTokOpt,
    StoreOpt,
    TempOpt,
    UsageError,
    check_sampling,
    configure,
    err,
    friendly,
    out,
    with_pool,
)
from orchestrator.config import load_config
from workers.model_store import BUNDLED, ModelStore
from workers.types import Prompt

models_app = typer.Typer(help="The local model store of converted bundled models.", no_args_is_help=True)


@models_app.command("list")
@friendly
def models_list(store: StoreOpt = None, config: ConfigOpt = None) -> None:
    """List the bundled models and whether each is in the store."""
    ms = ModelStore(configure(config, store).store_root)
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
    ms = ModelStore(configure(config, store).store_root)
    for name in names:
        with err.status(f"{name}: starting") as status:
            path, converted = ms.pull(name, force=force, on_step=lambda s, n=name: status.update(f"{n}: {s}"))
        verdict = "converted and verified" if converted else "already in the store, verified"
        out.print(f"[green]✓[/] {name}: {verdict} → {path}")


def experts(
    load: Annotated[bool, typer.Option("--load", help="load every expert first, to show real memory")] = False,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """List the configured experts with state, device and memory."""

    async def work(pool):  # noqa: ANN001, ANN202
        if load:
            for name, ok in pool.healthy().items():
                if ok:
                    async with pool.lease(name):
                        pass
        return await pool.info()

    infos = asyncio.run(with_pool(configure(config, store), work))
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


def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    expert: Annotated[str, typer.Option("--expert", "-e", help="which configured expert")],
    max_new_tokens: MaxTokOpt = None,
    temperature: TempOpt = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Generate from one expert."""
    cfg = configure(config, store)
    Prompt.of(prompt)
    check_sampling(max_new_tokens, temperature)
    chosen = cfg.expert(expert)
    params = chosen.generation.sampling(max_new_tokens, temperature)

    async def work(pool):  # noqa: ANN001, ANN202
        return await pool.generate(expert, [prompt], params)

    result = asyncio.run(with_pool(cfg.model_copy(update={"experts": [chosen]}), work))
    c = result.completions[0]
    out.print(c.text, highlight=False)
    err.print(
        f"[dim]{expert}: {c.prompt_tokens} prompt + {c.completion_tokens} completion tokens, "
        f"{result.generate_s:.2f} s, finish={c.finish_reason}[/]"
    )


def check_config(path: Annotated[Path, typer.Argument(help="the config file to validate")]) -> None:
    """Validate a config file and print the experts it defines."""
    cfg = load_config(path)
    out.print(f"[green]✓[/] {path} is valid: {len(cfg.experts)} experts ({', '.join(e.name for e in cfg.experts)})")


def show_key_id(key: Annotated[str | None, typer.Argument(
        help="the API key; omit it to read the key from stdin, which keeps it out of the shell history")] = None,
) -> None:
    """Print a key's SHA-256 (for server.api_key_sha256) and its key id (for server.budgets.keys and usage)."""
    key = key if key is not None else sys.stdin.readline().strip()
    if not key:
        raise UsageError("no key given: pass it as the argument or on stdin")
    out.print(f"key id: {key_id(key)}\nsha256: {digest(key)}")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.command()(friendly(experts))
    app.command()(friendly(generate))
    app.command("check-config")(friendly(check_config))
    app.command("key-id")(friendly(show_key_id))
