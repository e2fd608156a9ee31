"""What every command module shares: the consoles, the common options, the error rule and small parsers.

The error rule: every error a user can cause derives from ``UserError``, and
``friendly`` turns it into one line on stderr and exit code 2, never a
traceback. Exit code 1 is left for failed work, such as every expert failing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console

from orchestrator import env
from orchestrator.config import ConciliumConfig, load_config
from routers.vocabulary import Encoder
from workers.errors import UserError

if TYPE_CHECKING:  # these import ray or sentence-transformers, which a command imports only when it runs
    from routers.embedding import TextEncoder
    from workers.pool import ExpertPool

out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="concilium.yaml; default: $CONCILIUM_CONFIG, ./concilium.yaml, or the embedded "
                 "setup"),
]
StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", help="model store folder; default: model_store in the config, $CONCILIUM_MODEL_STORE or "
                 "~/.cache/concilium/models"),
]
AddressOpt = Annotated[
    str, typer.Option(help="the cluster's head, HOST:PORT (its GCS port, 6379 by default), or 'auto' on a node")
]
MaxTokOpt = Annotated[int | None, typer.Option("--max-new-tokens", "-n", help="tokens to generate")]
TempOpt = Annotated[float | None, typer.Option("--temperature", "-t", help="0 is greedy")]
EncoderOpt = Annotated[str, typer.Option("--embedder", help=f"the text encoder routers use: {', '.join(Encoder)} "
                                         "(static: ~0.1 ms a query, cold; minilm: the transformer itself)")]
MMLU_PRO = env.bench_data() / "mmlu-pro-28llm"
"""The recorded MMLU-Pro outcomes that commands default to."""

F = TypeVar("F", bound=Callable[..., object])
T = TypeVar("T")


class UsageError(UserError, ValueError):
    """Input the CLI itself rejects."""


def friendly(fn: F) -> F:
    """Turn the errors a user can cause into a message and exit code 2."""

    @wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def configure(config: Path | None, store: Path | None = None) -> ConciliumConfig:
    """The config a command runs with: the file (or the usual lookup), with ``--store`` applied to it."""
    cfg = load_config(config)
    return cfg if store is None else cfg.model_copy(update={"model_store": store})


async def with_pool(config: ConciliumConfig, work: Callable[[ExpertPool], Awaitable[T]]) -> T:
    """Start the configured experts' actors, run ``work`` on the pool, and stop them again."""
    from orchestrator.engine.runtime import start_pool

    with err.status("starting expert actors"):
        pool = await start_pool(config)
    try:
        return await work(pool)
    finally:
        pool.shutdown()


def names(text: str | None) -> list[str] | None:
    """A comma-separated option as a list of names; None when the option was not given."""
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{what} must be positive integers, got {text!r}")
    return values


def offline_embedder(config: ConciliumConfig, kind: str = Encoder.MINILM) -> TextEncoder:
    """The encoder by name; MiniLM keeps the disk cache that makes repeated offline runs over the same questions
    cheap."""
    from orchestrator.embedders import encoder

    return encoder(kind, config.store_root, env.embedding_cache(config.store_root))


def check_sampling(max_new_tokens: int | None, temperature: float | None) -> None:
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if temperature is not None and temperature < 0:
        raise UsageError("--temperature must be 0 (greedy) or positive")
