"""How a prompt becomes model input for a local model: its tokenizer's chat template, or plain text.

Both local backends (transformers and vLLM) use this one rule, so the same prompt reaches the same token ids
whichever engine runs it, and their greedy answers can be compared.
"""

from __future__ import annotations

from typing import Literal

from workers.backends import BackendUnsupported
from workers.types import Prompt

TemplateMode = Literal["auto", "always", "never"]


class ChatFormat:
    def __init__(self, tokenizer: object, mode: TemplateMode, expert: str) -> None:
        has = bool(getattr(tokenizer, "chat_template", None))
        if mode == "always" and not has:
            raise BackendUnsupported(f"{expert}: chat_template=always but the tokenizer has none")
        self.tokenizer = tokenizer
        self.uses_template = mode == "always" or (mode == "auto" and has)

    def render(self, prompt: Prompt) -> str:
        if self.uses_template:
            return self.tokenizer.apply_chat_template(prompt.as_messages(), add_generation_prompt=True,
                                                      tokenize=False)
        return prompt.as_plain_text()

    @property
    def add_special_tokens(self) -> bool:
        """A rendered chat template already carries its special tokens."""
        return not self.uses_template

    def token_ids(self, prompt: Prompt) -> list[int]:
        return self.tokenizer(self.render(prompt), add_special_tokens=self.add_special_tokens)["input_ids"]
