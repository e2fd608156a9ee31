"""What answers are compared by, how they are graded, the labelled sets, and the choice of the served
configuration: the pure parts of live evaluation, no model and no Ray."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from orchestrator.cli.live import STARTER
from orchestrator.evals.candidates import Candidate
from orchestrator.evals.choose import SIGNIFICANCE, Scored, choose, sign_test
from orchestrator.evals.labelled import LabelledSetError, load_labelled
from orchestrator.evals.live import wilson
from routers.aggregation import aggregate_without_call
from routers.answers import extract, kind_of
from routers.base import Decision
from routers.scoring.grading import grade, infer_grader
from routers.vocabulary import Aggregation, AnswerKind, Grader


@dataclass
class Said:
    expert: str
    text: str


def test_a_question_says_what_kind_of_answer_it_wants():
    assert kind_of("What is the capital of France?\n(A) Berlin\n(B) Paris\n(C) Rome") == AnswerKind.LETTER
    assert kind_of("Which one?\nA. red\nB. blue") == AnswerKind.LETTER
    assert kind_of("What is 7 + 5?") == AnswerKind.NUMBER and kind_of("How many legs has a spider?") == "number"
    assert kind_of("Name a primary colour.") == AnswerKind.TEXT
    assert kind_of("Is plan (A) better than plan B?") == AnswerKind.TEXT  # one letter in passing is no option list


def test_free_text_is_never_voted_on_as_letters():
    """The console's case: two free-text answers that mention "(B)" and "(G)" were voted as option letters, and
    the answer became "B". On free text the vote compares the words, so with no majority the top-scored expert's
    own answer is returned, whole."""
    said = [Said("smollm2", "Blue (B) is a primary colour."), Said("gemma3", "Green (G), in light.")]
    decision = Decision(experts=["smollm2", "gemma3"], scores={"smollm2": 0.3, "gemma3": 0.7})
    free = aggregate_without_call(Aggregation.VOTE, said, decision, kind_of("Name a primary colour."))
    assert free.text == "Green (G), in light." and free.source == "gemma3" and "(text)" in free.skipped
    assert extract(said[0].text, AnswerKind.TEXT) == "blue b is a primary colour"
    lettered = aggregate_without_call(Aggregation.VOTE, said, decision, AnswerKind.LETTER)
    assert lettered.source == "gemma3" and "'G'" in lettered.skipped
    same_words = [Said("a", "Paris."), Said("b", "paris"), Said("c", "Lyon")]
    two_to_one = aggregate_without_call(Aggregation.VOTE, same_words, Decision(["a", "b", "c"],
                                        {"a": 0.2, "b": 0.2, "c": 0.3}), AnswerKind.TEXT)
    assert two_to_one.source == "a"  # free text that says the same words still pools its weight
    numbers = [Said("a", "The answer is 12."), Said("b", "12"), Said("c", "It is 13")]
    agreed = aggregate_without_call(Aggregation.SYNTHESIZE, numbers[:2], Decision(["a", "b"], {}), AnswerKind.NUMBER)
    assert agreed.skipped.startswith("consensus")
    assert aggregate_without_call(Aggregation.SYNTHESIZE, numbers[:2], Decision(["a", "b"], {}),
                                  AnswerKind.TEXT) is None  # as text they differ: the synthesis runs


@pytest.mark.parametrize(("answer", "gold", "grader", "right"), [
    ("The answer is (B).", "B", Grader.MC, True),
    ("B) Paris", "B", Grader.MC, True),
    ("Paris is the capital.", "B", Grader.MC, False),
    ("5 + 7 = 12", "12", Grader.NUMERIC, True),
    ("It has eight legs.", "8", Grader.NUMERIC, True),
    ("1,200 people", "1200", Grader.NUMERIC, True),
    ("12.5", "12", Grader.NUMERIC, False),
    ("Yes, it is.", "yes", Grader.EXACT, True),
    ("Yesterday", "yes", Grader.EXACT, False),
    ("No.", "yes", Grader.EXACT, False),
    ("The capital of France is Paris.", "Paris", Grader.CONTAINS, True),
    ("Parisian food", "Paris", Grader.CONTAINS, False),
    ("It was written by Homer.", "Homer|Virgil", Grader.CONTAINS, True),
    ("New Delhi", "New Delhi|Delhi", Grader.CONTAINS, True),
])
def test_graders(answer, gold, grader, right):
    assert grade(answer, gold, grader) is right


def test_a_grader_is_inferred_from_the_gold_when_none_is_named():
    assert infer_grader("C") == Grader.MC and infer_grader("42") == Grader.NUMERIC
    assert infer_grader("Paris") == Grader.CONTAINS


def test_the_starter_set_can_decide_and_splits_in_stable_halves():
    data = load_labelled(STARTER)
    assert len(data) >= 200 and len(set(data.questions)) == len(data)
    assert {str(g) for g in data.graders} == {"mc", "numeric", "exact", "contains"}
    said = {Grader.MC: "The answer is ({}).", Grader.EXACT: "{}.", Grader.NUMERIC: "The answer is {}.",
            Grader.CONTAINS: "The answer is {}."}
    assert all(grade(said[k].format(g.split("|")[0]), g, k) for g, k in zip(data.gold, data.graders))
    first, second = data.halves()
    assert sorted(first + second) == list(range(len(data))) and not set(first) & set(second)
    assert (first, second) == load_labelled(STARTER).halves()
    for category in set(data.categories):  # each category split evenly between the halves
        here = [i for i, c in enumerate(data.categories) if c == category]
        assert abs(sum(i in first for i in here) - sum(i in second for i in here)) <= 1


@pytest.mark.parametrize(("lines", "message"), [
    (['{"question": "q"}'], "item 1 needs a 'question' and an 'answer'"),
    (['{"question": "q", "answer": "a"}', "{not json"], ":2: invalid JSON"),
    (['{"question": "q", "answer": "a", "grader": "fuzzy"}'], "unknown grader 'fuzzy'"),
    ([], "no questions"),
])
def test_a_bad_labelled_file_names_what_is_wrong(tmp_path, lines, message):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(LabelledSetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_labelled(path)


def test_a_bench_data_folder_without_gold_answers_is_refused(bench_data):
    with pytest.raises(LabelledSetError, match="records no gold answer"):
        load_labelled(bench_data / "routerbench-arc-wino-mbpp")
    mmlu = load_labelled(bench_data / "mmlu-pro-28llm")
    assert len(mmlu) == 7133 and set(mmlu.graders) == {Grader.MC}


def test_the_best_single_expert_stays_unless_a_candidate_beats_it_beyond_noise():
    rng = np.random.default_rng(0)
    single = (rng.random(200) < 0.5).astype(float)
    noise = single.copy()
    noise[np.flatnonzero(single == 0)[:3]] = 1.0  # three more right: not enough
    gain = single.copy()
    gain[np.flatnonzero(single == 0)[:20]] = 1.0  # twenty more right: a real gain
    incumbent = Scored(Candidate(alone="a"), single, 1.0, 1.0)
    near = Scored(Candidate("cluster", 2, Aggregation.VOTE), noise, 2.0, 2.0)
    assert sign_test(noise, single) == 0.125 and choose(incumbent, [near]).chosen is incumbent
    far = Scored(Candidate("cluster", 3, Aggregation.VOTE), gain, 3.0, 3.0)
    assert sign_test(gain, single) < SIGNIFICANCE
    cheaper = Scored(Candidate("per_category", 1), gain.copy(), 0.5, 1.0)
    picked = choose(incumbent, [near, far, cheaper])
    assert picked.chosen is cheaper  # as accurate as the other winner, and cheaper
    summary = picked.summary()
    assert summary["router"] == "per_category"
    assert summary["best_single"] == {"expert": "a", "cv_accuracy": float(single.mean())}
    assert json.dumps(summary)  # recorded in summary.json as is


def test_the_interval_is_wilson_s():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.404, abs=1e-3) and high == pytest.approx(0.596, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and 0 < wilson(0, 10)[1] < 0.35
