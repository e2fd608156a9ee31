"""``concilium bench cache``: the semantic cache's threshold curve on labelled pairs, and its lookup time.

1. **The curve.** ``orchestrator/data/paraphrases.jsonl`` holds 315 pairs written for this project: 105 questions,
   each with a paraphrase (``same``) and two near misses (``near_miss``: one name, number, relation or question
   word changed, the case a cache must not serve). Each pair goes through the live code, ``SemanticCache``
   on an in-process store: the first query is answered and remembered in a shape of its own, then the second
   is looked up, with the guard, at a threshold near 0, so its similarity is what the live lookup sees (float16
   vectors from the store's log included). A hit at threshold t is a similarity of at least t. The cosine
   without the guard is reported beside it.
2. **Lookup time.** One shape filled with ``entries`` cached queries (random unit vectors, as many as a busy
   scope holds: the index's search does not depend on the text), plus the labelled questions answered for
   real; then lookups, alternately of a question that was answered (a hit) and of a near miss (a miss, or a
   guarded candidate), each timed whole: the embedding, the read of the store's log, the search, the entry.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.api.semantic_cache import Probe, SemanticCache
from orchestrator.api.store import MemoryStore, Store, open_store
from orchestrator.config import CacheConfig
from orchestrator.embedders import encoder
from routers.vocabulary import Encoder

PAIRS = Path(__file__).resolve().parents[1] / "data" / "paraphrases.jsonl"
MAX_FALSE = 0.01
"""The most false hits a default threshold may give on the near misses."""
THRESHOLDS = [round(0.80 + 0.01 * i, 2) for i in range(20)]
FOLDS = 5


@dataclass
class CurvePoint:
    threshold: float
    hit_rate: float
    """Paraphrases served from the cache."""
    false_rate: float
    """Near misses served from the cache: wrong answers."""
    false_rate_unguarded: float


@dataclass
class CacheReport:
    encoder: str
    pairs: int
    curve: list[CurvePoint]
    chosen: float | None
    """The least threshold with at most MAX_FALSE false hits; None if none has."""
    cv_hit_rate: float = 0.0
    cv_false_rate: float = 0.0
    """The same rule cross-validated by question (``_cross_validated``)."""
    entries: int = 0
    index_build_s: float = 0.0
    hit_ms: list[float] = field(default_factory=list)
    miss_ms: list[float] = field(default_factory=list)

    def p50(self, which: str) -> float:
        values = self.hit_ms if which == "hit" else self.miss_ms
        return statistics.median(values) if values else float("nan")


def load_pairs() -> list[dict]:
    return [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]


async def _similarities(cache: SemanticCache, pairs: list[dict]) -> list[float]:
    """Each pair's similarity as the live lookup finds it (0: the guard kept them apart)."""
    found = []
    for i, pair in enumerate(pairs):
        probe, _ = await cache.lookup(f"pair-{i}", pair["a"], None)
        await cache.remember(probe, f"a-{i}", "{}")
        _, hit = await cache.lookup(f"pair-{i}", pair["b"], None)
        found.append(hit.similarity if hit is not None else 0.0)
    return found


def curve(kind: Encoder, store_root: Path) -> CacheReport:
    pairs, embed = load_pairs(), encoder(kind, store_root)
    cache = SemanticCache(MemoryStore(), CacheConfig(semantic=True, encoder=kind, threshold=1e-6), embed, 3600)
    guarded = np.array(asyncio.run(_similarities(cache, pairs)))
    a, b = embed.encode([p["a"] for p in pairs]), embed.encode([p["b"] for p in pairs])
    cosine = (a * b).sum(axis=1)
    same = np.array([p["same"] for p in pairs])
    points = [CurvePoint(t, float(np.mean(guarded[same] >= t)), float(np.mean(guarded[~same] >= t)),
                         float(np.mean(cosine[~same] >= t))) for t in THRESHOLDS]
    chosen = next((p.threshold for p in points if p.false_rate <= MAX_FALSE), None)
    groups = np.array([p["group"] for p in pairs])
    return CacheReport(str(kind), len(pairs), points, chosen, *_cross_validated(guarded, same, groups))


def _cross_validated(similarity: np.ndarray, same: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """The rule (the least threshold with at most MAX_FALSE false hits) chosen on 4/5 of the questions and
    scored on the rest, 5 folds by question: (paraphrases served, near misses served) on unseen questions."""
    fold = groups % FOLDS
    served, wrong = [], []
    for k in range(FOLDS):
        train, test = fold != k, fold == k
        rates = [(t, np.mean(similarity[train & ~same] >= t)) for t in THRESHOLDS]
        t = next((t for t, rate in rates if rate <= MAX_FALSE), 1.0)
        served.extend(similarity[test & same] >= t)
        wrong.extend(similarity[test & ~same] >= t)
    return float(np.mean(served)), float(np.mean(wrong))


async def _filled(store: Store, report: CacheReport, kind: Encoder, store_root: Path, entries: int,
                  progress: Callable[[str], None]) -> tuple[SemanticCache, list[str], list[str]]:
    embed = encoder(kind, store_root)
    cache = SemanticCache(store, CacheConfig(semantic=True, encoder=kind, max_entries=entries + 1000), embed, 3600)
    rng = np.random.default_rng(0)
    for start in range(0, entries, 10_000):
        progress(f"filling the cache: {start:,} of {entries:,} entries")
        vectors = rng.standard_normal((min(10_000, entries - start), cache.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for j, v in enumerate(vectors):
            await cache.remember(Probe("bench", v, ((), (), ()), 1.0), f"filler-{start + j}", "{}")
    progress(f"building the index of {entries:,} entries")
    t0 = time.perf_counter()
    await cache.lookup("bench", "warm the index", None)  # the first lookup reads the whole log
    report.index_build_s = time.perf_counter() - t0
    pairs = load_pairs()
    asked = [p["a"] for p in pairs if p["same"]]
    for i, question in enumerate(asked):
        probe, _ = await cache.lookup("bench", question, None)
        await cache.remember(probe, f"asked-{i}", json.dumps({"q": question}))
    cache.encoder = encoder(kind, store_root)  # a new one: none of the timed queries' vectors at hand
    return cache, asked, [p["b"] for p in pairs if not p["same"]]


async def _timed(cache: SemanticCache, report: CacheReport, asked: list[str], near: list[str]) -> None:
    for question in [q for pair in zip(asked, near) for q in pair]:
        t0 = time.perf_counter()
        _, hit = await cache.lookup("bench", question, None)
        (report.hit_ms if hit else report.miss_ms).append((time.perf_counter() - t0) * 1000)


def lookup_time(report: CacheReport, kind: Encoder, store_root: Path, entries: int, redis_url: str | None,
                progress: Callable[[str], None]) -> None:
    async def run() -> None:
        store = open_store(redis_url)
        try:
            if redis_url:
                await store.delete_prefix("semcache:")
            cache, asked, near = await _filled(store, report, kind, store_root, entries, progress)
            progress("timing lookups")
            await _timed(cache, report, asked, near)
            if redis_url:
                await store.delete_prefix("semcache:")
        finally:
            await store.close()

    report.entries = entries
    asyncio.run(run())
