"""Every bundled LLM answers sensibly: the real models from the store, greedy, through the backend that serves them.

Greedy text of tiny models differs between CPUs (SIMD paths change the last bits of a logit), so these tests
assert only what a correct model gives with a wide margin on any CPU: the capital of France is Paris, a prompt is
not answered by an immediate end of text, and the model's input begins with its BOS exactly when its own tokenizer
metadata says it must. A model fed without the BOS it was trained with fails all three (Gemma then answers
"??????" or nothing at all).
"""

from __future__ import annotations

import json

import pytest
from gguf import GGUFReader

from tests.conftest import STORE_ROOT
from workers.backends.templates import ChatFormat, load_tokenizer
from workers.backends.transformers_backend import TransformersBackend
from workers.config import TransformersExpert
from workers.model_store import BUNDLED, LLMS, MANIFEST
from workers.types import Prompt, SamplingParams

pytestmark = pytest.mark.models

VARIED = [
    "Name three primary colors.",
    "Write one sentence about the sea, with a lot of detail about the waves and the light.",
    "Translate 'good morning' into French.",
    "What is 2 + 2?",
    "Who wrote Romeo and Juliet?",
]


@pytest.fixture(scope="module", params=LLMS)
def backend(request, store) -> TransformersBackend:
    b = TransformersBackend(TransformersExpert(name=request.param, source=request.param, threads=2), STORE_ROOT)
    b.load()
    yield b
    b.unload()


def _source_adds_bos(name: str) -> bool:
    """What the model's own GGUF says, read here independently of the store's conversion."""
    gguf = BUNDLED[name].gguf(STORE_ROOT.parent / "gguf")
    field = GGUFReader(gguf).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def test_a_factual_question_is_answered(backend):
    [answer] = backend.generate([Prompt("What is the capital of France?")], SamplingParams(max_new_tokens=24))
    assert "paris" in answer.text.lower(), answer.text


def test_no_prompt_gets_an_empty_completion(backend):
    answers = backend.generate([Prompt(p) for p in VARIED], SamplingParams(max_new_tokens=16))
    assert all(a.text.strip() for a in answers), [a.text for a in answers]


def test_the_input_begins_with_bos_exactly_when_the_model_needs_one(backend):
    name = backend.config.source
    needs = _source_adds_bos(name)
    bos = backend.tokenizer.bos_token_id
    for text in ["What is the capital of France?", *VARIED]:
        ids = backend.format.token_ids(Prompt(text))
        if needs:  # once, at the start
            assert ids[0] == bos and ids[1] != bos, ids[:4]
        elif not backend.format.uses_template:  # a template may write the BOS token as its own first marker
            assert ids[0] != bos, ids[:4]
    [answer] = backend.generate([Prompt(VARIED[0])], SamplingParams(max_new_tokens=2))
    assert answer.prompt_tokens == len(backend.format.token_ids(Prompt(VARIED[0])))
    manifest = json.loads((STORE_ROOT / name / MANIFEST).read_text())
    assert manifest["tokenizer"]["add_bos_token"] is needs  # a wrong conversion shows in the store


def test_a_chat_template_that_writes_the_bos_still_gets_it_once(store):
    """Gemma's instruction-tuned template begins with ``{{ bos_token }}``: the rule must not add a second."""
    tok = load_tokenizer(store.path("gemma3-270m"))
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                         "<end_of_turn>\n{% endfor %}<start_of_turn>model\n")
    bos = tok.bos_token_id
    templated = ChatFormat(tok, "always", "gemma3").token_ids(Prompt("hi"))
    assert templated[0] == bos and bos not in templated[1:]
    plain = ChatFormat(tok, "never", "gemma3").token_ids(Prompt("hi"))
    assert plain == [bos, *tok("hi", add_special_tokens=False)["input_ids"]]
