"""``concilium bench calibrate``: fit the simulated experts' cost model to the real experts.

For each configured expert, through the real pool (so Ray's overhead is in the
figures, as the scheduler sees it): the median time of a load from the store
after an unload, and the median time of batched calls at several batch sizes.
A decode step's time is ``generate_s / new_tokens``, prefill included, since
the prompts are short. A least-squares line through (rows − 1, step time)
gives ``step_s`` and ``step_s_per_row``.

The output is a config whose experts are simulated copies of the real ones,
so ``concilium bench scheduler --config FILE`` replays the same fleet as a
cost model, and its figures can be checked against the real run.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.bench.costmodel import fit_steps
from orchestrator.bench.models import PROMPTS
from orchestrator.config import ConciliumConfig
from workers.config import PoolConfig, SimulatedExpert
from workers.pool import ExpertPool
from workers.types import SamplingParams


@dataclass
class Calibration:
    expert: str
    device: str
    memory_gb: float
    load_s: float
    step_s_by_batch: dict[int, float]
    step_s: float
    step_s_per_row: float


async def calibrate(
    config: ConciliumConfig,
    batch_sizes: list[int],
    new_tokens: int,
    repeats: int,
    progress: Callable[[str], None],
) -> list[Calibration]:
    experts = config.experts
    pool = await ExpertPool.start(experts, PoolConfig(), config.store_root, namespace=f"calibrate-{uuid.uuid4().hex[:8]}")
    params = SamplingParams(max_new_tokens=new_tokens)
    out = []
    try:
        for expert in experts:
            name = expert.name
            loads = []
            for r in range(repeats + 1):
                progress(f"{name}: load {r + 1}/{repeats + 1}")
                await pool.unload(name)
                t0 = time.perf_counter()
                async with pool.lease(name):
                    pass
                loads.append(time.perf_counter() - t0)
            steps = {}
            async with pool.lease(name):
                for b in batch_sizes:
                    progress(f"{name}: batch {b}")
                    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
                    runs = [(await pool.generate(name, prompts, params)).generate_s for _ in range(repeats)]
                    steps[b] = statistics.median(runs) / new_tokens
                info = next(i for i in await pool.info() if i.name == name)
            step_s, per_row = fit_steps(steps)
            # The first load may have read the files from disk: the warm median is what a window pays.
            out.append(Calibration(name, info.device, info.memory_bytes / 2**30, statistics.median(loads[1:]),
                                   steps, step_s, per_row))
    finally:
        pool.shutdown()
    return out


def simulated_config(config: ConciliumConfig, calibrations: list[Calibration], time_scale: float) -> dict:
    """``config`` with each expert replaced by its simulated copy, as plain data for YAML."""
    by_name = {c.expert: c for c in calibrations}
    experts = []
    for e in config.experts:
        c = by_name[e.name]
        sim = SimulatedExpert(
            backend="simulated", name=e.name, max_batch_size=e.max_batch_size, generation=e.generation,
            cost_per_1k_tokens=e.cost_per_1k_tokens, prices=e.prices, tags=e.tags,
            memory_gb=round(max(c.memory_gb, 1e-3), 4),
            device=c.device if c.device == "cpu" or c.device.startswith("cuda:") else "cpu",
            load_s=round(c.load_s, 4), step_s=round(c.step_s, 6), step_s_per_row=round(c.step_s_per_row, 6),
            time_scale=time_scale,
        )
        experts.append(sim.model_dump(mode="json"))
    data = config.model_dump(mode="json")
    data["experts"] = experts
    return data
