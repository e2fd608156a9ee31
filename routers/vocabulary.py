"""The names every layer shares: aggregation strategies, routing policies and execution modes.

Each is a ``StrEnum``, defined here once. A member equals its plain string, so
config files, API bodies and CLI options stay plain words, and pydantic
validates them against the one list. This module imports nothing, because the
client SDK's schemas use it and must install with httpx and pydantic alone.
"""

from __future__ import annotations

from enum import StrEnum


class Aggregation(StrEnum):
    """How the recruited experts' answers become one."""

    SYNTHESIZE = "synthesize"
    """An aggregator LLM writes one answer from the candidates (skipped when they agree)."""
    VOTE = "vote"
    """The extracted answers vote, weighted by the router's scores; no call."""
    BEST = "best"
    """The top-scored expert's answer; no call."""
    MOA = "moa"
    """Layered Mixture-of-Agents: further proposer layers, then synthesis."""
    SELF_MOA = "self-moa"
    """k samples of the single best expert, synthesised by that expert."""


AGGREGATIONS: tuple[str, ...] = tuple(a.value for a in Aggregation)
SYNTHESISING: tuple[str, ...] = (Aggregation.SYNTHESIZE, Aggregation.MOA, Aggregation.SELF_MOA)
"""The strategies that end in an aggregator call."""
OFFLINE_AGGREGATIONS: tuple[str, ...] = (Aggregation.VOTE, Aggregation.BEST)
"""What recorded outcomes can score: a synthesis would need a live model."""


class Policy(StrEnum):
    """How a router turns per-expert scores into recruits."""

    SYMBOLIC = "symbolic"
    """The Symbolic-MoE paper's sampler: k draws with replacement, weighted by the scores."""
    TOPK = "topk"
    """The k best, without replacement."""
    COST = "cost"
    """The k best by score − λ·cost."""
    ADAPTIVE = "adaptive"
    """k per query: one more expert only where, on past queries like this one, its vote paid for its cost."""
    CASCADE = "cascade"
    """Cheap experts first; stronger ones only when the first answers disagree."""


POLICIES: tuple[str, ...] = tuple(p.value for p in Policy)


class Mode(StrEnum):
    """How a decision is executed."""

    ENSEMBLE = "ensemble"
    """The recruited experts answer separately, and their answers are aggregated."""
    LATENT = "latent"
    """The primary generates while cross-attending to its peers' prompt latents (one actor, one answer)."""


LATENT_ROUTER = "latent"
"""The name under which the latent mixture's router is served; it needs a trained checkpoint."""


class AnswerKind(StrEnum):
    """What an answer is compared by: the votes, the consensus skip and a cascade's agreement (``routers.answers``)."""

    LETTER = "letter"
    """An option letter: the question lists lettered options."""
    NUMBER = "number"
    """A number."""
    TEXT = "text"
    """Free text, compared as its normalised words."""


ANSWER_KINDS: tuple[str, ...] = tuple(k.value for k in AnswerKind)


class Grader(StrEnum):
    """How a labelled question's answer is graded against its gold answer (``routers.scoring.grading``)."""

    MC = "mc"
    """The option letter the answer commits to."""
    EXACT = "exact"
    """The normalised answer is the gold, or begins with it."""
    NUMERIC = "numeric"
    """The answer's number equals the gold number."""
    CONTAINS = "contains"
    """The gold appears in the answer as whole words."""


KIND_OF_GRADER: dict[Grader, AnswerKind] = {Grader.MC: AnswerKind.LETTER, Grader.NUMERIC: AnswerKind.NUMBER,
                                            Grader.EXACT: AnswerKind.TEXT, Grader.CONTAINS: AnswerKind.TEXT}
"""The kind of answer a grader reads: what the vote compares when that question is served."""


class Encoder(StrEnum):
    """What routers embed text with."""

    STATIC = "static"
    """A static embedding distilled from MiniLM: ~0.1 ms per query, cold."""
    MINILM = "minilm"
    """all-MiniLM-L6-v2 itself: a transformer pass per text."""

AUTO_ROUTER = "auto"
"""The router that selection chose on the profile's data (``routers.scoring.selection``); the default once a profile
exists."""
