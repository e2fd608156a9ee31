"""The aggregator test of Symbolic-MoE: for each validation question, one correct and two wrong candidate
answers are shuffled, and each candidate aggregator must synthesise them. The aggregator that most often lands
on the gold answer ranks first."""

from __future__ import annotations

import random
from dataclasses import dataclass

LETTERS = "ABCDEFGHIJ"


@dataclass
class SelectionItem:
    question: str
    candidates: list[str]
    gold: str


def selection_items(
    questions: list[str],
    gold: list[str],
    answers: dict[str, list[str]],
    correct: dict[str, list[bool]],
    seed: int = 0,
) -> list[SelectionItem]:
    """One right and two wrong candidates per question, shuffled.

    Where no expert was right, the right candidate states the gold answer.
    Where too few were wrong, a wrong candidate states another option letter,
    or another integer.
    """
    rng = random.Random(seed)
    items = []
    for q, (question, g) in enumerate(zip(questions, gold)):
        right = [answers[e][q] for e in answers if correct[e][q]]
        wrong = [answers[e][q] for e in answers if not correct[e][q]]
        good = rng.choice(right) if right else f"The answer is ({g})." if g in LETTERS else f"\\boxed{{{g}}}"
        bad = rng.sample(wrong, min(2, len(wrong)))
        while len(bad) < 2:
            bad.append(_wrong_answer(g, rng))
        candidates = [good, *bad]
        rng.shuffle(candidates)
        items.append(SelectionItem(question, candidates, g))
    return items


def _wrong_answer(gold: str, rng: random.Random) -> str:
    if gold in LETTERS:
        return f"The answer is ({rng.choice([c for c in LETTERS if c != gold])})."
    return f"\\boxed{{{int(gold) + rng.choice([-3, -1, 1, 2, 7]) if gold.lstrip('-').isdigit() else 0}}}"
