"""Function tools in OpenAI's shape: what a request offers, what it forces, and the calls an answer makes.

Only pydantic, as in ``schemas``, which the SDK imports. A request with tools is answered by one expert that
declares ``supports_tools`` (the service picks it; see ``Service.to_request``): the tools, the choice and the
tool turns of the conversation go to that expert as they came, and its calls come back unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME = r"^[a-zA-Z0-9_-]{1,64}$"
"""OpenAI's rule for a function's name."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionDef(BaseModel):
    """A function an expert may call. Fields beyond these (``strict``) pass through to the expert."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str = Field(pattern=NAME)


class NamedToolChoice(_Strict):
    """Force a call of this one function."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """The arguments as the model wrote them: JSON text, not checked against the schema."""


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolUse(BaseModel):
    """The tool fields a generating request takes. ``tool_choice: none`` or no tools: an ordinary request."""

    tools: list[ToolDef] | None = Field(None, description="functions the answering expert may call")
    tool_choice: ToolChoice | None = Field(None, description="none, auto (default), required, or one function")

    @model_validator(mode="after")
    def _choice_names_a_tool(self) -> ToolUse:
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the "
                                 f"tools ({', '.join(names) or 'none given'})")
        return self

    def tool_payload(self) -> tuple[tuple[dict, ...], str | dict | None]:
        """The tools and the choice as the expert receives them (OpenAI's JSON); none when none are offered."""
        if not self.tools or self.tool_choice == "none":
            return (), None
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, BaseModel) else self.tool_choice
        return tuple(t.model_dump(exclude_none=True) for t in self.tools or ()), choice
