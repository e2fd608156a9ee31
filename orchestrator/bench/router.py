"""``concilium bench router``: routing latency per query, by router, encoder, window, experts and skills.

Routers are fitted on synthetic outcomes: random skill counts and random unit
skill vectors for the skill router, random right-or-wrong for the cluster
router. Search and scoring cost depend on the number and width of the vectors,
not on the names or the outcomes, so synthetic data makes a 100k-skill index
cheap to build. Queries are real MMLU-Pro questions.

The variants run side by side on the same windows:
- skill router on MiniLM: today's path, a MiniLM pass for the question and each
  of its ~24 key phrases;
- skill router on the static embedding: the same router, with no transformer pass;
- cluster router on the static embedding: one lookup per query, then its clusters.

Each is timed cold (the window's texts never embedded: new traffic) and warm
(the same windows again: MiniLM's cache holds every vector, and what remains
is the routing machinery itself; the static encoder keeps no cache).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from routers.base import RouteOptions, Router, TrainingSet
from routers.embedding import TextEncoder
from routers.learned import QualityRouter
from routers.profiles import Profiles
from routers.skill_index import SkillIndex
from routers.symbolic import SkillRouter
from routers.vocabulary import Policy


@dataclass
class RouterFigures:
    router: str
    encoder: str
    experts: int
    skills: int | None
    index: str
    window: int
    cold_ms_per_query: float
    warm_ms_per_query: float


def synthetic_skill_router(embedder: TextEncoder, n_experts: int, n_skills: int, seed: int = 0) -> SkillRouter:
    rng = np.random.default_rng(seed)
    seen = rng.integers(1, 40, size=(n_skills, 1)).repeat(n_experts, axis=1).astype(np.float64)
    right = np.floor(seen * rng.uniform(0.2, 0.9, size=(n_skills, n_experts)))
    profiles = Profiles(
        experts=[f"expert-{i}" for i in range(n_experts)],
        skills=[f"skill-{i}" for i in range(n_skills)],
        right=right, seen=seen, overall=rng.uniform(0.3, 0.7, n_experts),
    )
    width = embedder.encode(["width"]).shape[1]
    vecs = rng.standard_normal((n_skills, width)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    router = SkillRouter(embedder)
    router._use(profiles, SkillIndex(profiles.skills, vecs))
    return router


def synthetic_cluster_router(embedder: TextEncoder, n_experts: int, texts: list[str], seed: int = 0) -> QualityRouter:
    rng = np.random.default_rng(seed)
    train = TrainingSet(texts=texts, correct=(rng.random((len(texts), n_experts)) < 0.5).astype(float),
                        experts=[f"expert-{i}" for i in range(n_experts)], categories=[None] * len(texts))
    router = QualityRouter(embedder, "cluster")
    router.fit(train)
    return router


def _per_query_ms(router: Router, windows: list[list[str]], options: RouteOptions) -> float:
    samples = []
    for window in windows:
        started = time.perf_counter()
        router.route(window, options)
        samples.append((time.perf_counter() - started) * 1000 / len(window))
    return statistics.median(samples)


def run_router_bench(
    encoders: dict[str, Callable[[], TextEncoder]],
    questions: list[str],
    expert_counts: list[int],
    skill_counts: list[int],
    windows: list[int],
    repeats: int,
    progress: Callable[[str], None],
) -> list[RouterFigures]:
    """``encoders`` by name; the first 512 questions fit the cluster routers, the rest are routed."""
    fit_texts, route_texts = questions[:512], questions[512:]
    options = RouteOptions(k=3, policy=Policy.TOPK)
    results = []
    for name, factory in encoders.items():
        for n_experts in expert_counts:
            variants: list[tuple[str, int | None, Router]] = []
            for n_skills in skill_counts:
                progress(f"{name}: a {n_skills}-skill index for {n_experts} experts")
                variants.append(("skill", n_skills, synthetic_skill_router(factory(), n_experts, n_skills)))
            progress(f"{name}: a cluster router for {n_experts} experts")
            variants.append(("cluster", None, synthetic_cluster_router(factory(), n_experts, fit_texts)))
            for kind, n_skills, router in variants:
                router.route(["warm-up question about chemistry"], options)
                index = router.index.kind if isinstance(router, SkillRouter) else "k-means"
                offset = 0
                for size in windows:
                    progress(f"{kind} on {name}, {n_experts} experts, window {size}")
                    batch = []
                    for _ in range(repeats):
                        batch.append(route_texts[offset: offset + size])
                        offset = (offset + size) % max(1, len(route_texts) - size)
                    cold = _per_query_ms(router, batch, options)
                    warm = _per_query_ms(router, batch, options)
                    results.append(RouterFigures(kind, name, n_experts, n_skills, index, size, cold, warm))
    return results
