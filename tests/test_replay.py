"""The replay backend and the recorded-outcomes reader, on the real bench-data files."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import STORE_ROOT, run
from workers.backends.replay import ReplayBackend
from workers.config import PoolConfig, ReplayExpert
from workers.pool import ExpertPool
from workers.recorded import RecordedDataError, load_recorded
from workers.types import SamplingParams


def test_reads_both_bench_data_formats(bench_data):
    mmlu = load_recorded(bench_data / "mmlu-pro-28llm")
    assert len(mmlu.models) == 28 and len(mmlu.records) == 7133
    assert mmlu.records[0].pred is not None and mmlu.prices is not None
    r, (inp, out) = mmlu.records[0], mmlu.prices[0]  # cost follows prices.json's rule: chars / 4 × the price
    assert r.cost[0] == pytest.approx((r.prompt_chars / 4 * inp + r.output_chars[0] / 4 * out))
    assert r.prompt_chars > len(r.text)  # the question and its options
    rb = load_recorded(bench_data / "routerbench-arc-wino-mbpp")
    assert len(rb.models) == 11 and rb.records[0].cost is not None
    assert rb.records[0].category == "arc-challenge"


def test_replays_the_recorded_answer_of_the_named_model(bench_data):
    data = load_recorded(bench_data / "mmlu-pro-28llm")
    rec = data.records[0]
    col = data.model_index("gemini-1.5-pro-002")
    backend = ReplayBackend(ReplayExpert(name="g", backend="replay", path=bench_data / "mmlu-pro-28llm",
                                         model="gemini-1.5-pro-002"))
    backend.load()
    by_text, by_id, other, other2 = backend.generate(
        [_p(rec.text), _p(f"id:{rec.id}"), _p("an unrecorded question"), _p("an unrecorded question")],
        SamplingParams(),
    )
    assert by_text.text == f"The answer is ({rec.pred[col]})."
    assert by_text.meta["matched"] and by_text.meta["score"] == rec.outcome[col]
    assert by_id.meta["record_id"] == rec.id
    assert not other.meta["matched"] and other.meta == other2.meta  # deterministic fallback


def _p(text):
    from workers.types import Prompt

    return Prompt(text)


@pytest.mark.parametrize(
    ("models", "line", "message"),
    [
        (["a", "b"], {"question_id": 1, "question": "q"}, "missing field (one of correct, score)"),
        (["a", "b"], {"question_id": 1, "question": "q", "correct": [1]}, "'correct' must be a list of 2"),
        (["a", "b"], {"question": "q", "correct": [1, 0]}, "missing field (one of question_id"),
        (["a", "b"], {"question_id": 1, "question": "q", "correct": [1, "x"]}, "not float"),
        ("not-a-list", {"question_id": 1}, "must be a non-empty list of model names"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, models, line, message):
    (tmp_path / "models.json").write_text(json.dumps(models))
    (tmp_path / "data.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(RecordedDataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recorded(tmp_path)


def test_missing_folder_and_unknown_model(tmp_path, bench_data):
    with pytest.raises(RecordedDataError, match="models.json is missing"):
        load_recorded(tmp_path)
    with pytest.raises(RecordedDataError, match="model 'gpt-9' is not in this file"):
        load_recorded(bench_data / "mmlu-pro-28llm").model_index("gpt-9")


def test_replay_experts_through_the_pool(ray_cluster, bench_data):
    experts = [
        ReplayExpert(name=name, backend="replay", path=bench_data / "routerbench-arc-wino-mbpp", model=model)
        for name, model in (("gpt4", "gpt-4-1106-preview"), ("mistral7b", "mistralai/mistral-7b-chat"))
    ]

    async def main():
        pool = await ExpertPool.start(experts, PoolConfig(), STORE_ROOT, namespace=f"t-{uuid.uuid4().hex[:8]}")
        try:
            rec = load_recorded(bench_data / "routerbench-arc-wino-mbpp").records[3]
            return rec, [await pool.generate(n, [rec.text]) for n in pool.names]
        finally:
            pool.shutdown()

    rec, results = run(main())
    assert [r.completions[0].cost_usd for r in results] == [rec.cost[5], rec.cost[8]]
    assert [r.completions[0].meta["score"] for r in results] == [rec.outcome[5], rec.outcome[8]]
