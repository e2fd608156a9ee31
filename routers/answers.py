"""An answer's comparable core: what the vote, the consensus skip and a cascade's agreement compare, live and
offline alike, by the kind of answer the question asks for.

- letter: the question lists lettered options. The last option letter the
  answer commits to: an explicit "answer is (X)" wins, then the last "(X)",
  then the last standalone capital A-J (the fallback skips the pronoun "I"
  when a lower-case word follows it).
- number: the last ``\\boxed{...}``, else the last number in the text (digits,
  or a number word up to twenty).
- text: the normalised text (lower case, words only). Two free-text answers
  count as one answer only when they say the same words.

A letter is never read out of a free-text answer: "Blue (B)" in a list of
colours is not option B of a question that has no options.
"""

from __future__ import annotations

import re

from routers.vocabulary import AnswerKind

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE)
_PAREN = re.compile(r"\(([A-J])\)")
_BARE = re.compile(r"(?<![A-Za-z])([A-J])(?![A-Za-z])(?!\s+[a-z])")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_NON_WORD = re.compile(r"[^a-z0-9]+")
_OPTION = re.compile(r"(?m)^\s*\(?([A-J])[).:]\s+\S")
_ARITHMETIC = re.compile(r"\d\s*(?:[-+*/×÷]|times|plus|minus|divided by)\s*\d", re.IGNORECASE)
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen twenty").split()


def kind_of(question: str) -> AnswerKind:
    """The kind of answer a question asks for, when nobody said: lettered options (two or more lines that start
    with "(A)", "A." or "A)") ask for a letter; an arithmetic expression or "how many" asks for a number; the
    rest for text."""
    if len(set(_OPTION.findall(question))) >= 2:
        return AnswerKind.LETTER
    if _ARITHMETIC.search(question) or question.strip().lower().startswith("how many"):
        return AnswerKind.NUMBER
    return AnswerKind.TEXT


def extract_choice(text: str) -> str | None:
    for pattern in (_ANSWER_IS, _PAREN, _BARE):
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


def extract_number(text: str) -> float | None:
    """The answer's number: the last boxed one, else the last one written in digits, else the last number word."""
    boxed = _BOXED.findall(text)
    found = _NUMBER.findall(boxed[-1] if boxed else text)
    if found:
        try:
            return float(found[-1].replace(",", ""))
        except ValueError:
            return None
    words = [w for w in normalise(text).split() if w in _WORDS]
    return float(_WORDS.index(words[-1])) if words else None


def normalise(text: str) -> str:
    """Lower case, words and digits only, single spaces."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def extract(text: str, kind: AnswerKind) -> str | None:
    """The comparable core of an answer of this kind; None when it has none (the voter then abstains)."""
    if kind == AnswerKind.LETTER:
        return extract_choice(text)
    if kind == AnswerKind.NUMBER:
        number = extract_number(text)
        return None if number is None else f"{number:g}"
    return normalise(text) or None
