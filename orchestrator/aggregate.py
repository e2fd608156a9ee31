"""Aggregation strategies, chosen per request.

- best: the top-scored expert's answer, with no call.
- vote: extract each answer (an option letter, else an integer, else the
  normalised text) and take a vote weighted by the router's scores, with no
  call.
- synthesize: an aggregator LLM reads the answers, quoted as data, and writes
  one better answer. The call is skipped when the extracted answers agree,
  and the trace says so.
- moa: layered Mixture-of-Agents. The recruited experts answer, then answer
  again for each further layer with the previous layer's answers as
  references; the last layer is synthesised.
- self-moa: k sampled answers from the single best expert, synthesised by
  that expert ("Rethinking Mixture-of-Agents").

The scheduler runs the extra proposer layers and samples; here the last
layer's answers are turned into one.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from routers.aggregation import synthesis_prompt
from routers.base import Decision
from routers.grading import extract_choice, extract_integer

AGGREGATIONS = ("synthesize", "vote", "best", "moa", "self-moa")
SYNTHESISING = ("synthesize", "moa", "self-moa")
_NON_WORD = re.compile(r"[^a-z0-9]+")


class _Answer(Protocol):
    expert: str
    text: str


@dataclass
class Aggregated:
    text: str
    aggregator: str | None
    skipped: str | None
    """Why no aggregator call was made; None when one was."""
    usage: dict[str, tuple[int, int]] = field(default_factory=dict)


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


def _best(answers: Sequence[_Answer], decision: Decision) -> _Answer:
    return max(answers, key=lambda a: decision.scores.get(a.expert, 0.0))


def aggregate_without_call(strategy: str, answers: Sequence[_Answer], decision: Decision) -> Aggregated | None:
    """The result when no aggregator call is needed, else None (synthesis without consensus)."""
    if strategy == "best" or len(answers) == 1:
        why = "strategy best" if strategy == "best" else "a single answer"
        return Aggregated(_best(answers, decision).text, None, why)
    keys = [extract(a.text) for a in answers]
    if strategy in SYNTHESISING:
        if None not in keys and len(set(keys)) == 1:
            return Aggregated(_best(answers, decision).text, None, f"consensus: every expert answered {keys[0]!r}")
        return None
    tally: dict[str, float] = defaultdict(float)
    for a, k in zip(answers, keys):
        if k is not None:
            tally[k] += max(decision.scores.get(a.expert, 0.0), 1e-9)
    if not tally:
        return Aggregated(_best(answers, decision).text, None, "vote: no answer could be extracted; best answer")
    winner = max(tally, key=lambda k: tally[k])
    voters = [a for a, k in zip(answers, keys) if k == winner]
    return Aggregated(_best(voters, decision).text, None, f"vote: {winner!r} with weight {tally[winner]:.3f}")


def synthesis_request(
    query: str, answers: Sequence[_Answer], decision: Decision, healthy: dict[str, bool]
) -> tuple[str, str]:
    """(aggregator, prompt): the router's aggregator if healthy, else the top-scored healthy expert."""
    aggregator = decision.aggregator
    if not aggregator or not healthy.get(aggregator, False):
        ranked = sorted(decision.scores, key=lambda e: -decision.scores[e])
        aggregator = next((e for e in ranked if healthy.get(e)), _best(answers, decision).expert)
    return aggregator, synthesis_prompt(query, [a.text for a in answers])
