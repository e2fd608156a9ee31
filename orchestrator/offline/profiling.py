"""Live profiling: the configured experts answer a validation file with gold answers, and are graded.

The outcomes (right or wrong, each answer as the vote compares it, each
answer's length and cost) become the same training set that recorded outcomes
give, so ``orchestrator.artifacts`` fits and selects routers on them alike.
Optionally an expert names each question's skills (the paper's LLM annotator),
and the aggregators are ranked by the paper's synthesis test.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from routers.aggregation import synthesis_prompt
from routers.annotators import LLMAnnotator
from routers.answers import extract
from routers.base import Prices, RoutingError, TrainingSet
from routers.scoring.aggregator_test import selection_items
from routers.scoring.grading import is_correct
from workers.pool import ExpertPool

LIVE_PROMPT = (
    "Answer the following question. Think briefly, then finish with 'The answer is (X)' for a "
    "multiple-choice question, or with \\boxed{{N}} for a numeric one.\n\n{question}"
)


@dataclass
class Tasks:
    """A task file's questions, gold answers and categories (None where an item names none)."""

    questions: list[str]
    gold: list[str]
    categories: list[str | None]


def load_tasks(path: Path, limit: int | None) -> Tasks:
    """A Symbolic-MoE task file: a JSON list of {question, gold_answer}, each with an optional category."""
    try:
        items = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RoutingError(f"cannot read task file {path}: {exc}") from None
    if not isinstance(items, list):
        raise RoutingError(f"{path}: expected a JSON list of {{question, gold_answer}} objects")
    items = items[:limit] if limit else items
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "question" not in item or "gold_answer" not in item:
            raise RoutingError(f"{path}: item {i} needs 'question' and 'gold_answer'")
    if not items:
        raise RoutingError(f"{path}: the validation set is empty")
    return Tasks([str(x["question"]) for x in items], [str(x["gold_answer"]) for x in items],
                 [None if x.get("category") is None else str(x["category"]) for x in items])


async def live_outcomes(
    generate: Callable[[str, list[str]], object],
    experts: list[str],
    tasks: Tasks,
    prices: dict[str, float],
    on_expert: Callable[[str], None] = lambda _e: None,
) -> tuple[TrainingSet, dict[str, list[str]]]:
    """Every expert answers every question in one batched call; the graded outcomes, and each expert's texts.

    ``prices``: USD per token of each expert, for input and output alike (``cost_per_1k_tokens`` / 1000).
    """
    questions, gold = tasks.questions, tasks.gold
    prompts = [LIVE_PROMPT.format(question=q) for q in questions]
    shape = (len(questions), len(experts))
    correct, spent, produced = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    extracted = np.empty(shape, dtype=object)
    texts: dict[str, list[str]] = {}
    for j, expert in enumerate(experts):
        result = await generate(expert, prompts)
        texts[expert] = [c.text for c in result.completions]
        correct[:, j] = [is_correct(t, g) for t, g in zip(texts[expert], gold)]
        extracted[:, j] = [extract(t) for t in texts[expert]]
        produced[:, j] = [c.completion_tokens for c in result.completions]
        spent[:, j] = [(c.prompt_tokens + c.completion_tokens) * prices[expert] for c in result.completions]
        on_expert(expert)
    price = np.array([prices[e] for e in experts])
    data = TrainingSet(texts=list(questions), correct=correct, experts=list(experts), categories=list(tasks.categories),
                       cost=spent, answers=extracted, output_tokens=produced, prices=Prices(price, price))
    return data, texts


ANNOTATION_TOKENS = 32
"""Enough for a few comma-separated keywords."""
AGGREGATOR_FORMAT = "Finish with 'The answer is (X)' or, for a numeric answer, \\boxed{N}."


async def llm_keywords(
    generate: Callable[[list[str], float], object], questions: list[str], annotator: LLMAnnotator
) -> list[list[str]]:
    """The paper's annotation with a live expert: all samples of all questions in one batched call."""
    result = await generate(annotator.prompts(questions), annotator.temperature)
    return annotator.keywords(len(questions), [c.text for c in result.completions])


async def rank_aggregators(
    generate: Callable[[str, list[str]], object],
    experts: list[str],
    questions: list[str],
    gold: list[str],
    answers: dict[str, list[str]],
    correct: np.ndarray,
) -> dict[str, float]:
    """Each candidate aggregator synthesises one right and two wrong answers per question; its accuracy."""
    graded = {e: [bool(x) for x in correct[:, j]] for j, e in enumerate(experts)}
    items = selection_items(questions, gold, answers, graded)
    prompts = [synthesis_prompt(it.question, it.candidates, AGGREGATOR_FORMAT) for it in items]
    scores = {}
    for expert in experts:
        result = await generate(expert, prompts)
        right = [is_correct(c.text, it.gold) for c, it in zip(result.completions, items)]
        scores[expert] = sum(right) / len(right)
    return scores


@dataclass
class LiveProfile:
    """What a live profiling run learns about the configured experts."""

    data: TrainingSet
    keywords: list[list[str]] | None
    """The annotator expert's skills per question; None: the embedding annotator names them later."""
    aggregator_accuracy: dict[str, float] | None


async def profile_live(
    pool: ExpertPool, tasks: Tasks, max_new_tokens: int | None, annotator: str | None,
    select_aggregator: bool, on_expert: Callable[[str], None], on_stage: Callable[[str], None],
) -> LiveProfile:
    """Every expert answers every question (one batched call each); optionally an expert names the skills
    (the paper's LLM annotator) and the aggregators are ranked by the synthesis test."""

    async def gen(name: str, prompts: list[str]):  # noqa: ANN202
        return await pool.generate(name, prompts, pool.config_of(name).generation.sampling(max_new_tokens))

    async def annotate(prompts: list[str], temperature: float):  # noqa: ANN202
        params = pool.config_of(annotator).generation.sampling(ANNOTATION_TOKENS, temperature)
        return await pool.generate(annotator, prompts, params)

    prices = {e: pool.config_of(e).cost_per_1k_tokens / 1000 for e in pool.names}
    data, answers = await live_outcomes(gen, pool.names, tasks, prices, on_expert)
    keywords, ranking = None, None
    if annotator is not None:
        llm = LLMAnnotator()
        on_stage(f"{annotator} is naming skills ({llm.samples} samples each)")
        keywords = await llm_keywords(annotate, tasks.questions, llm)
    if select_aggregator:
        on_stage("synthesis test for the aggregator ranking")
        ranking = await rank_aggregators(gen, pool.names, tasks.questions, tasks.gold, answers, data.correct)
    return LiveProfile(data, keywords, ranking)
