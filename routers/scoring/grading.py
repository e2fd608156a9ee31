"""Grading an answer against a gold answer, by the Symbolic-MoE task rules: an option letter, or an integer for
AIME, compared by the extraction the live vote uses (``routers.answers``)."""

from __future__ import annotations

from routers.answers import extract_choice, extract_integer


def is_correct(answer: str, gold: str) -> bool:
    """Right when the extracted answer equals the gold one: a letter, or an integer for AIME."""
    gold = gold.strip()
    if gold.lstrip("-").isdigit():
        return extract_integer(answer) == int(gold)
    return extract_choice(answer) == gold.upper()
