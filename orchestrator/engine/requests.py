"""What enters and leaves the scheduler: a query request, its answer, and its state while it is in flight.

The request queue holds ``InFlight`` items. The planner fills in their
decisions, the executor's results become their answers, and ``assembly``
turns a finished one into an ``Answer``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry.context import Context

from orchestrator.engine.token_stream import TokenStream
from orchestrator.tracing import carrier
from routers.answers import kind_of
from routers.base import Decision, RouteOptions
from routers.vocabulary import Aggregation, AnswerKind
from workers.errors import UserError
from workers.types import Message, Prompt, ToolCall


class RequestError(UserError, ValueError):
    """A request rejected before it queues: unknown aggregation or expert, empty query."""


class AllExpertsFailed(RuntimeError):
    """Every expert recruited for a request failed, and so did the re-route."""


class Overloaded(RuntimeError):
    """``max_pending`` requests are already admitted; the caller should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


USD_SLACK = 1e-9
"""A relative slack on USD comparisons with a limit: a sum of float prices that fits exactly still fits."""


@dataclass(frozen=True)
class Spend:
    """Tokens (prompt plus completion) and estimated USD."""

    tokens: float = 0.0
    usd: float = 0.0

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.tokens + other.tokens, self.usd + other.usd)

    def within(self, limit: Spend) -> bool:
        return self.tokens <= limit.tokens and self.usd <= limit.usd * (1 + USD_SLACK)


class Allowance(Protocol):
    """What a request may spend, drawn on call by call (``engine.ceiling``). ``take`` says whether a call that
    can cost up to ``most`` may run; once it says yes, that much is counted as committed. The API's budgets
    implement it with a reservation in the store (``api.tenants``); the engine knows nothing of that."""

    async def take(self, most: Spend) -> bool: ...


@dataclass
class QueryRequest:
    query: str
    """What is routed: the question, or a conversation's last user turn."""
    options: RouteOptions = field(default_factory=RouteOptions)
    aggregation: str = Aggregation.SYNTHESIZE
    experts: list[str] | None = None
    """An allow-list: only these experts may be recruited."""
    max_new_tokens: int | None = None
    temperature: float | None = None
    """Overrides; each expert's own generation defaults fill in the rest."""
    router: str | None = None
    """A router by name; None: the scheduler's default."""
    messages: tuple[Message, ...] = ()
    """A whole conversation for the experts; empty: they see ``query`` alone."""
    max_cost_usd: float | None = None
    """Most estimated cost: the costliest recruits are dropped until the estimate fits (one always stays)."""
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """More sampling overrides (OpenAI's ``top_p``, ``seed``, ``stop``), applied where the backend can."""
    stream: TokenStream | None = None
    """Where the answer's tokens go as they are written; None: the answer arrives whole."""
    category: str | None = None
    """The query's category where the caller knows it (a labelled set's); a category router routes by it."""
    answer_kind: AnswerKind | None = None
    """What the answers are compared by (a letter, a number, text); None: read from the query (``kind_of``)."""
    ref: str | None = None
    """The caller's id for the query (a labelled question's), passed to the experts with the prompt."""
    allowance: Allowance | None = None
    """What the request may spend, every call checked against it first (``engine.ceiling``); None: no limit."""
    tools: tuple[dict, ...] = ()
    """OpenAI function tools for the expert; the API sends such a request to one expert that supports tools."""
    tool_choice: str | dict | None = None
    trace: Context | None = None
    """The request's trace (OpenTelemetry): its window, routing and expert calls become spans in it."""

    @property
    def kind(self) -> AnswerKind:
        return self.answer_kind or kind_of(self.query)

    @property
    def prompt(self) -> Prompt:
        shared = {"ref": self.ref, "tools": self.tools, "tool_choice": self.tool_choice, "trace": carrier(self.trace)}
        if self.messages:
            return Prompt(messages=self.messages, **shared)
        return Prompt(text=self.query, **shared)


@dataclass
class ExpertAnswer:
    expert: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finished_at: float = 0.0
    """Unix time at which the expert's generation call returned (0: no call, a peer's latent read)."""
    seconds: float = 0.0
    """The generation call's own time, shared by the rows of its batch."""
    cost_usd: float | None = None
    """The call's cost where the backend reported it; None: the expert's price per token applies."""
    retries: int = 0
    """How many times a remote expert's call was tried again before it answered."""
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class Answer:
    text: str
    answers: list[ExpertAnswer]
    aggregation: str
    aggregator: str | None
    aggregation_skipped: str | None
    decision: Decision
    usage: dict[str, dict[str, int]]
    cost_usd: float
    timings: dict[str, float]
    degraded: list[str] = field(default_factory=list)
    cost_by_expert: dict[str, float] = field(default_factory=dict)
    """Estimated USD per expert that took part (the aggregator included); they sum to ``cost_usd``."""
    answered_by: str | None = None
    """The expert whose own answer is the text (best, a vote, a consensus, a single answer); None when an
    aggregator wrote it."""
    asked: list[str] = field(default_factory=list)
    """The experts that answered, every solve round and moa layer included, the aggregator not."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The functions the answering expert asked to call (a request with tools has one expert)."""


@dataclass
class InFlight:
    """One admitted request while its window runs."""

    request: QueryRequest
    future: asyncio.Future
    enqueued: float
    decision: Decision | None = None
    answers: list[ExpertAnswer] = field(default_factory=list)
    """The latest layer's answers: what gets aggregated."""
    spent: list[ExpertAnswer] = field(default_factory=list)
    """Every expert call of every layer, for usage and cost."""
    failed: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    streams_from: str | None = None
    """The expert whose row streams this request's text (``AGGREGATOR`` for the synthesis call); None: none."""

    def answered(self, answer: ExpertAnswer) -> None:
        self.answers.append(answer)
        self.spent.append(answer)

    def lost(self, expert: str, note: str) -> None:
        """An expert call of this request failed; ``note`` says how, for the answer's degraded notes."""
        self.failed.append(expert)
        self.degraded.append(note)
