"""The plan types: what the planner hands the executor for one phase of a window.

Each is one batched call. Rows are indices into the window's live requests,
so the results can be handed back to the requests that asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.engine.requests import InFlight
from orchestrator.engine.token_stream import TokenStream
from workers.types import Prompt, SamplingParams


@dataclass
class ExpertWork:
    """One batched call to one expert: its rows share the sampling settings."""

    expert: str
    params: SamplingParams
    rows: list[int]
    prompts: list[str | Prompt]
    streams: dict[int, TokenStream] = field(default_factory=dict)
    """Position in this call → the request stream its row's tokens go to, as they are written."""


@dataclass
class LatentWork:
    """One call to the latent group: one primary, its requests, each with its own peers."""

    primary: str
    params: SamplingParams
    members: list[InFlight]

    @property
    def streams(self) -> dict[int, TokenStream]:
        return {i: p.request.stream for i, p in enumerate(self.members) if p.request.stream is not None}

    @property
    def peers(self) -> list[list[str]]:
        return [p.decision.experts[1:] for p in self.members]

    @property
    def prompts(self) -> list[str]:
        """The latent mixture reads the routed text itself, as in training: no chat template."""
        return [p.request.query for p in self.members]
