"""Learned routers, calibration, recruitment plans, budgets and router selection, on slices of the real
bench-data, embedded with the static encoder from the model store."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.cli.live import STARTER
from orchestrator.embedders import encoder
from orchestrator.offline.data import load_eval_data
from routers.base import RouteOptions
from routers.plans import agree, replay
from routers.registry import make_router
from routers.scoring.crossval import (
    CostTarget,
    calibration_error,
    cross_validation_splits,
    run_router,
    scored_as,
)
from routers.scoring.selection import nested, select
from routers.selected import CANDIDATES
from routers.vocabulary import Policy
from tests.conftest import STORE_ROOT
from tests.test_eval_cli import write_slice

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def static(store):
    return encoder("static", STORE_ROOT)


@pytest.fixture(scope="module")
def mmlu(bench_data, static, tmp_path_factory):
    """1,500 dev questions, the open-small pool, with prices: real outcomes, answers and costs."""
    folder = write_slice(bench_data / "mmlu-pro-28llm", tmp_path_factory.mktemp("mmlu"), slice(1500))
    (folder / "prices.json").write_text((bench_data / "mmlu-pro-28llm" / "prices.json").read_text())
    return load_eval_data(folder, static, pool="open-small")


@pytest.fixture(scope="module")
def routerbench(bench_data, static):
    return load_eval_data(bench_data / "routerbench-arc-wino-mbpp", static)


def test_how_recorded_outcomes_score_each_aggregation():
    assert scored_as("vote", 3) == "vote" and scored_as("vote", 1) == "best"
    for writes_anew in ("synthesize", "moa", "self-moa", "best"):
        assert scored_as(writes_anew, 3) == "best"


def test_a_small_selection_repeats_its_split_and_reads_the_task_categories(static, tmp_path):
    """32 starter-sized questions: the 3-fold CV runs with 5 seeds, so one unlucky split decides less, and the
    categories a task file names reach the per-category baseline."""
    from orchestrator.evals.labelled import load_labelled
    from routers.scoring.crossval import EvalData

    tasks = load_labelled(STARTER, 32)
    assert len(tasks.questions) == 32 and tasks.categories[0] == "geography" and None not in tasks.categories
    rng = np.random.default_rng(0)
    correct = (rng.random((32, 2)) < [0.6, 0.3]).astype(float)
    data = EvalData(texts=tasks.questions, correct=correct, experts=["a", "b"], categories=tasks.categories,
                    vectors=static.encode(tasks.questions))
    picked = select(data, lambda n: make_router(n, embedder=static), RouteOptions(k=1), "best", folds=3)
    assert picked.repeats == 5 and picked.summary()["repeats"] == 5
    assert picked.scores[picked.chosen] == max(picked.scores.values())


def test_calibration_error_arithmetic():
    # Two bins: p = 0.2 with a 0.5 outcome rate, and p = 0.9 with a 0.9 rate; half the pairs in each.
    p = np.array([0.2] * 10 + [0.9] * 10)
    y = np.array([1] * 5 + [0] * 5 + [1] * 9 + [0])
    assert calibration_error(p, y) == pytest.approx(0.5 * 0.3 + 0.5 * 0.0)
    assert calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0  # the edges fall inside a bin
    assert calibration_error(np.full(4, 0.75), np.array([1, 1, 1, 0])) == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["cluster", "logistic", "irt"])
def test_each_learned_router_beats_random_and_is_calibrated(mmlu, static, name):
    splits = cross_validation_splits(len(mmlu.texts), 3, 0)
    learned = run_router(lambda: make_router(name, embedder=static), mmlu, RouteOptions(k=1), "best", splits)
    rand = run_router(lambda: make_router("random"), mmlu, RouteOptions(k=1, seed=0), "best", splits)
    assert learned.accuracy > rand.accuracy + 0.08
    assert learned.calibration_error < 0.05


def test_a_cascade_stops_on_agreement_and_escalates_on_disagreement():
    p = np.array([0.9, 0.8, 0.7, 0.6])
    said = np.array(["A", "A", "B", "B"], dtype=object)
    stop = replay(p, None, said, (2, 4), 0.0, Policy.CASCADE)
    assert stop.asked.tolist() == [0, 1] and stop.winner == 0  # the first two agree: nobody else is asked
    said[1] = "C"
    escalated = replay(p, None, said, (2, 4), 0.0, Policy.CASCADE)
    assert escalated.asked.tolist() == [0, 1, 2, 3] and said[escalated.winner] == "B"  # B: 0.7 + 0.6 > 0.9
    assert not agree(["A", None]) and agree(["A", "A"])
    # With a price on cost, the cheap expert goes first.
    cheap_first = replay(p, np.array([10.0, 10.0, 0.0, 0.0]), said, (2, 2), 0.1, Policy.CASCADE)
    assert cheap_first.asked.tolist() == [2, 3]


def test_a_cost_budget_holds_on_the_held_out_folds(routerbench, static):
    splits = cross_validation_splits(len(routerbench.texts), 3, 0)
    outcome = run_router(lambda: make_router("cluster", embedder=static), routerbench,
                         RouteOptions(k=1, policy=Policy.COST), "best", splits, budget=CostTarget(share=0.4))
    idx = np.concatenate([t for _, t in splits])
    best = int(np.argmax(routerbench.correct[idx].mean(axis=0)))
    assert outcome.mean_cost <= 0.4 * routerbench.cost[idx, best].mean()
    assert outcome.accuracy > routerbench.correct[idx].mean(axis=0).min()  # it routes, it does not just go cheap


def test_a_calls_budget_holds_on_the_held_out_folds(mmlu, static):
    splits = cross_validation_splits(len(mmlu.texts), 3, 0)
    outcome = run_router(lambda: make_router("cluster", embedder=static), mmlu,
                         RouteOptions(k=3, policy=Policy.ADAPTIVE), "vote", splits, budget=CostTarget(max_experts=2.0))
    assert 1.0 <= outcome.mean_experts <= 2.0


def test_auto_never_picks_a_candidate_that_scored_worse(mmlu, static):
    make = lambda n: make_router(n, embedder=static)  # noqa: E731
    picked = select(mmlu, make, RouteOptions(k=3), "vote", folds=3)
    assert set(picked.scores) == set(CANDIDATES) and picked.repeats == 1  # 1,500 questions: one split is enough
    assert picked.scores[picked.chosen] == max(picked.scores.values())
    small = mmlu.subset(np.arange(600))
    outer = nested(small, make, RouteOptions(k=3), "vote", cross_validation_splits(600, 2, 0), inner_folds=2)
    for chosen, inner in zip(outer.chosen, outer.inner_scores):
        assert inner[chosen] == max(inner.values())


def test_auto_keeps_automatic_selection_under_a_cost_target(routerbench, static):
    """`concilium eval --router auto --budget-share F`: every candidate is held to the target on each inner
    training part, and the chosen one routes the outer test part with its λ. λ is solved on training parts and
    does not always transfer (on small slices the held-out share overshoots the target: docs/benchmarks.md gives
    the measured shares), so what must hold everywhere is that selection runs under the target, picks its best
    candidate, and spends less than the best single expert alone."""
    make = lambda n: make_router(n, embedder=static)  # noqa: E731
    small = routerbench.subset(np.arange(0, len(routerbench.texts), 21))
    splits = cross_validation_splits(len(small.texts), 2, 0)
    outer = nested(small, make, RouteOptions(k=1, policy=Policy.COST), "best", splits, inner_folds=2,
                   target=CostTarget(share=0.5))
    assert set(outer.chosen) <= set(CANDIDATES) and len(outer.chosen) == 2
    for chosen, inner in zip(outer.chosen, outer.inner_scores):
        assert inner[chosen] == max(inner.values())
    idx = np.concatenate([t for _, t in splits])
    best = int(np.argmax(small.correct[idx].mean(axis=0)))
    assert outer.mean_cost < small.cost[idx, best].mean()
    assert outer.accuracy > small.correct[idx].mean(axis=0).min()
