"""Every router that can be built by name and fitted on recorded outcomes, in one literal table.

The CLI, the offline evaluator and the service pick a router by its name here.
The ``latent`` router is not in the table: it is built from a trained
checkpoint (``orchestrator.latent``), not fitted on outcomes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from routers.base import Router, RoutingError
from routers.baselines import AllExpertsRouter, BestSingleRouter, KnnRouter, PerCategoryRouter, RandomRouter
from routers.learned import QualityRouter
from routers.symbolic import PaperSkillRouter, SkillRouter

ROUTERS: dict[str, Callable[..., Router]] = {
    "cluster": partial(QualityRouter, model="cluster"),
    "logistic": partial(QualityRouter, model="logistic"),
    "irt": partial(QualityRouter, model="irt"),
    "skill": SkillRouter,
    "skill_paper": PaperSkillRouter,
    "knn": KnnRouter,
    "per_category": PerCategoryRouter,
    "best_single": BestSingleRouter,
    "random": RandomRouter,
    "all": AllExpertsRouter,
}


def make_router(name: str, **kwargs: object) -> Router:
    """A router by name; ``kwargs`` are its constructor's (the embedder, the experts of ``all``)."""
    try:
        factory = ROUTERS[name]
    except KeyError:
        raise RoutingError(f"unknown router {name!r}; available: {', '.join(ROUTERS)}") from None
    return factory(**kwargs)
