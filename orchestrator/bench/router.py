"""``concilium bench router``: routing latency per query, by window size, expert count and skill count.

Profiles and skill vectors are synthetic: random counts and random unit
vectors. Search cost depends on the number and dimension of the vectors, not
on the skill names, so synthetic vectors make 100k-skill indexes cheap to
build. Queries are real MMLU-Pro questions.

Two variants run side by side on the same windows:
- cold: the window's questions and key phrases were never embedded. This is
  the cost for new traffic.
- warm: the same windows again, with every embedding cached. What remains is
  index search plus scoring, the routing machinery itself.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from routers.base import RouteOptions
from routers.embedding import DIM, Embedder
from routers.profiles import Profiles
from routers.skill_index import SkillIndex
from routers.symbolic import SkillRouter
from routers.vocabulary import Policy


@dataclass
class RouterFigures:
    experts: int
    skills: int
    index: str
    window: int
    cold_ms_per_query: float
    warm_ms_per_query: float


def synthetic_router(embedder: Embedder, n_experts: int, n_skills: int, seed: int = 0) -> SkillRouter:
    rng = np.random.default_rng(seed)
    seen = rng.integers(1, 40, size=(n_skills, 1)).repeat(n_experts, axis=1).astype(np.float64)
    right = np.floor(seen * rng.uniform(0.2, 0.9, size=(n_skills, n_experts)))
    profiles = Profiles(
        experts=[f"expert-{i}" for i in range(n_experts)],
        skills=[f"skill-{i}" for i in range(n_skills)],
        right=right, seen=seen, overall=rng.uniform(0.3, 0.7, n_experts),
    )
    vecs = rng.standard_normal((n_skills, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    router = SkillRouter(embedder)
    router._use(profiles, SkillIndex(profiles.skills, vecs))
    return router


def _per_query_ms(router: SkillRouter, windows: list[list[str]], options: RouteOptions) -> float:
    samples = []
    for window in windows:
        started = time.perf_counter()
        router.route(window, options)
        samples.append((time.perf_counter() - started) * 1000 / len(window))
    return statistics.median(samples)


def run_router_bench(
    embedder_factory: Callable[[], Embedder],
    questions: list[str],
    expert_counts: list[int],
    skill_counts: list[int],
    windows: list[int],
    repeats: int,
    progress: Callable[[str], None],
) -> list[RouterFigures]:
    results = []
    options = RouteOptions(k=3, policy=Policy.TOPK)
    for n_skills in skill_counts:
        for n_experts in expert_counts:
            progress(f"building a {n_skills}-skill index for {n_experts} experts")
            embedder = embedder_factory()
            router = synthetic_router(embedder, n_experts, n_skills)
            router.route(["warm-up question about chemistry"], options)
            offset = 0
            for size in windows:
                progress(f"{n_skills} skills, {n_experts} experts, window {size}")
                batch = []
                for _ in range(repeats):
                    batch.append(questions[offset : offset + size])
                    offset = (offset + size) % max(1, len(questions) - size)
                cold = _per_query_ms(router, batch, options)
                warm = _per_query_ms(router, batch, options)
                results.append(RouterFigures(n_experts, n_skills, router.index.kind, size, cold, warm))
    return results
