"""Expert actors on real local Ray with the two real bundled models."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import GEMMA, SMOLLM, STORE_ROOT, run
from workers.backends.templates import ChatFormat, load_tokenizer
from workers.config import PoolConfig, TransformersExpert
from workers.pool import ExpertPool
from workers.types import Prompt, SamplingParams

pytestmark = pytest.mark.models

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the sea, with a lot of detail about the waves and the light.",
]
EXPERTS = [
    TransformersExpert(name="smollm2", source=SMOLLM, threads=1),
    TransformersExpert(name="gemma3", source=GEMMA, threads=1),
]


def _pool(experts=EXPERTS, **pool_kwargs) -> ExpertPool:
    return ExpertPool.start(experts, PoolConfig(**pool_kwargs), STORE_ROOT, namespace=f"t-{uuid.uuid4().hex[:8]}")


def test_node_address_is_loopback(ray_cluster):
    assert {n["NodeManagerAddress"] for n in ray_cluster.nodes()} == {"127.0.0.1"}


def test_round_trip_batching_and_token_counts(ray_cluster, store):
    """Both models through their actors: batching leaves the answers as they are alone, and token counts are exact.

    Greedy text of tiny models differs in its last bits between CPUs, and left padding changes the shapes of a
    batched call's arithmetic, so batched and single answers are held to what holds on every CPU: each row's
    first words are the same, and most rows are identical throughout (all were, when this was written)."""
    params = SamplingParams(max_new_tokens=12)

    async def main():
        pool = await _pool()
        try:
            out = {}
            for name in pool.names:
                batched = await pool.generate(name, PROMPTS, params)
                singles = [(await pool.generate(name, [p], params)).completions[0] for p in PROMPTS]
                out[name] = (batched, singles)
            return out, pool.stats
        finally:
            pool.shutdown()

    out, stats = run(main())
    assert stats.loads == 2  # each model loaded once, then reused
    for name, source in (("smollm2", SMOLLM), ("gemma3", GEMMA)):
        batched, singles = out[name]
        assert batched.batch_size == 3 and batched.expert == name
        pairs = [(b.text, s.text) for b, s in zip(batched.completions, singles)]
        assert all(b.split()[:3] == s.split()[:3] for b, s in pairs), pairs
        assert sum(b == s for b, s in pairs) >= 2, pairs
        fmt = ChatFormat(load_tokenizer(store.path(source)), "auto", name)
        for prompt, c in zip(PROMPTS, batched.completions):
            assert c.text.strip()
            assert c.prompt_tokens == len(fmt.token_ids(Prompt(prompt)))  # the padding is not counted
            assert 1 <= c.completion_tokens <= 12
            assert c.finish_reason == "stop" or (c.finish_reason == "length" and c.completion_tokens == 12)
    assert out["smollm2"][0].completions[0].finish_reason == "stop"  # "The capital of France is Paris." then EOS
    assert "paris" in out["smollm2"][0].completions[0].text.lower()


def test_sampling_is_seedable_and_differs_from_greedy(ray_cluster, store):
    async def main():
        pool = await _pool(EXPERTS[:1])
        try:
            prompt = ["Tell me a short story about a dragon."]
            hot = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
            a = await pool.generate("smollm2", prompt, hot)
            b = await pool.generate("smollm2", prompt, hot)
            other = [
                (await pool.generate("smollm2", prompt, SamplingParams(16, 1.0, 0.95, seed))).completions[0].text
                for seed in (1, 2, 3)
            ]
            return a.completions[0].text, b.completions[0].text, other
        finally:
            pool.shutdown()

    a, b, other = run(main())
    assert a == b
    assert len(set(other + [a])) > 1



def test_a_streamed_batch_adds_up_to_its_completions_per_row_and_a_cancel_ends_one_row(ray_cluster, store):
    """A batched call through the actor's streaming generator: each row's pieces, in order, are exactly that
    row's completion, which equals the unstreamed one; a stop string ends its row without being sent; a
    cancelled row ends early while the others run on."""
    params = SamplingParams(max_new_tokens=24)
    stopped = SamplingParams(max_new_tokens=24, stop=("Paris",))

    async def collect(pool, p, call, cancel_row=None):  # noqa: ANN001, ANN202
        pieces = [""] * len(PROMPTS)
        async for item in pool.stream("smollm2", PROMPTS, p, call):
            if isinstance(item, list):
                for delta in item:
                    pieces[delta.row] += delta.text
                    if delta.row == cancel_row:
                        pool.cancel("smollm2", call, cancel_row)
            else:
                return pieces, item

    async def main():
        pool = await _pool(EXPERTS[:1])
        try:
            whole = await pool.generate("smollm2", PROMPTS, params)
            return (whole, await collect(pool, params, "a"), await collect(pool, stopped, "b"),
                    await collect(pool, params, "c", cancel_row=2))
        finally:
            pool.shutdown()

    whole, (pieces, streamed), (stop_pieces, stop_result), (cut_pieces, cut) = run(main())
    assert [c.text for c in streamed.completions] == [c.text for c in whole.completions] == pieces
    assert stop_result.completions[0].text == stop_pieces[0] and "Paris" not in stop_pieces[0]
    assert whole.completions[0].text.startswith(stop_pieces[0]) and stop_pieces[0].strip()
    assert cut.completions[2].finish_reason == "cancelled" and cut_pieces[2] == cut.completions[2].text
    assert cut.completions[2].completion_tokens < whole.completions[2].completion_tokens
    assert [c.text for c in cut.completions[:2]] == [c.text for c in whole.completions[:2]]
