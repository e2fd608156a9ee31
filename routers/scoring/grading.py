"""Grading an answer against a gold answer, by a grader kind:

- ``mc``: the option letter the answer commits to (``routers.answers``) is the gold letter;
- ``numeric``: the answer's number equals the gold number (to 1e-6 relative);
- ``exact``: the normalised answer is the gold, or begins with it ("Yes, it is." for "yes");
- ``contains``: the gold appears in the normalised answer as whole words.

A gold answer may list alternatives separated by ``|`` ("8|eight"): any one will do. Without a grader kind, one
is inferred from the gold: a letter A-J is ``mc``, a number ``numeric``, anything else ``contains``. The
extraction is the one the live vote uses, so a graded answer and a vote agree on what an answer says.
"""

from __future__ import annotations

import math

from routers.answers import extract_choice, extract_number, normalise
from routers.vocabulary import Grader


def infer_grader(gold: str) -> Grader:
    gold = gold.strip()
    if len(gold) == 1 and gold.upper() in "ABCDEFGHIJ":
        return Grader.MC
    try:
        float(gold.replace(",", ""))
        return Grader.NUMERIC
    except ValueError:
        return Grader.CONTAINS


def grade(answer: str, gold: str, grader: Grader | None = None) -> bool:
    """Whether ``answer`` is right."""
    grader = grader or infer_grader(gold)
    alternatives = [g.strip() for g in gold.split("|") if g.strip()]
    if grader == Grader.MC:
        return extract_choice(answer) in {g.upper() for g in alternatives}
    if grader == Grader.NUMERIC:
        said = extract_number(answer)
        return said is not None and any(math.isclose(said, float(g.replace(",", "")), rel_tol=1e-6, abs_tol=1e-9)
                                        for g in alternatives)
    said = normalise(answer)
    wanted = [normalise(g) for g in alternatives]
    if grader == Grader.EXACT:
        return any(said == w or said.startswith(w + " ") for w in wanted if w)
    return any(f" {w} " in f" {said} " for w in wanted if w)
