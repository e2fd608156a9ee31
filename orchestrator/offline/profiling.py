"""``concilium profile``: build expert profiles and the skill index, and save them as versioned artifacts.

There are two sources of outcomes:
- imported: recorded outcomes in the bench-data format;
- live: the configured experts answer a validation file with gold answers, and
  the answers are graded.

Either way the questions are annotated with skills, and the profiles and the
FAISS index are saved in ``<out>/<version>/``. ``<out>/LATEST`` names the newest
version. The router loads them from there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from routers.aggregation import selection_items, synthesis_prompt
from routers.annotators import EmbeddingAnnotator, LLMAnnotator
from routers.base import RoutingError
from routers.embedding import Embedder
from routers.grading import is_correct
from routers.profiles import Profiles, build_profiles
from routers.skill_index import SkillIndex
from workers.pool import ExpertPool

LIVE_PROMPT = (
    "Answer the following question. Think briefly, then finish with 'The answer is (X)' for a "
    "multiple-choice question, or with \\boxed{{N}} for a numeric one.\n\n{question}"
)


def save_artifacts(
    texts: list[str],
    correct: np.ndarray,
    experts: list[str],
    cost: np.ndarray | None,
    embedder: Embedder,
    out_dir: Path,
    source: dict[str, object],
    keywords: list[list[str]] | None = None,
    aggregator_accuracy: dict[str, float] | None = None,
) -> tuple[Path, dict[str, object]]:
    """Annotate (unless keywords are given), build profiles and the index; save them; (folder, summary)."""
    if len(texts) == 0:
        raise RoutingError("the validation set is empty: nothing to profile")
    if keywords is None:
        keywords = EmbeddingAnnotator(embedder).annotate(texts, embedder.encode(texts))
    profiles = build_profiles(keywords, correct, experts, cost)
    index = SkillIndex(profiles.skills, embedder.encode(profiles.skills))
    version = time.strftime("%Y%m%d-%H%M%S")
    folder = out_dir / version
    profiles.save(folder)
    index.save(folder)
    summary = summarise(profiles, index, {**source, "n_questions": len(texts)}, aggregator_accuracy)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "LATEST").write_text(version + "\n")
    return folder, summary


def summarise(
    profiles: Profiles,
    index: SkillIndex,
    source: dict[str, object],
    aggregator_accuracy: dict[str, float] | None = None,
) -> dict[str, object]:
    strength = profiles.global_strength()
    acc = profiles.smoothed_accuracy()
    seen_enough = profiles.seen[:, 0] >= 3
    top_skills = {}
    for j, expert in enumerate(profiles.experts):
        order = [i for i in np.argsort(-acc[:, j]) if seen_enough[i]][:5]
        top_skills[expert] = [profiles.skills[i] for i in order]
    if aggregator_accuracy:
        ranking = sorted(aggregator_accuracy, key=lambda e: -aggregator_accuracy[e])
        method = f"synthesis test: accuracy {aggregator_accuracy}"
    else:
        # Without a synthesis test, aggregators are ranked by answering accuracy alone.
        ranking = sorted(profiles.experts, key=lambda e: -profiles.overall[profiles.experts.index(e)])
        method = "overall accuracy (no synthesis test was run)"
    return {
        "source": source,
        "n_skills": len(profiles.skills),
        "index": index.kind,
        "experts": {
            e: {
                "accuracy": float(profiles.overall[j]),
                "global_strength": float(strength[j]),
                "mean_cost": None if profiles.cost is None else float(profiles.cost[j]),
                "best_skills": top_skills[e],
            }
            for j, e in enumerate(profiles.experts)
        },
        "aggregator_ranking": ranking,
        "aggregator_ranking_method": method,
    }


def load_tasks(path: Path, limit: int | None) -> tuple[list[str], list[str]]:
    """Questions and gold answers from a Symbolic-MoE task file (a JSON list of {question, gold_answer})."""
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
    return [str(x["question"]) for x in items], [str(x["gold_answer"]) for x in items]


async def live_outcomes(
    generate: Callable[[str, list[str]], object],
    experts: list[str],
    questions: list[str],
    gold: list[str],
    on_expert: Callable[[str], None] = lambda _e: None,
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Every expert answers every question in one batched call; answers are graded against gold."""
    prompts = [LIVE_PROMPT.format(question=q) for q in questions]
    correct = np.zeros((len(questions), len(experts)))
    answers: dict[str, list[str]] = {}
    for j, expert in enumerate(experts):
        result = await generate(expert, prompts)
        texts = [c.text for c in result.completions]
        answers[expert] = texts
        correct[:, j] = [is_correct(t, g) for t, g in zip(texts, gold)]
        on_expert(expert)
    return correct, answers


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

    correct: np.ndarray
    keywords: list[list[str]] | None
    """The annotator expert's skills per question; None: the embedding annotator names them later."""
    aggregator_accuracy: dict[str, float] | None


async def profile_live(
    pool: ExpertPool, questions: list[str], gold: list[str], max_new_tokens: int | None, annotator: str | None,
    select_aggregator: bool, on_expert: Callable[[str], None], on_stage: Callable[[str], None],
) -> LiveProfile:
    """Every expert answers every question (one batched call each); optionally an expert names the skills
    (the paper's LLM annotator) and the aggregators are ranked by the synthesis test."""

    async def gen(name: str, prompts: list[str]):  # noqa: ANN202
        return await pool.generate(name, prompts, pool.config_of(name).generation.sampling(max_new_tokens))

    async def annotate(prompts: list[str], temperature: float):  # noqa: ANN202
        params = pool.config_of(annotator).generation.sampling(ANNOTATION_TOKENS, temperature)
        return await pool.generate(annotator, prompts, params)

    correct, answers = await live_outcomes(gen, pool.names, questions, gold, on_expert)
    keywords, ranking = None, None
    if annotator is not None:
        llm = LLMAnnotator()
        on_stage(f"{annotator} is naming skills ({llm.samples} samples each)")
        keywords = await llm_keywords(annotate, questions, llm)
    if select_aggregator:
        on_stage("synthesis test for the aggregator ranking")
        ranking = await rank_aggregators(gen, pool.names, questions, gold, answers, correct)
    return LiveProfile(correct, keywords, ranking)
