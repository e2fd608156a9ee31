"""How a prompt becomes model input for a local model: its tokenizer's chat template, or plain text, then token ids
with the model's BOS exactly once.

Both local backends (transformers and vLLM) use this one rule, so the same prompt reaches the same token ids
whichever engine runs it, and their greedy answers can be compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from workers.backends import BackendUnsupported
from workers.config import LocalPrompting
from workers.types import Prompt

TemplateMode = Literal["auto", "always", "never"]


def load_tokenizer(folder: Path | str) -> object:
    """A local model's tokenizer, padding on the left (generation appends on the right), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def adds_bos(tokenizer: object) -> bool:
    """Whether the tokenizer's own encoding of a text begins with its BOS: measured, not read from a flag, because
    tokenizers say so in different places (a flag, a post-processor, a template)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    return full[:1] == [bos] and full[1 : 1 + len(plain)] == plain


class ChatFormat:
    def __init__(self, tokenizer: object, mode: TemplateMode, expert: str, plain: str = "{prompt}") -> None:
        """``plain``: how a query is written for a model without a chat template, ``{prompt}`` standing for it."""
        has = bool(getattr(tokenizer, "chat_template", None))
        if mode == "always" and not has:
            raise BackendUnsupported(f"{expert}: chat_template=always but the tokenizer has none")
        self.tokenizer = tokenizer
        self.uses_template = mode == "always" or (mode == "auto" and has)
        self.plain = plain
        self.bos: int | None = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        """The BOS every input starts with, for a model whose tokenizer adds one; None for the others."""

    @classmethod
    def of(cls, tokenizer: object, config: LocalPrompting, expert: str) -> ChatFormat:
        return cls(tokenizer, config.chat_template, expert, config.plain_prompt)

    def render(self, prompt: Prompt) -> str:
        if self.uses_template:
            return self.tokenizer.apply_chat_template(prompt.as_messages(), add_generation_prompt=True,
                                                      tokenize=False)
        if prompt.text is not None:
            return self.plain.replace("{prompt}", prompt.text)
        return prompt.as_plain_text()

    def token_ids(self, prompt: Prompt) -> list[int]:
        """The rendered text's ids with no special tokens added, then the BOS in front where the model needs one
        and the text (a chat template that writes it) does not already begin with it: exactly once. No EOS is
        added, whatever the tokenizer's flags: the model is to continue this text, not end it."""
        ids = self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"]
        if self.bos is not None and ids[:1] != [self.bos]:
            ids = [self.bos, *ids]
        return ids
