"""Grading free-text answers against gold answers, by the Symbolic-MoE task rules.

- Multiple choice: the last option letter the answer commits to. An explicit
  "answer is (X)" wins, then the last "(X)", then the last standalone capital
  A-J. The fallback skips the pronoun "I" when a lower-case word follows it.
- AIME: the last ``\\boxed{...}``, else the final integer in the text, compared
  as numbers.
"""

from __future__ import annotations

import re

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE)
_PAREN = re.compile(r"\(([A-J])\)")
_BARE = re.compile(r"(?<![A-Za-z])([A-J])(?![A-Za-z])(?!\s+[a-z])")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_INTEGER = re.compile(r"-?\d[\d,]*")


def extract_choice(text: str) -> str | None:
    for pattern in (_ANSWER_IS, _PAREN, _BARE):
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


def extract_integer(text: str) -> int | None:
    boxed = _BOXED.findall(text)
    candidates = _INTEGER.findall(boxed[-1]) if boxed else _INTEGER.findall(text)
    if not candidates:
        return None
    try:
        return int(candidates[-1].replace(",", ""))
    except ValueError:
        return None


def is_correct(answer: str, gold: str) -> bool:
    """Right when the extracted answer equals the gold one: a letter, or an integer for AIME."""
    gold = gold.strip()
    if gold.lstrip("-").isdigit():
        return extract_integer(answer) == int(gold)
    return extract_choice(answer) == gold.upper()
