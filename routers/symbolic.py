"""The skill-based router of Symbolic-MoE, with the paper's sampler and two deterministic policies.

- symbolic (the paper's rules): each keyword maps to its single nearest profile
  skill. local_m is the sum of expert m's raw profile values over those skills.
  Candidates are the experts with local_m > 0; with none, every local is shifted
  by −min + 1. Weights are local_m × global_m, and k experts are drawn with
  replacement.
- topk / cost: soft mapping instead. Each keyword takes its top-m skills,
  weighted by similarity. An expert's expected accuracy is the weighted mean of
  its smoothed per-skill accuracies. topk takes the k best. cost takes the k
  best by accuracy − λ·cost.

A query with no keywords falls back to the experts' overall accuracy (topk,
cost) or to a uniform draw (symbolic, as in the paper), and the decision names
the fallback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routers.annotators import EmbeddingAnnotator
from routers.base import Decision, RouteOptions, Router, TrainingSet, pick
from routers.embedding import TextEncoder
from routers.profiles import Profiles, build_profiles
from routers.skill_index import Mapping, SkillIndex
from routers.vocabulary import Policy


class SkillRouter(Router):
    def __init__(
        self,
        embedder: TextEncoder,
        annotator: object | None = None,
        top_m: int = 8,
        prior: float = 4.0,
        temperature: float = 0.5,
        sharpness: float = 4.0,
        soft: bool = True,
    ) -> None:
        self.embedder = embedder
        self.annotator = annotator or EmbeddingAnnotator(embedder)
        self.top_m = top_m
        self.prior = prior
        self.temperature = temperature
        self.sharpness = sharpness
        self.soft = soft
        self.profiles: Profiles | None = None
        self.index: SkillIndex | None = None

    @classmethod
    def from_artifacts(cls, folder: Path, embedder: TextEncoder, **kwargs: object) -> SkillRouter:
        """A router over profiles and an index saved by ``concilium profile``."""
        router = cls(embedder, **kwargs)
        router.restore(folder, "skill")
        return router

    def save(self, folder: Path, name: str) -> None:
        """The profiles and the FAISS skill index, in their own files (``profiles.*``, ``skills.faiss``)."""
        self.profiles.save(folder)
        self.index.save(folder)

    def restore(self, folder: Path, name: str) -> None:
        self._use(Profiles.load(folder), SkillIndex.load(folder))

    def _use(self, profiles: Profiles, index: SkillIndex) -> None:
        self.profiles, self.index = profiles, index
        self._accuracy = profiles.smoothed_accuracy(self.prior)
        self._global = profiles.global_strength(self.temperature)

    def _annotate(self, texts: list[str], vectors: np.ndarray | None) -> list[list[str]]:
        if isinstance(self.annotator, EmbeddingAnnotator):
            return self.annotator.annotate(texts, vectors)
        return self.annotator.annotate(texts)

    def fit(self, train: TrainingSet) -> None:
        keywords = self._annotate(train.texts, train.vectors)
        profiles = build_profiles(keywords, train.correct, train.experts, train.cost)
        self._use(profiles, SkillIndex(profiles.skills, self.embedder.encode(profiles.skills)))

    def _expected_accuracy(self, mapping: Mapping) -> np.ndarray:
        ids, sims = mapping.skill_ids.ravel(), mapping.sims.ravel()
        keep = ids >= 0
        weights = np.power(np.clip(sims[keep], 0, None), self.sharpness)
        if weights.sum() <= 0:
            return self.profiles.overall.copy()
        return weights @ self._accuracy[ids[keep]] / weights.sum()

    def _paper_weights(self, mapping: Mapping) -> np.ndarray:
        top1 = mapping.skill_ids[:, 0]
        local = self.profiles.score[top1[top1 >= 0]].sum(axis=0).astype(np.float64)
        if not (local > 0).any():
            local = local - local.min() + 1
        local = np.where(local > 0, local, 0.0)
        return local * self._global

    def route(self, texts: list[str], options: RouteOptions, vectors: np.ndarray | None = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        if self.profiles is None:
            raise RuntimeError("the skill router has no profiles: call fit() first")
        experts = self.profiles.experts
        keywords = self._annotate(texts, vectors)
        flat = [kw for kws in keywords for kw in kws]
        mappings = self.index.map_window(keywords, self.embedder.encode(flat), self.top_m)
        rng = np.random.default_rng(options.seed)
        decisions = []
        for mapping in mappings:
            fallback = None
            if not mapping.keywords:
                fallback = "no skills found: " + (
                    "uniform random draw" if options.policy == Policy.SYMBOLIC else "overall accuracy"
                )
                scores = np.ones(len(experts)) if options.policy == Policy.SYMBOLIC else self.profiles.overall
            elif options.policy == Policy.SYMBOLIC or not self.soft:
                scores = self._paper_weights(mapping)
            else:
                scores = self._expected_accuracy(mapping)
            chosen = pick(scores, options, self.profiles.cost, rng)
            order = np.argsort(-scores, kind="stable")
            decisions.append(
                Decision(
                    experts=[experts[i] for i in chosen],
                    scores={experts[i]: float(scores[i]) for i in range(len(experts))},
                    aggregator=experts[int(order[0])],
                    skills=list(mapping.keywords),
                    fallback=fallback,
                    trace={
                        "mapped": {
                            kw: [
                                (self.profiles.skills[j], round(float(s), 3))
                                for j, s in zip(mapping.skill_ids[i], mapping.sims[i]) if j >= 0
                            ][:3]
                            for i, kw in enumerate(mapping.keywords)
                        },
                    },
                )
            )
        return decisions

    def learn(self, decision: Decision, expert: str, correct: float) -> bool:
        """Online profile update from feedback, in the spirit of MixLLM's continual learning.

        The query's mapped skills (top match per keyword, from the decision's
        trace) count one more answer by ``expert``, ``correct`` of it right.
        False when there is nothing to update: an unknown expert or no skills.
        """
        mapped = decision.trace.get("mapped") or {}
        skills = {pairs[0][0] for pairs in mapped.values() if pairs}
        p = self.profiles
        if p is None or expert not in p.experts or not skills:
            return False
        j = p.experts.index(expert)
        rows = [p.skills.index(s) for s in skills if s in p.skills]
        p.right, p.seen = p.right.astype(np.float64), p.seen.astype(np.float64)
        p.seen[rows, j] += 1.0
        p.right[rows, j] += correct
        self._use(p, self.index)
        return bool(rows)


class PaperSkillRouter(SkillRouter):
    """The paper's scoring for every policy: top-1 mapping, raw ±1 counts × global strength.

    For ablation against the soft, smoothed default: with ``topk`` it picks
    deterministically by the paper's weights instead of sampling.
    """

    def __init__(self, embedder: TextEncoder, **kwargs: object) -> None:
        super().__init__(embedder, soft=False, **kwargs)
