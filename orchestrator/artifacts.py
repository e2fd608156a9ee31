"""Profile artifacts: what ``concilium profile`` writes and what the service routes with.

A profile is a version folder under ``routing.profiles`` (``LATEST`` names the
newest). It holds every candidate router fitted on the profile's data (the
skill router's profiles and FAISS index, ``cluster.npz``, ``knn.npz``, ...),
and ``summary.json``: the source, the encoder the vectors live in, each
expert's accuracy and best skills, the aggregator ranking, and the selection:
every candidate's cross-validated accuracy and the one chosen. The service
serves every candidate by name, and ``auto``, its default, is the chosen one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.config import ConciliumConfig
from orchestrator.embedders import encoder
from routers.annotators import EmbeddingAnnotator
from routers.base import Router, RoutingError, TrainingSet
from routers.embedding import TextEncoder
from routers.profiles import ProfileError, Profiles, build_profiles, read_artifact
from routers.registry import make_router
from routers.selected import CANDIDATES, Selected
from routers.skill_index import SkillIndex
from routers.symbolic import SkillRouter
from routers.vocabulary import AUTO_ROUTER, Encoder

log = logging.getLogger(__name__)

SUMMARY = "summary.json"



def latest(root: Path) -> Path | None:
    """The newest profile folder, or None when there is none."""
    pointer = root / "LATEST"
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    folder = root / name
    if not name or not folder.is_dir():
        raise ProfileError(f"{pointer} names {folder}, which is not a folder: rebuild with `concilium profile`")
    return folder


def summary(folder: Path) -> dict[str, object]:
    """The profile's summary; a profile written before summaries existed holds the skill router alone."""
    if not (folder / SUMMARY).exists():
        return {}
    data = read_artifact(folder / SUMMARY, lambda p: json.loads(p.read_text()))
    if not isinstance(data, dict):
        raise ProfileError(f"{folder / SUMMARY} is not a JSON object: rebuild with `concilium profile`")
    return data


def save(data: TrainingSet, embedder: TextEncoder, encoder: str, out_dir: Path, source: dict[str, object],
         served: dict[str, object], keywords: list[list[str]] | None = None,
         aggregator_accuracy: dict[str, float] | None = None) -> tuple[Path, dict[str, object]]:
    """Fit every candidate router on all the questions and save them with the served configuration that
    selection chose (``orchestrator.evals.choose``); (folder, summary). ``auto`` serves that configuration's
    router."""
    if len(data.texts) == 0:
        raise RoutingError("the validation set is empty: nothing to profile")
    if data.vectors is None:
        data.vectors = embedder.encode(data.texts)
    folder = out_dir / time.strftime("%Y%m%d-%H%M%S")
    skill = _skill_router(data, embedder, keywords)
    skill.save(folder, "skill")
    for name in CANDIDATES:
        if name != "skill":
            router = make_router(name, embedder=embedder)
            router.fit(data)
            router.save(folder, name)
    result = _summarise(skill.profiles, skill.index, {**source, "n_questions": len(data.texts)},
                        aggregator_accuracy)
    scores = {c["name"]: c["cv_accuracy"] for c in served.get("candidates", [])}
    result.update(encoder=encoder, candidates=list(CANDIDATES), served=served,
                  selection={"chosen": served["router"], "scores": scores,
                             "rule": "auto serves the router of the served configuration; scores are every "
                                     "configuration's cross-validated accuracy"})
    (folder / SUMMARY).write_text(json.dumps(result, indent=2))
    (out_dir / "LATEST").write_text(folder.name + "\n")
    return folder, result


def _skill_router(data: TrainingSet, embedder: TextEncoder, keywords: list[list[str]] | None) -> SkillRouter:
    """The skill router over these outcomes; with given keywords (an LLM annotator's), over those skills."""
    router = SkillRouter(embedder)
    if keywords is None:
        keywords = EmbeddingAnnotator(embedder).annotate(data.texts, data.vectors)
    profiles = build_profiles(keywords, data.correct, data.experts, data.cost)
    router._use(profiles, SkillIndex(profiles.skills, embedder.encode(profiles.skills)))
    return router


def load(folder: Path, embedder: TextEncoder) -> tuple[dict[str, Router], str]:
    """Every router the profile holds, by name, and the name selection chose."""
    info = summary(folder)
    routers: dict[str, Router] = {}
    for name in info.get("candidates", ["skill"]):
        router = make_router(name, embedder=embedder)
        router.restore(folder, name)
        routers[name] = router
    return routers, str(info.get("selection", {}).get("chosen", "skill"))


def _summarise(profiles: Profiles, index: SkillIndex, source: dict[str, object],
               aggregator_accuracy: dict[str, float] | None) -> dict[str, object]:
    strength = profiles.global_strength()
    acc = profiles.smoothed_accuracy()
    seen_enough = profiles.seen[:, 0] >= 3
    top_skills = {}
    for j, expert in enumerate(profiles.experts):
        order = [i for i in np.argsort(-acc[:, j]) if seen_enough[i]][:5]
        top_skills[expert] = [profiles.skills[i] for i in order]
    if aggregator_accuracy:
        ranking = sorted(aggregator_accuracy, key=lambda e: -aggregator_accuracy[e])
        method = f"synthesis test: accuracy {aggregator_accuracy}"
    else:
        # Without a synthesis test, aggregators are ranked by answering accuracy alone.
        ranking = sorted(profiles.experts, key=lambda e: -profiles.overall[profiles.experts.index(e)])
        method = "overall accuracy (no synthesis test was run)"
    return {
        "source": source,
        "n_skills": len(profiles.skills),
        "index": index.kind,
        "experts": {
            e: {
                "accuracy": float(profiles.overall[j]),
                "global_strength": float(strength[j]),
                "mean_cost": None if profiles.cost is None else float(profiles.cost[j]),
                "best_skills": top_skills[e],
            }
            for j, e in enumerate(profiles.experts)
        },
        "aggregator_ranking": ranking,
        "aggregator_ranking_method": method,
    }


@dataclass
class ServedProfile:
    """What the service routes with, read once from the newest profile (or its absence)."""

    folder: Path | None
    routers: dict[str, Router]
    """By name, the default first: ``auto``, every candidate, ``all``; or ``all`` alone without a usable profile."""
    aggregators: tuple[str, ...]
    """Who synthesises, in order of preference (the first allowed one is taken); empty: the top-scored expert."""
    aggregator_source: str | None
    """Where that preference comes from; None: nothing names one."""
    served: dict[str, object] | None = None
    """The configuration selection chose for ``auto`` (router, k, aggregation, policy, λ) with its cross-validated
    accuracy beside the best single expert's; None without a profile for these experts."""


def served(config: ConciliumConfig, experts: list[str]) -> ServedProfile:
    """The routers and the aggregator preference of the newest profile in ``routing.profiles``; a missing,
    corrupt or mismatched file raises ProfileError with its name. Profiles for other experts are not used: then
    every expert answers, and the trace says why."""
    folder = latest(config.routing.profiles)
    info = summary(folder) if folder is not None else {}
    routers = _routers(config, experts, folder, info)
    served = info.get("served") if AUTO_ROUTER in routers else None
    return ServedProfile(folder, routers, *aggregators(config, folder, info), served)


def _routers(config: ConciliumConfig, experts: list[str], folder: Path | None, info: dict) -> dict[str, Router]:
    if folder is None:
        why = f"no profiles in {config.routing.profiles}: every expert answers (run `concilium profile`)"
        return {"all": make_router("all", experts=experts, fallback=why)}
    # The encoder the profile was built with (its vectors live in that space; profiles from before encoders were
    # recorded used MiniLM), with no disk cache: live queries are new text.
    routers, chosen = load(folder, encoder(str(info.get("encoder", Encoder.MINILM)), config.store_root))
    covered = routers["skill"].profiles.experts
    if sorted(covered) != sorted(experts):
        log.warning("profiles in %s cover %s, not the configured experts %s", folder, covered, experts)
        why = f"the profiles in {folder} are for other experts: every expert answers (run `concilium profile`)"
        return {"all": make_router("all", experts=experts, fallback=why)}
    why: dict[str, object] = {"profile": folder.name}
    if isinstance(info.get("served"), dict):  # the configuration, its CV accuracy, the best single expert's
        served = info["served"]
        why["served"] = {key: served.get(key) for key in ("name", "cv_accuracy", "best_single", "n_questions")}
    else:  # a profile written before whole configurations were selected: the router's own CV accuracy
        why["cv_accuracy"] = info.get("selection", {}).get("scores", {}).get(chosen)
    return {AUTO_ROUTER: Selected(routers[chosen], chosen, why), **routers, "all": make_router("all", experts=experts)}


def aggregators(config: ConciliumConfig, folder: Path | None, info: dict) -> tuple[tuple[str, ...], str | None]:
    """The configured aggregator, else the ranking stored with the profile, else none (the top-scored expert)."""
    if config.routing.aggregator is not None:
        return (config.routing.aggregator,), "fixed in config (routing.aggregator)"
    if folder is not None:
        configured = {e.name for e in config.experts}
        ranking = tuple(e for e in info.get("aggregator_ranking") or [] if e in configured)
        return ranking, f"profiles' aggregator ranking ({folder / SUMMARY})"
    return (), None
