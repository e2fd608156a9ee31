"""The scheduler's settings: the config's ``routing`` section as the engine reads it.

The defaults are the config's own, read from ``RoutingConfig``, so that a
default is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import RoutingConfig

_DEFAULTS = RoutingConfig()
TOP_SCORED = "router's top-scored expert"
"""Who synthesises when neither the config nor the profiles name an aggregator."""


@dataclass(frozen=True)
class SchedulerSettings:
    max_batch: int = _DEFAULTS.max_batch
    max_wait_ms: float = _DEFAULTS.max_wait_ms
    expert_timeout_s: float = _DEFAULTS.expert_timeout_s
    stall_timeout_s: float | None = _DEFAULTS.stall_timeout_s
    moa_layers: int = _DEFAULTS.moa_layers
    self_moa_temperature: float = _DEFAULTS.self_moa_temperature
    aggregators: tuple[str, ...] = ()
    """Aggregator preference: the first allowed one synthesises. Empty: the router's top-scored expert."""
    aggregator_source: str = TOP_SCORED
    max_pending: int = _DEFAULTS.max_pending
    """Admitted and unanswered requests at most: the queue is bounded, and a full one refuses."""

