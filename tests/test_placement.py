"""GPU placement with Ray logical GPUs and custom resources.

There is no GPU on this machine: the session's Ray advertises 2 logical GPUs
and a ``gpu_node`` resource, so Ray's real scheduler assigns GPU ids while torch
(which sees no CUDA) keeps the models on the CPU. Replay experts are used so
that no model loads.
"""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import STORE_ROOT, run
from workers.config import PoolConfig, ReplayExpert
from workers.placement import PlacementError, actor_options, check_placement, demand
from workers.pool import ExpertPool


def _replay(name, bench_data, **kw):
    return ReplayExpert(
        name=name, backend="replay", path=bench_data / "mmlu-pro-28llm", model="gemma-7b", **kw
    )


def test_demand_and_options_carry_fractional_gpus():
    e = ReplayExpert(name="a", backend="replay", path="/x", model="m", num_gpus=0.25, resources={"gpu_node": 1})
    assert demand(e) == {"GPU": 0.25, "gpu_node": 1}
    opts = actor_options(e, "ns")
    assert (opts["num_gpus"], opts["resources"], opts["name"], opts["namespace"]) == (
        0.25, {"gpu_node": 1}, "concilium-expert-a", "ns",
    )
    assert opts["max_restarts"] == 3


def test_first_fit_packs_fractions_and_names_the_misfit():
    nodes = [{"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 2}]
    ex = [ReplayExpert(name=f"e{i}", backend="replay", path="/x", model="m", num_gpus=g)
          for i, g in enumerate([0.5, 0.5, 1, 0.75, 0.25])]
    placed = check_placement(ex, nodes)
    assert all(p >= 0 for p in placed)
    too_many = ex + [ReplayExpert(name="big", backend="replay", path="/x", model="m", num_gpus=1)]
    with pytest.raises(PlacementError, match="does not fit: the experts together ask for more than the cluster's 3 GPU"):
        check_placement(too_many, nodes)
    whole = [ReplayExpert(name="w", backend="replay", path="/x", model="m", num_gpus=3)]
    with pytest.raises(PlacementError, match="needs 3 GPU on one node; the largest node offers 2"):
        check_placement(whole, nodes)
    odd = [ReplayExpert(name="t", backend="replay", path="/x", model="m", resources={"tpu": 1})]
    with pytest.raises(PlacementError, match="'tpu', which no node in the cluster offers"):
        check_placement(odd, nodes)


def test_actors_get_logical_gpus_from_ray(ray_cluster, bench_data):
    experts = [
        _replay("half-a", bench_data, num_gpus=0.5),
        _replay("half-b", bench_data, num_gpus=0.5),
        _replay("whole", bench_data, num_gpus=1, resources={"gpu_node": 1}),
    ]

    async def main():
        pool = await ExpertPool.start(experts, PoolConfig(), STORE_ROOT, namespace=f"t-{uuid.uuid4().hex[:8]}")
        try:
            return {i.name: i for i in await pool.info()}
        finally:
            pool.shutdown()

    infos = run(main())
    gpu = {name: info.gpu_ids for name, info in infos.items()}
    assert all(len(ids) == 1 for ids in gpu.values()), gpu
    # The two halves share one GPU (Ray packs fractions), the whole one has the other.
    assert gpu["half-a"] == gpu["half-b"] != gpu["whole"]
    assert all(info.node_id for info in infos.values())


def test_unplaceable_config_fails_before_any_actor_starts(ray_cluster, bench_data):
    async def main(experts):
        await ExpertPool.start(experts, PoolConfig(), STORE_ROOT, namespace=f"t-{uuid.uuid4().hex[:8]}")

    with pytest.raises(PlacementError, match="needs 4 GPU on one node; the largest node offers 2"):
        run(main([_replay("greedy", bench_data, num_gpus=4)]))
    with pytest.raises(PlacementError, match="'a100_node', which no node"):
        run(main([_replay("picky", bench_data, resources={"a100_node": 1})]))
