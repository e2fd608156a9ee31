"""Where expert actors go: Ray resource requests, and a check before anything starts.

Ray would leave an actor that no node can host pending forever. Checking the
requests against the nodes first turns that silent hang into an error that
names the expert and the missing resource.
"""

from __future__ import annotations

import os

from workers.config import ExpertConfig
from workers.errors import UserError

ACTOR_PREFIX = "concilium-expert-"
ACTOR_CONCURRENCY = 4


class PlacementError(UserError, RuntimeError):
    """The configured experts cannot be placed on this cluster."""


def demand(expert: ExpertConfig) -> dict[str, float]:
    """The Ray resources one expert's actor holds for its lifetime."""
    need = {"CPU": expert.num_cpus, "GPU": expert.num_gpus, **expert.resources}
    return {k: v for k, v in need.items() if v > 0}


def actor_options(expert: ExpertConfig, namespace: str, detached: bool = False) -> dict[str, object]:
    """Ray options for the expert's actor.

    A remote expert's API key is forwarded from the driver's environment when
    set there: actors on a running cluster do not see variables set later.
    A detached actor outlives the process that started it, and whoever asks
    for it by name later gets the running one: that is how Serve ingress
    replicas share one set of experts.
    """
    options: dict[str, object] = {
        "name": ACTOR_PREFIX + expert.name,
        "namespace": namespace,
        "num_cpus": expert.num_cpus,
        "num_gpus": expert.num_gpus,
        "resources": dict(expert.resources),
        "max_restarts": expert.max_restarts,
        "max_task_retries": 0,
        "max_concurrency": ACTOR_CONCURRENCY,
    }
    if detached:
        options.update(lifetime="detached", get_if_exists=True)
    key_env = getattr(expert, "api_key_env", None)
    if key_env and key_env in os.environ:
        options["runtime_env"] = {"env_vars": {key_env: os.environ[key_env]}}
    return options


def check_placement(experts: list[ExpertConfig], nodes: list[dict[str, float]]) -> list[int]:
    """First-fit the experts onto the nodes' free resources; returns a node index per expert.

    Ray's own scheduler may choose differently; this only proves that some
    placement exists, largest GPU demand first, and otherwise names the expert
    that cannot fit and why.
    """
    free = [dict(n) for n in nodes]
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            totals[key] = totals.get(key, 0.0) + value
    placed = [-1] * len(experts)
    order = sorted(range(len(experts)), key=lambda i: -experts[i].num_gpus)
    for i in order:
        need = demand(experts[i])
        name = experts[i].name
        for key, amount in need.items():
            if totals.get(key, 0.0) == 0.0:
                raise PlacementError(
                    f"expert {name!r} needs resource {key!r}, which no node in the cluster offers"
                )
            if key != "CPU" and not any(node.get(key, 0.0) >= amount for node in nodes):
                raise PlacementError(
                    f"expert {name!r} needs {amount:g} {key} on one node; "
                    f"the largest node offers {max(n.get(key, 0.0) for n in nodes):g}"
                )
        for idx, node in enumerate(free):
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
                for k, v in need.items():
                    node[k] -= v
                placed[i] = idx
                break
        else:
            asked = ", ".join(f"{v:g} {k}" for k, v in need.items()) or "nothing"
            raise PlacementError(
                f"expert {name!r} (needs {asked}) does not fit: the experts together ask for more than "
                f"the cluster's {', '.join(f'{v:g} {k}' for k, v in sorted(totals.items()) if k in need)}"
            )
    return placed
