"""Shared fixtures: one local Ray on 127.0.0.1 for the session, and the real model store.

Ray is started with 2 logical GPUs and a custom ``gpu_node`` resource so that
placement can be tested on this GPU-less machine; torch still sees no CUDA, so
every model runs on the CPU.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from orchestrator.engine.runtime import prepare_ray_env

prepare_ray_env()  # before anything imports ray
# Hermetic profiles: the test processes, and every server or CLI they start, read profiles from an empty folder
# of their own, not the one `make serve` leaves in ./artifacts/profiles. A test that needs one sets its own.
os.environ["CONCILIUM_PROFILES"] = tempfile.mkdtemp(prefix="concilium-test-profiles-")
atexit.register(shutil.rmtree, os.environ["CONCILIUM_PROFILES"], True)
# No GPU here: Triton kernels run in Triton's interpreter, which it reads when a kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import asyncio  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from orchestrator.config import RayConfig  # noqa: E402
from orchestrator.engine.runtime import init_ray  # noqa: E402
from orchestrator.env import model_store_root  # noqa: E402
from workers.model_store import BUNDLED, ModelStore  # noqa: E402

BENCH_DATA = Path(
    os.environ.get("CONCILIUM_BENCH_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "bench-data")
)
STORE_ROOT = model_store_root()
"""The model store every test reads: the machine's default, as `make models` fills it."""
SMOLLM = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    init_ray(RayConfig(num_cpus=4, num_gpus=2, resources={"gpu_node": 1.0}))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def store() -> ModelStore:
    """The default store, with both bundled models pulled (a no-op after `make models`)."""
    ms = ModelStore(STORE_ROOT)
    for name in BUNDLED:
        ms.pull(name)
    return ms


@pytest.fixture(scope="session")
def bench_data() -> Path:
    if not BENCH_DATA.exists():
        pytest.fail(f"bench-data not found at {BENCH_DATA}; set CONCILIUM_BENCH_DATA to its folder")
    return BENCH_DATA


def run(coro):
    return asyncio.run(coro)


# Fixtures that imply a marker: a test that asks for them needs Ray, or the bundled models (or MiniLM).
IMPLIED = {"ray_cluster": "ray", "store": "models", "embedder": "models", "mixture_parts": "models"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test by what it needs, so that `make test-fast` can leave out what needs a model or Ray. Tests
    that start Ray or load a model in a subprocess carry the marker themselves.

    Then the files marked ``long`` (minutes each) go first: `make test` hands whole files to two workers in this
    order (``--dist loadfile --no-loadscope-reorder``), and a long file started last keeps one worker busy while
    the other idles."""
    for item in items:
        for fixture, marker in IMPLIED.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
