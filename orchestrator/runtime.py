"""Connecting to Ray: local Ray on loopback by default, or an existing cluster.

Local Ray otherwise takes this machine's external interface as its node
address. Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is first
imported, so entry points call :func:`pin_loopback` before anything imports ray,
and :func:`init_ray` verifies the result instead of trusting it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.config import ConciliumConfig, RayConfig

if TYPE_CHECKING:  # importing workers.pool imports ray, which must wait for pin_loopback()
    from workers.pool import ExpertPool

LOOPBACK = "127.0.0.1"


class RayConnectError(RuntimeError):
    """The configured Ray cluster cannot be reached, or local Ray left loopback."""


def pin_loopback() -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(config: RayConfig) -> None:
    if "ray" not in sys.modules:
        pin_loopback()
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, object] = {
        "namespace": config.namespace,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    if config.address is None:
        kwargs.update(
            _node_ip_address=LOOPBACK,
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
        if addresses != {LOOPBACK}:
            ray.shutdown()
            raise RayConnectError(
                f"local Ray bound to {sorted(addresses)}, not {LOOPBACK}: set "
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before anything imports ray"
            )


async def start_pool(config: ConciliumConfig, model_store: Path | None = None) -> ExpertPool:
    """Ray, then the configured experts' actors: the one way the CLI and the pipeline start a pool."""
    from workers.pool import ExpertPool

    init_ray(config.ray)
    return await ExpertPool.start(
        config.experts, config.pool, model_store or config.model_store, namespace=config.ray.namespace
    )
