"""What the scheduler counts: windows, expert calls, batch sizes, loads, waits and its own overhead."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.types import GenerationResult


@dataclass
class SchedulerStats:
    windows: int = 0
    requests: int = 0
    rejected: int = 0
    """Requests refused because ``max_pending`` were already admitted."""
    expert_calls: int = 0
    generate_s: float = 0.0
    """The experts' own time inside calls, summed over calls (they may overlap in wall time)."""
    generated_tokens: int = 0
    """Completion tokens the calls generated, answered or cancelled rows alike: a cancel shows as tokens saved."""
    batch_sizes: list[int] = field(default_factory=list)
    loads_per_window: list[int] = field(default_factory=list)
    distinct_experts_per_window: list[int] = field(default_factory=list)
    queue_wait_s: list[float] = field(default_factory=list)
    overhead_s: list[float] = field(default_factory=list)
    """Per window and request: wall time minus the solve phase and the aggregation calls (routing,
    grouping and bookkeeping)."""

    def call(self, result: GenerationResult) -> None:
        """Count one expert call that returned."""
        self.expert_calls += 1
        self.generate_s += result.generate_s
        self.generated_tokens += sum(c.completion_tokens for c in result.completions)
        self.batch_sizes.append(len(result.completions))
