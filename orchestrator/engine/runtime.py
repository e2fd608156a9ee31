"""Connecting to Ray: local Ray on loopback by default, or an existing cluster.

Local Ray otherwise takes this machine's external interface as its node
address. Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is first
imported, so entry points call :func:`prepare_ray_env` before anything imports ray,
and :func:`init_ray` verifies the result instead of trusting it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import env
from orchestrator.config import ConciliumConfig, RayConfig
from workers.errors import UserError

if TYPE_CHECKING:  # importing workers.pool imports ray, which must wait for prepare_ray_env()
    from workers.pool import ExpertPool



class RayConnectError(UserError, RuntimeError):
    """The configured Ray cluster cannot be reached, or local Ray left loopback."""


def prepare_ray_env() -> None:
    """The settings Ray reads once, at import: local Ray on loopback, and token authentication for clusters.

    Ray 2.60 clusters authenticate drivers by token, but a driver given an explicit address sends its token only
    in token mode. As Ray itself does for a local cluster it finds, use this machine's token ($RAY_AUTH_TOKEN or
    ~/.ray/auth_token) when there is one; $RAY_AUTH_MODE, when set, decides instead.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def init_ray(config: RayConfig) -> None:
    if "ray" not in sys.modules:
        prepare_ray_env()
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, object] = {
        "namespace": config.namespace,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    if config.address is None:
        # "local": a new local Ray of our own, even where `ray start` left a cluster on this machine, which a
        # bare ray.init() would join instead.
        kwargs.update(
            address="local",
            _node_ip_address=env.LOOPBACK,
            include_dashboard=False,
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            resources=config.resources or None,
        )
    else:
        kwargs["address"] = config.address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayConnectError(f"cannot connect to Ray at {config.address or 'local'}: {exc}") from None
    if config.address is None:
        addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
        if addresses != {env.LOOPBACK}:
            ray.shutdown()
            raise RayConnectError(
                f"local Ray bound to {sorted(addresses)}, not {env.LOOPBACK}: set "
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before anything imports ray"
            )


async def start_pool(config: ConciliumConfig, detached: bool = False) -> ExpertPool:
    """Ray, then the configured experts' actors: the one way the CLI and the pipeline start a pool."""
    from workers.pool import ExpertPool

    init_ray(config.ray)
    return await ExpertPool.start(config.experts, config.pool, config.store_root, namespace=config.ray.namespace,
                                  detached=detached)
