"""Skill annotators: name the skills (keywords) a query needs.

Two kinds:
- The LLM annotator of Symbolic-MoE. An annotator model is sampled several
  times, and a keyword is kept when enough samples agree. The model sits behind
  a plain callable, so this module knows nothing about Ray.
- An embedding annotator that needs no LLM. It takes candidate key phrases from
  the query and keeps those closest to the whole query in MiniLM space. This is
  KeyBERT's idea; written here because it is a dozen lines over the encoder
  the router already holds.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import numpy as np

from routers.embedding import TextEncoder

MAX_KEYWORD_CHARS = 20
ANNOTATION_PROMPT = (
    "Which core knowledge, subjects or skills does answering this question require? "
    "Reply with 2 to 5 comma-separated keywords after 'Keywords:'.\n\nQuestion: {question}\n\nKeywords:"
)

_STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having
    he her here hers him his how i if in into is it its itself just me more most my no nor not now of off on
    once only or other our out over own same she should so some such than that the their them then there
    these they this those through to too under until up very was we were what when where which while who whom
    why will with would you your yours following options answer question true false one two three select
    correct best statement statements given using used use let find value values number following among
    likely least option choose""".split()
)
_WORD = re.compile(r"[a-z][a-z\-']*[a-z]|[a-z]")


def parse_keywords(text: str) -> list[str]:
    """Keywords from one annotator reply, by the paper's rules.

    The text after the last 'Keywords:' (or the whole reply), split on commas,
    lower-cased and stripped. Keywords over 20 characters are dropped.
    """
    marker = text.lower().rfind("keywords:")
    body = text[marker + len("keywords:"):] if marker >= 0 else text
    body = body.split("\n\n")[0]
    out = []
    for raw in body.split(","):
        kw = raw.strip().strip(".;:\"'*").strip().lower()
        if kw and len(kw) <= MAX_KEYWORD_CHARS and kw not in out:
            out.append(kw)
    return out


def agreed_keywords(samples: list[list[str]], min_count: int = 2) -> list[str]:
    """Keywords named by at least ``min_count`` samples, most agreed first."""
    counts = Counter(kw for sample in samples for kw in set(sample))
    return [kw for kw, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]


class LLMAnnotator:
    """Symbolic-MoE's annotator: ``samples`` replies at ``temperature``, keywords kept by agreement.

    ``generate(prompts, temperature)`` returns one reply per prompt. The caller
    binds it to a real expert. An async caller uses :meth:`prompts` and
    :meth:`keywords` around its own generation call instead.
    """

    def __init__(
        self,
        generate: Callable[[list[str], float], list[str]] | None = None,
        samples: int = 5,
        temperature: float = 0.7,
        min_agree: int = 2,
    ) -> None:
        self.generate = generate
        self.samples = samples
        self.temperature = temperature
        self.min_agree = min_agree

    def prompts(self, queries: list[str]) -> list[str]:
        """Every query's annotation prompt, ``samples`` times over (sample-major)."""
        return [ANNOTATION_PROMPT.format(question=q) for q in queries] * self.samples

    def keywords(self, n_queries: int, replies: list[str]) -> list[list[str]]:
        """Reduce the replies to :meth:`prompts` to each query's agreed keywords."""
        return [
            agreed_keywords(
                [parse_keywords(replies[s * n_queries + i]) for s in range(self.samples)], self.min_agree
            )
            for i in range(n_queries)
        ]

    def annotate(self, queries: list[str]) -> list[list[str]]:
        if self.generate is None:
            raise RuntimeError("this annotator has no generate callable; use prompts() and keywords()")
        return self.keywords(len(queries), self.generate(self.prompts(queries), self.temperature))


def candidate_phrases(text: str, max_ngram: int = 2, limit: int = 24) -> list[str]:
    """Word n-grams that neither start nor end with a stopword, in order of first appearance."""
    words = _WORD.findall(text.lower())
    seen: dict[str, None] = {}
    for n in range(1, max_ngram + 1):
        for i in range(len(words) - n + 1):
            gram = words[i : i + n]
            if gram[0] in _STOPWORDS or gram[-1] in _STOPWORDS or len(gram[0]) < 3:
                continue
            phrase = " ".join(gram)
            if len(phrase) <= MAX_KEYWORD_CHARS:
                seen.setdefault(phrase)
            if len(seen) >= limit:
                return list(seen)
    return list(seen)


class EmbeddingAnnotator:
    """The candidate phrases most similar to the whole query, in one batched embedding pass."""

    def __init__(self, embedder: TextEncoder, top: int = 4, max_ngram: int = 2, candidates: int = 24) -> None:
        self.embedder = embedder
        self.top = top
        self.max_ngram = max_ngram
        self.candidates = candidates

    def annotate(self, queries: list[str], query_vecs: np.ndarray | None = None) -> list[list[str]]:
        cands = [candidate_phrases(q, self.max_ngram, self.candidates) for q in queries]
        if query_vecs is None:
            query_vecs = self.embedder.encode(queries)
        flat = [c for cs in cands for c in cs]
        vecs = self.embedder.encode(flat)
        out, start = [], 0
        for i, cs in enumerate(cands):
            block = vecs[start : start + len(cs)]
            start += len(cs)
            order = np.argsort(-(block @ query_vecs[i]))[: self.top]
            out.append([cs[j] for j in order])
        return out
