"""What a live profile may add beside its graded answers: skills named by an expert (the paper's LLM
annotator), and an aggregator ranking from the paper's synthesis test.

Both ask the configured experts directly, in one batched call each (``Pipeline.generate``); the answers
themselves are asked through the served path (``orchestrator.evals``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np

from routers.aggregation import synthesis_prompt
from routers.annotators import LLMAnnotator
from routers.scoring.aggregator_test import selection_items
from routers.scoring.grading import grade
from workers.types import GenerationResult

ANNOTATION_TOKENS = 32
"""Enough for a few comma-separated keywords."""
AGGREGATOR_FORMAT = "Finish with 'The answer is (X)' or, for a numeric answer, \\boxed{N}."

Generate = Callable[[str, list[str], int | None, float | None], Awaitable[GenerationResult]]
"""(expert, prompts, max_new_tokens, temperature) -> one batched call's result."""


async def llm_keywords(generate: Generate, annotator: str, questions: list[str]) -> list[list[str]]:
    """The paper's annotation with a live expert: all samples of all questions in one batched call."""
    llm = LLMAnnotator()
    result = await generate(annotator, llm.prompts(questions), ANNOTATION_TOKENS, llm.temperature)
    return llm.keywords(len(questions), [c.text for c in result.completions])


async def rank_aggregators(generate: Generate, experts: list[str], questions: list[str], gold: list[str],
                           answers: dict[str, list[str]], correct: np.ndarray) -> dict[str, float]:
    """Each candidate aggregator synthesises one right and two wrong answers per question; its accuracy."""
    graded = {e: [bool(x) for x in correct[:, j]] for j, e in enumerate(experts)}
    items = selection_items(questions, gold, answers, graded)
    prompts = [synthesis_prompt(it.question, it.candidates, AGGREGATOR_FORMAT) for it in items]
    scores = {}
    for expert in experts:
        result = await generate(expert, prompts, None, None)
        right = [grade(c.text, it.gold) for c, it in zip(result.completions, items)]
        scores[expert] = sum(right) / len(right)
    return scores
