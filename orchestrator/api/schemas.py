"""The API's request and response models, shared by the server and the client SDK.

Only pydantic here: the SDK imports this module and must not pull in torch or
ray. Requests forbid unknown fields, so a typo is an error rather than a
silently ignored setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from routers.vocabulary import Aggregation, Mode, Policy

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


class QueryBody(RouteBody):
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    stream: bool = Field(False, description="server-sent events: answer text chunks, then the full response")


class ExpertAnswerOut(BaseModel):
    expert: str
    text: str
    prompt_tokens: int
    completion_tokens: int


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
    timings: dict[str, float]
    degraded: list[str] = []
    cached: bool = False


class RouteResponse(BaseModel):
    routing: Routing


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Request):
    """The OpenAI chat-completions request, with the fields Concilium honours and its own routing knobs."""

    model: str = DEFAULT_MODEL
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, object] | None = None
    seed: int | None = None
    user: str | None = None
    k: int | None = Field(None, ge=1)
    aggregation: Aggregation | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"] = "stop"


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    concilium: QueryResponse
    """Routing metadata; the official client keeps unknown fields, reachable as ``model_extra``."""


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


class ReloadOut(BaseModel):
    added: list[str]
    removed: list[str]
    changed: list[str]
    routers: list[str]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
