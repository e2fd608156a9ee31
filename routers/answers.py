"""An answer's comparable core: what the vote, the consensus skip and a cascade's agreement compare, live and
offline alike.

- Multiple choice: the last option letter the answer commits to. An explicit
  "answer is (X)" wins, then the last "(X)", then the last standalone capital
  A-J. The fallback skips the pronoun "I" when a lower-case word follows it.
- A number: the last ``\\boxed{...}``, else the final integer in the text.
- Otherwise the normalised text.
"""

from __future__ import annotations

import re

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE)
_PAREN = re.compile(r"\(([A-J])\)")
_BARE = re.compile(r"(?<![A-Za-z])([A-J])(?![A-Za-z])(?!\s+[a-z])")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_INTEGER = re.compile(r"-?\d[\d,]*")
_NON_WORD = re.compile(r"[^a-z0-9]+")


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


def extract(text: str) -> str | None:
    """The comparable core of an answer: an option letter, an integer, or the normalised text."""
    choice = extract_choice(text)
    if choice is not None:
        return choice
    number = extract_integer(text)
    if number is not None:
        return str(number)
    norm = _NON_WORD.sub(" ", text.lower()).strip()
    return norm or None
