"""The expert pool on real Ray: eviction under a memory budget, restarts, failed loads."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import GEMMA, SMOLLM, STORE_ROOT, run
from workers.config import PoolConfig, TransformersExpert
from workers.pool import ExpertPool, ExpertUnavailableError, MemoryLimitError, UnknownExpertError
from workers.types import SamplingParams

pytestmark = pytest.mark.models

SHORT = SamplingParams(max_new_tokens=4)


def _experts(**extra):
    return [
        TransformersExpert(name="smollm2", source=SMOLLM, threads=1, **extra),
        TransformersExpert(name="gemma3", source=GEMMA, threads=1, **extra),
    ]


def _start(experts, **pool_kwargs):
    return ExpertPool.start(experts, PoolConfig(**pool_kwargs), STORE_ROOT, namespace=f"t-{uuid.uuid4().hex[:8]}")


def test_budget_that_fits_one_model_evicts_the_least_recently_used(ray_cluster, store):
    # SmolLM2 is ~0.5 GiB and Gemma ~1.0 GiB in float32: 1.2 GiB holds either, never both.
    async def main():
        pool = await _start(_experts(), memory_budget_gb={"cpu": 1.2})
        try:
            trace = []
            for name in ("smollm2", "gemma3", "gemma3", "smollm2"):
                await pool.generate(name, ["Say hi."], SHORT)
                infos = {i.name: i for i in await pool.info()}
                trace.append((pool.resident(), infos["smollm2"].state, infos["gemma3"].state))
            return trace, pool.stats
        finally:
            pool.shutdown()

    trace, stats = run(main())
    assert trace == [
        (["smollm2"], "loaded", "unloaded"),
        (["gemma3"], "unloaded", "loaded"),
        (["gemma3"], "unloaded", "loaded"),
        (["smollm2"], "loaded", "unloaded"),
    ]
    assert (stats.loads, stats.unloads) == (3, 2)
    assert stats.loads_by_expert == {"smollm2": 2, "gemma3": 1}


def test_an_expert_larger_than_the_budget_is_marked_unavailable(ray_cluster, store):
    async def main():
        pool = await _start(_experts(), memory_budget_gb={"cpu": 0.75})
        try:
            ok = await pool.generate("smollm2", ["Say hi."], SHORT)
            with pytest.raises(ExpertUnavailableError, match="budget for cpu is 0.75 GiB"):
                await pool.generate("gemma3", ["Say hi."], SHORT)
            return ok, pool.healthy()
        finally:
            pool.shutdown()

    ok, healthy = run(main())
    assert ok.completions[0].text
    assert healthy == {"smollm2": True, "gemma3": False}


def test_killed_actor_is_restarted_and_reloaded(ray_cluster, store):
    async def main():
        pool = await _start(_experts()[:1])
        try:
            first = await pool.generate("smollm2", ["What is 2+2?"], SHORT)
            pid_before = (await pool.info())[0].pid
            ray_cluster.kill(pool.slots["smollm2"].actor, no_restart=False)
            second = await pool.generate("smollm2", ["What is 2+2?"], SHORT)
            info = (await pool.info())[0]
            return first, second, pid_before, info, pool.stats
        finally:
            pool.shutdown()

    first, second, pid_before, info, stats = run(main())
    assert second.completions[0].text == first.completions[0].text
    assert info.pid != pid_before and info.state == "loaded"
    assert stats.restarts >= 1 and stats.loads == 2


def test_a_model_that_fails_to_load_marks_only_that_expert(ray_cluster, store, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    experts = [
        TransformersExpert(name="smollm2", source=SMOLLM, threads=1),
        TransformersExpert(name="broken", source=str(broken), memory_gb=0.1),
    ]

    async def main():
        pool = await _start(experts)
        try:
            with pytest.raises(ExpertUnavailableError, match="expert broken failed to load") as info:
                await pool.generate("broken", ["hello"], SHORT)
            assert "Traceback" not in str(info.value) and 'File "' not in str(info.value)
            # a second try answers at once from the recorded failure
            with pytest.raises(ExpertUnavailableError, match="unavailable"):
                await pool.generate("broken", ["hello"], SHORT)
            good = await pool.generate("smollm2", ["Say hi."], SHORT)
            with pytest.raises(UnknownExpertError, match="configured experts: smollm2, broken"):
                await pool.generate("nope", ["hello"], SHORT)
            return good, pool.healthy(), {i.name: i.state for i in await pool.info()}
        finally:
            pool.shutdown()

    good, healthy, states = run(main())
    assert good.completions[0].text
    assert healthy == {"smollm2": True, "broken": False}
    assert states == {"smollm2": "loaded", "broken": "failed"}


def test_a_missing_store_model_names_the_pull_command(ray_cluster, tmp_path):
    async def main():
        pool = await ExpertPool.start(
            [TransformersExpert(name="smollm2", source=SMOLLM)], PoolConfig(),
            model_store=tmp_path / "empty-store", namespace=f"t-{uuid.uuid4().hex[:8]}",
        )
        try:
            with pytest.raises(ExpertUnavailableError) as info:
                await pool.generate("smollm2", ["hi"], SHORT)
            return str(info.value)
        finally:
            pool.shutdown()

    message = run(main())
    assert message == (
        f"expert smollm2 is unavailable: model 'smollm2-135m-instruct' is not in the store at "
        f"{tmp_path / 'empty-store'}; run `concilium models pull smollm2-135m-instruct`"
    )


def test_budget_error_is_raised_for_an_oversized_direct_lease(ray_cluster, store):
    async def main():
        pool = await _start(_experts()[:1], memory_budget_gb={"cpu": 2.0})
        try:
            pool.config.memory_budget_gb["cpu"] = 0.1  # shrunk after start: the lease must refuse
            with pytest.raises(MemoryLimitError, match="needs 0.50 GiB"):
                async with pool.lease("smollm2"):
                    pass
        finally:
            pool.shutdown()

    run(main())


def test_a_resident_expert_answers_while_another_loads(ray_cluster, store):
    """Loading runs outside the pool lock: a slow load must not block a resident expert."""
    import asyncio
    import time

    async def main():
        pool = await _start(_experts())
        try:
            await pool.generate("smollm2", ["Say hi."], SHORT)  # smollm2 resident, gemma3 not
            took = {}

            async def timed(name):
                started = time.perf_counter()
                await pool.generate(name, ["Say hi."], SHORT)
                took[name] = time.perf_counter() - started

            loading = asyncio.create_task(timed("gemma3"))
            await asyncio.sleep(0.3)  # gemma3's load (seconds) is under way
            await timed("smollm2")
            await loading
            return took, pool.stats
        finally:
            pool.shutdown()

    took, stats = run(main())
    # Blocked behind the load, smollm2 would take about as long as gemma3's load itself.
    assert took["smollm2"] < 0.5 * took["gemma3"], took
    assert stats.loads_by_expert == {"smollm2": 1, "gemma3": 1}
