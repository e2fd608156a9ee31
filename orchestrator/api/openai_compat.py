"""OpenAI-compatible requests mapped onto Concilium queries, and the model list those requests name.

Kept apart from the service controller because it depends only on the names the service offers (its routers
and experts), not on the pipeline or the store.
"""

from __future__ import annotations

import dataclasses

from orchestrator.api.errors import InvalidRequest, NotFound
from orchestrator.api.schemas import (
    DEFAULT_MODEL,
    ChatBody,
    ChatMessage,
    CompletionBody,
    ModelCard,
    ModelList,
    OpenAIBody,
    QueryBody,
    Sampling,
)
from orchestrator.api.tools import ToolUse
from routers.vocabulary import Aggregation
from workers.types import Message, ToolCall


@dataclasses.dataclass(frozen=True)
class Catalog:
    """What an OpenAI ``model`` may name: ``concilium``, ``concilium/<router>``, or one expert."""

    routers: tuple[str, ...]
    experts: tuple[str, ...]

    def models(self) -> ModelList:
        ids = [DEFAULT_MODEL, *(f"{DEFAULT_MODEL}/{r}" for r in self.routers), *self.experts]
        return ModelList(data=[ModelCard(id=i) for i in ids])

    def chat_query(self, body: ChatBody) -> tuple[QueryBody, tuple[Message, ...]]:
        """The routed part of a chat (its last user turn) and the whole conversation for the experts."""
        user_turns = [m.content for m in body.messages if m.role == "user"]
        if not user_turns or not user_turns[-1].strip():
            raise InvalidRequest("messages: the last user message is missing or empty")
        query = self.query(body, user_turns[-1], body.max_completion_tokens or body.max_tokens)
        return query, tuple(_message(m) for m in body.messages)

    def completion_query(self, body: CompletionBody) -> QueryBody:
        """A completions request routes its prompt, and the experts see the prompt alone."""
        if not body.text.strip():
            raise InvalidRequest("prompt: the prompt is empty or only whitespace")
        return self.query(body, body.text, body.max_tokens)

    def query(self, body: OpenAIBody, text: str, max_tokens: int | None) -> QueryBody:
        """The query for an OpenAI request whose routed text is ``text``; naming one expert sends the request to
        that expert alone."""
        router, allow, k, aggregation = None, None, body.k, body.aggregation
        if body.model in self.experts:
            allow, k, aggregation = [body.model], 1, aggregation or Aggregation.BEST
        elif body.model.startswith(f"{DEFAULT_MODEL}/") and body.model.split("/", 1)[1] in self.routers:
            router = body.model.split("/", 1)[1]
        elif body.model != DEFAULT_MODEL:
            raise NotFound(f"model {body.model!r} does not exist; available: "
                           + ", ".join(m.id for m in self.models().data))
        fields = set(Sampling.model_fields) | (set(ToolUse.model_fields) if isinstance(body, ToolUse) else set())
        return QueryBody(query=text, router=router, k=k, aggregation=aggregation, experts=allow, max_tokens=max_tokens,
                         **body.model_dump(include=fields))


def _message(m: ChatMessage) -> Message:
    calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ())
    return Message(m.role, m.content or "", calls, m.tool_call_id)
