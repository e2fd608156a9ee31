"""What crosses the worker boundary: prompts and settings in, texts with counts and timings out.

Plain dataclasses, so Ray pickles them cheaply and the worker layer needs no
pydantic. A worker knows nothing about routing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.errors import UserError

CHARS_PER_TOKEN = 4
"""Tokens estimated from characters where no tokenizer is at hand: the bench-data's rule, and the cost estimate's."""


class EmptyPromptError(UserError, ValueError):
    """A prompt with no text; generating from it is meaningless."""


@dataclass(frozen=True)
class ToolCall:
    """A function call an expert asked for, in OpenAI's terms: ``arguments`` is the JSON text the model wrote."""

    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict[str, object]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of the ``index``-th tool call as an expert streams it: its id and name come first, then its
    arguments in fragments (OpenAI's ``delta.tool_calls`` item)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def as_openai(self) -> dict[str, object]:
        function: dict[str, object] = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        piece: dict[str, object] = {"index": self.index, "function": function}
        if self.id is not None:
            piece.update(id=self.id, type="function")
        return piece


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    """An assistant turn's calls (its content may then be empty)."""
    tool_call_id: str | None = None
    """A ``tool`` turn's answer to this call."""

    def as_openai(self) -> dict[str, object]:
        message: dict[str, object] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [c.as_openai() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    @property
    def is_empty(self) -> bool:
        return not self.content.strip() and not self.tool_calls

    @property
    def is_tool_turn(self) -> bool:
        """A turn of a conversation with tools: an assistant's calls, or a tool's answer to one."""
        return self.role == "tool" or bool(self.tool_calls)


@dataclass(frozen=True)
class Prompt:
    """Either a plain text or a chat conversation; a backend decides how to render it."""

    text: str | None = None
    messages: tuple[Message, ...] = ()
    ref: str | None = None
    """The caller's id for what is asked (a labelled question's id): a replay expert answers that record; the
    other backends ignore it."""
    tools: tuple[dict, ...] = ()
    """OpenAI function tools the expert may call; only an expert that declares ``supports_tools`` is sent any."""
    tool_choice: str | dict | None = None
    """OpenAI's ``tool_choice`` ("auto", "required", "none" or one function), passed as it is."""
    trace: dict[str, str] | None = None
    """The W3C trace context of the request this row answers: the actor's span for it joins that trace."""

    def __post_init__(self) -> None:
        if self.text is None and not self.messages:
            raise EmptyPromptError("a prompt needs text or messages")
        if self.text is not None and not self.text.strip():
            raise EmptyPromptError("the prompt is empty")
        if self.messages and all(m.is_empty for m in self.messages):
            raise EmptyPromptError("every message in the conversation is empty")

    @classmethod
    def of(cls, value: str | Prompt) -> Prompt:
        return value if isinstance(value, Prompt) else cls(text=value)

    def as_messages(self) -> list[dict[str, object]]:
        if self.messages:
            return [m.as_openai() for m in self.messages]
        return [{"role": "user", "content": self.text or ""}]

    def as_plain_text(self) -> str:
        """The rendering for models without a chat template."""
        if self.text is not None:
            return self.text
        lines = [f"{m.role.capitalize()}: {m.content}" for m in self.messages]
        return "\n".join(lines) + "\nAssistant:"


@dataclass(frozen=True)
class Price:
    """USD per prompt (input) token and per generated (output) token: what one expert's calls cost."""

    input: float = 0.0
    output: float = 0.0

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return prompt_tokens * self.input + completion_tokens * self.output


FREE = Price()
"""The price of an expert the config gives none."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Generation ends at the first of these strings, which the text does not include (OpenAI's ``stop``)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


Piece = str | ToolCallDelta
"""What a streamed generation writes for a row: a piece of text, or a piece of a tool call."""


@dataclass(frozen=True)
class TokenDelta:
    """A piece of one row's answer, as a streamed generation writes it."""

    row: int
    text: Piece


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """'stop' (EOS or a stop string), 'length' (max_new_tokens), or 'cancelled' (the client went away)."""
    meta: dict[str, object] = field(default_factory=dict)
    """Backend-specific facts, e.g. a replayed record's id and score."""
    cost_usd: float | None = None
    """What the call cost, where the backend knows it (a replayed record's recorded cost); None: the expert's
    configured price per token applies."""
    error: str | None = None
    """Why this row failed, where its rows are independent requests (a remote server's): the others stand."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The functions the expert asked to call (``finish_reason`` 'tool_calls')."""


@dataclass
class GenerationResult:
    """One batched call's output, in the order of its prompts."""

    expert: str
    completions: list[Completion]
    queue_s: float = 0.0
    generate_s: float = 0.0
    batch_size: int = 0
    notes: list[str] = field(default_factory=list)
    """What went wrong on the way and was recovered, e.g. a restarted actor; the API reports these as degraded."""
    finished_at: float = 0.0
    """Wall-clock time (epoch seconds) when the call returned its last token: a streamed first token must come
    before it."""
    spans: list[dict] = field(default_factory=list)
    """The actor's spans for the call's traced rows (``workers.spans``)."""

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.completions)


@dataclass
class WorkerInfo:
    name: str
    backend: str
    source: str
    state: str
    """'unloaded', 'loading', 'loaded' or 'failed'."""
    device: str
    memory_bytes: int
    node_id: str = ""
    gpu_ids: list[str] = field(default_factory=list)
    pid: int = 0
    error: str | None = None
    load_s: float | None = None
    details: dict[str, object] = field(default_factory=dict)
