"""The API's request and response models, shared by the server and the client SDK.

Only pydantic here: the SDK imports this module and must not pull in torch or
ray. Requests forbid unknown fields, so a typo is an error rather than a
silently ignored setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.api.tools import ToolCallOut, ToolUse
from routers.vocabulary import Aggregation, AnswerKind, Mode, Policy

DEFAULT_MODEL = "concilium"
"""The chat model that routes with the service's default router; ``concilium/<router>`` picks a router."""
JobStatus = Literal["queued", "running", "done", "failed"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RouteBody(_Request):
    """What to route; ``/v1/route`` explains the decision without generating anything."""

    query: str = Field(min_length=1)
    router: str | None = Field(None, description="a router by name; default: the service's router")
    k: int | None = Field(None, ge=1, description="experts to recruit")
    policy: Policy | None = None
    aggregation: Aggregation | None = None
    experts: list[str] | None = Field(None, min_length=1, description="an allow-list of expert names")
    budget: float | None = Field(None, ge=0.0, description="most estimated USD to spend on the query")
    cost_lambda: float | None = Field(None, ge=0.0, alias="lambda", description="accuracy − λ·cost routing")
    max_tokens: int | None = Field(None, ge=1)
    category: str | None = Field(None, max_length=200, description="the query's category, where the caller knows "
                                 "it: a category router routes by it instead of guessing")
    answer_kind: AnswerKind | None = Field(None, description="what the experts' answers are compared by when they "
                                           "vote or agree (letter, number, text); default: read from the query")


def _stops(value: str | list[str] | None) -> tuple[str, ...]:
    """OpenAI's ``stop``: one string or up to four."""
    if value is None:
        return ()
    stops = (value,) if isinstance(value, str) else tuple(value)
    if len(stops) > MAX_STOPS or not all(stops):
        raise ValueError(f"give at most {MAX_STOPS} non-empty stop strings")
    return stops


MAX_STOPS = 4


class Sampling(_Request):
    """The sampling overrides every generating endpoint takes; each applies where the expert's backend can."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] = Field((), description="one string or up to four: the text ends before the first")
    stream: bool = Field(False, description="server-sent events: the plan, text as it is written, the response")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> tuple[str, ...]:
        return _stops(value)


class QueryBody(RouteBody, Sampling, ToolUse):
    """``/v1/query``: route, answer, and the whole trace."""


class ExpertAnswerOut(BaseModel):
    expert: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finished_at: float = 0.0
    """Unix time at which the expert's generation call returned: a streamed answer's first tokens left before."""
    seconds: float = 0.0
    """The generation call's own time, shared by the rows of its batch."""
    retries: int = 0
    """How many times a remote expert's call was tried again (a 429, a 5xx, a lost connection) before it answered."""


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Routing(BaseModel):
    router: str
    mode: Mode = Mode.ENSEMBLE
    """ensemble: the experts answered and an aggregator merged; latent: the primary read its peers' latents."""
    experts: list[str]
    scores: dict[str, float]
    aggregator: str | None
    skills: list[str] = []
    fallback: str | None = None
    trace: dict[str, object] = {}


class CacheInfo(BaseModel):
    """Where a cached answer came from: the exact cache (the same request), or the semantic one (a query close
    enough in meaning, at this cosine similarity)."""

    hit: Literal["exact", "semantic"]
    of: str
    """The id of the answer it was cached from."""
    similarity: float | None = None


class CacheCleared(BaseModel):
    cleared: int
    """Store keys deleted: exact entries, semantic entries and their logs."""


class QueryResponse(BaseModel):
    id: str
    answer: str
    answers: list[ExpertAnswerOut]
    aggregation: str
    aggregator: str | None
    aggregation_skipped: str | None
    routing: Routing
    usage: dict[str, Usage]
    total_usage: Usage
    cost_usd: float
    cost_by_expert: dict[str, float] = {}
    """Estimated USD per expert that took part, the aggregator included."""
    timings: dict[str, float]
    degraded: list[str] = []
    cached: bool = False
    cache: CacheInfo | None = None
    tool_calls: list[ToolCallOut] = []
    """The functions the answering expert asked to call (a request with ``tools``)."""


class RouteResponse(BaseModel):
    routing: Routing


class ChatMessage(BaseModel):
    """A turn. ``content`` may be OpenAI's list of parts: the text parts are joined; any other part is refused,
    because the experts read text."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    """Required, except in an assistant turn that made tool calls."""
    tool_calls: list[ToolCallOut] | None = None
    tool_call_id: str | None = None
    """A ``tool`` turn's: the call it answers."""
    name: str | None = None
    """Accepted, as OpenAI accepts it; the experts do not see it."""

    @model_validator(mode="after")
    def _turn(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs its content")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id belongs to a tool message, and a tool message needs one")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message makes tool calls")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {j} is of type {kind!r}: only text parts are supported, the experts read "
                                 "text")
            texts.append(part["text"])
        return "\n".join(texts)


class StreamOptions(_Request):
    include_usage: bool = False
    """Send one more chunk before ``[DONE]``, with the usage and no choices, as OpenAI does."""


class OpenAIBody(Sampling):
    """What the OpenAI chat and completions requests share. ``n`` must be 1; ``user`` is accepted and logged
    nowhere. The fields Concilium does not support yet are refused by name rather than ignored."""

    model: str = DEFAULT_MODEL
    max_tokens: int | None = Field(None, ge=1)
    n: Literal[1] = 1
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: Any = None
    response_format: Any = None
    k: int | None = Field(None, ge=1)
    aggregation: Aggregation | None = None

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: object) -> object:
        if value not in (None, False, 0):
            raise ValueError("log-probabilities are not supported yet")
        return value

    @field_validator("response_format")
    @classmethod
    def _format(cls, value: object) -> object:
        if value is not None and not (isinstance(value, dict) and value.get("type") == "text"):
            raise ValueError("only the text response format is supported yet")
        return value


class ChatBody(OpenAIBody, ToolUse):
    """The OpenAI chat-completions request, with the fields Concilium honours and its own routing knobs."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(OpenAIBody):
    """The OpenAI (legacy) completions request: a prompt, routed like a chat's last user turn."""

    prompt: str | list[str]
    echo: Literal[False] = False
    suffix: None = None
    tools: Any = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: object) -> object:
        if value not in (None, []):
            raise ValueError("tools need the chat endpoint, /v1/chat/completions")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("give one prompt: a batch of prompts is a batch of requests")
        return value

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length", "tool_calls"] = "stop"


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    concilium: QueryResponse
    """Routing metadata; the official client keeps unknown fields, reachable as ``model_extra``."""


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] = "stop"
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    concilium: QueryResponse


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = DEFAULT_MODEL


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ExpertOut(BaseModel):
    name: str
    backend: str
    source: str
    state: str
    device: str
    memory_bytes: int
    in_flight: int = 0
    """Calls holding the expert right now: its current load."""
    node_id: str | None = None
    pid: int | None = None
    """The actor's process id on its node, for an operator's tools (``concilium bench chaos`` stalls one)."""
    load_s: float | None = None
    """Seconds its last model load took."""
    error: str | None = None


class JobOut(BaseModel):
    id: str
    status: JobStatus
    created: float
    finished: float | None = None
    result: QueryResponse | None = None
    error: str | None = None


class FeedbackBody(_Request):
    answer_id: str = Field(min_length=1)
    correct: bool | None = None
    rating: float | None = Field(None, ge=0.0, le=1.0, description="1 is best; counted as the share correct")
    expert: str | None = Field(None, description="rate one expert's answer; default: every expert that answered")


class FeedbackOut(BaseModel):
    answer_id: str
    experts: list[str]
    profile_updated: bool
    profiles_version: int
    evicted: str | None = None
    """The answer this feedback took out of the caches (it marked it wrong): the one a cache hit came from."""


class ReloadOut(BaseModel):
    added: list[str]
    removed: list[str]
    changed: list[str]
    routers: list[str]


class KeyUsage(BaseModel):
    """One key's usage on one UTC day, with the limits in force for it and what remains of them."""

    key_id: str = Field(description="the first 16 hex characters of the key's SHA-256; `anonymous` without keys")
    day: str = Field(description="the UTC day counted, YYYY-MM-DD")
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float = Field(description="estimated from the experts' configured prices")
    reserved_tokens: int = Field(0, description="held by requests running now: the most they can still spend")
    reserved_usd: float = 0.0
    tokens_per_day: int | None = Field(description="the limit in force; None: unlimited")
    usd_per_day: float | None
    remaining_tokens: int | None = Field(description="the limit less what is spent and what is reserved")
    remaining_usd: float | None
    resets_in_s: int = Field(description="seconds until the window ends (UTC midnight)")


class Remaining(BaseModel):
    tokens: int | None
    usd: float | None


class ErrorDetail(BaseModel):
    type: str
    message: str
    remaining: Remaining | None = Field(None, description="429 budget_exceeded only: what is left today (nothing)")


class ErrorBody(BaseModel):
    error: ErrorDetail
