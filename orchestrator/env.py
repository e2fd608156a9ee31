"""Every environment variable Concilium reads, the defaults that depend on them, and the loopback address.

Nothing else in the project names one of these variables. Ray's own
variables are set in ``orchestrator.engine.runtime``, which owns Ray's start.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

CONFIG = "CONCILIUM_CONFIG"
"""The config file when ``--config`` is not given."""
MODEL_STORE = "CONCILIUM_MODEL_STORE"
"""The model store folder when the config names none."""
REDIS_URL = "REDIS_URL"
"""The shared store; overrides ``server.redis_url``."""
API_KEYS = "CONCILIUM_API_KEYS"
"""Accepted API keys, plain and comma-separated (hashed at start)."""
ADMIN_KEYS = "CONCILIUM_ADMIN_KEYS"
"""Admin keys, plain and comma-separated (hashed at start)."""
CLIENT_API_KEY = "CONCILIUM_API_KEY"
"""The key that Concilium's own clients (``concilium bench load``) send."""
BENCH_DATA = "CONCILIUM_BENCH_DATA"
"""The bench-data folder of recorded outcomes."""
PROFILES = "CONCILIUM_PROFILES"
"""The profile folder when the config names none (``routing.profiles``)."""
GPU_CHECK_WORK = "GPU_CHECK_WORK"
"""Where the prepared GPU check writes its scratch files (default: the system's temporary folder)."""

DEFAULT_CONFIG_FILE = Path("concilium.yaml")
DEFAULT_BENCH_DATA = Path("../shared/bench-data")


def get(name: str) -> str | None:
    """A variable's value; unset and empty are the same."""
    return os.environ.get(name) or None


def model_store_root() -> Path:
    """``$CONCILIUM_MODEL_STORE`` or ``~/.cache/concilium/models``."""
    value = get(MODEL_STORE)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "concilium" / "models"


def embedding_cache(store_root: Path) -> Path:
    """Where offline runs keep their MiniLM vectors: beside the model store."""
    return store_root.parent / "embeddings"


def profiles_root() -> Path:
    """``$CONCILIUM_PROFILES`` or ``./artifacts/profiles``, where ``concilium profile`` writes and serve reads."""
    return Path(get(PROFILES) or "artifacts/profiles")


def bench_data() -> Path:
    """``$CONCILIUM_BENCH_DATA`` or ``../shared/bench-data``."""
    return Path(get(BENCH_DATA) or DEFAULT_BENCH_DATA)


def plain_keys(name: str) -> list[str]:
    """A comma-separated list of plain keys from the environment."""
    return [k.strip() for k in (get(name) or "").split(",") if k.strip()]


LOOPBACK = "127.0.0.1"
"""Where everything binds unless a config says otherwise, and where every test sends its traffic."""


def free_port() -> int:
    """A port that is free on loopback right now, for a server this process starts."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]
