"""The latent mixture's invariants, with the real bundled experts (SmolLM2 30 x 576, Gemma 3 18 x 640).

- gate = 0 reproduces the primary's logits exactly;
- the experts' parameters receive no gradient, while the interaction's do;
- decoding with the KV cache (the decode kernel at each boundary) gives what full recomputation gives;
- bad input (k past the pool, a checkpoint for other experts, a broken data file) is refused with a reason.
"""

from __future__ import annotations

import pytest
import torch

from orchestrator.latent.checkpoint import LatentSettings, read_checkpoint, save_checkpoint
from orchestrator.latent.experts import build_mixture, group_backends, load_experts
from orchestrator.latent.mixture import LatentError, LatentRouting, boundary_layers
from orchestrator.latent.training import load_examples
from routers.base import RouteOptions, RoutingError
from routers.embedding import Embedder
from workers.config import TransformersExpert
from workers.model_store import embedder_path

pytestmark = pytest.mark.models

PROMPT = "Question: What is the capital of France?\nA. Paris\nB. Rome\nAnswer:"


@pytest.fixture(scope="module")
def mixture_parts(store):
    configs = [TransformersExpert(name="smollm2", source="smollm2-135m-instruct"),
               TransformersExpert(name="gemma3", source="gemma3-270m")]
    return load_experts(group_backends(configs, store.root), store)


def _mixture(parts, gate: float = 0.0, seed: int = 0):  # noqa: ANN001, ANN202
    experts, shapes = parts
    m = build_mixture(experts, shapes, LatentSettings(q=3, d_latent=64, heads=2), embed_dim=384, seed=seed)
    with torch.no_grad():
        for g in m.interaction.gate.values():
            g.fill_(gate)
    return m


def test_boundaries_sit_at_the_same_fractions_of_each_depth():
    assert boundary_layers(30, 3) == [7, 14, 22]
    assert boundary_layers(18, 3) == [4, 8, 13]
    with pytest.raises(LatentError, match="do not fit"):
        boundary_layers(4, 4)


def test_gate_zero_reproduces_the_primary_exactly(mixture_parts):
    m = _mixture(mixture_parts, gate=0.0)
    enc = m._tokens("smollm2", [PROMPT, "Say hi."])
    with torch.no_grad():
        alone = m.experts["smollm2"](**enc).logits
        cache = m.encode_peers([PROMPT, "Say hi."], [["gemma3"], ["gemma3"]])
        with m.attached("smollm2", cache):
            mixed = m.experts["smollm2"](**enc).logits
    assert cache.mask.any(1).all()  # the peers really were there
    assert torch.equal(alone, mixed)
    # With the gate open, the same peers change the logits: the hooks are live.
    m_open = _mixture(mixture_parts, gate=0.5)
    with torch.no_grad(), m_open.attached("smollm2", m_open.encode_peers([PROMPT, "Say hi."], [["gemma3"]] * 2)):
        assert not torch.allclose(m_open.experts["smollm2"](**enc).logits, alone)


def test_the_experts_receive_no_gradient(mixture_parts):
    m = _mixture(mixture_parts, gate=0.1)
    cache = m.encode_peers([PROMPT], [["smollm2"]])
    loss = m.answer_loss("gemma3", [PROMPT], [" A. Paris"], cache).mean()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.experts.parameters())
    assert m.interaction.gate["gemma3"].grad.abs().sum() > 0
    assert m.interaction.adapters["smollm2"][0][1].weight.grad.abs().sum() > 0  # through the peer's latents
    assert m.interaction.out["gemma3"][0].weight.grad.abs().sum() > 0
    assert m.interaction.gate["smollm2"].grad is None or m.interaction.gate["smollm2"].grad.abs().sum() == 0


def test_decoding_with_the_cache_equals_recomputing_without_it(mixture_parts):
    m = _mixture(mixture_parts, gate=0.7, seed=1)
    prompts = [PROMPT, "Name a colour:"]
    cache = m.encode_peers(prompts, [["gemma3"], ["gemma3"]])
    enc = m._tokens("smollm2", prompts, side="left")
    model = m.experts["smollm2"]
    start = enc["input_ids"].shape[1]
    with torch.no_grad(), m.attached("smollm2", cache):
        cached = model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
        assert cached.sequences.shape[1] == start + 6
        for t, step_logits in enumerate(cached.logits):
            # The same step recomputed over the whole sequence so far, without any KV cache.
            ids = cached.sequences[:, :start + t]
            mask = torch.cat([enc["attention_mask"], torch.ones(len(prompts), t, dtype=torch.long)], 1)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            full = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
            torch.testing.assert_close(step_logits, full, atol=2e-4, rtol=1e-4)


def test_bad_input_is_refused_before_work(mixture_parts, tmp_path):
    m = _mixture(mixture_parts)
    routing = LatentRouting(m.router, m.names, Embedder(embedder_path()))
    with pytest.raises(RoutingError, match="k = 3, but the latent mixture has 2 of the mixture's experts"):
        routing.route(["hi"], RouteOptions(k=3))
    with pytest.raises(RoutingError, match="k = 2, but the allow-list leaves 1 of the mixture's experts"):
        routing.check(RouteOptions(k=2), ["gemma3"])
    _, shapes = mixture_parts
    path = tmp_path / "ckpt.pt"
    save_checkpoint(m, shapes, LatentSettings(q=3, d_latent=64, heads=2), path, {})
    assert read_checkpoint(path, [(s.name, s.version) for s in shapes])["experts"][0]["name"] == "smollm2"
    other = [("smollm2", "0123456789abcdef"), (shapes[1].name, shapes[1].version)]
    with pytest.raises(LatentError, match="was trained for experts smollm2@.*, not smollm2@0123456789abcdef"):
        read_checkpoint(path, other)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q?", "answer": "a"}\n{"prompt": "q?"}\n')
    with pytest.raises(LatentError, match="bad.jsonl:2: each line needs string fields prompt and answer"):
        load_examples(tmp_path / "bad.jsonl")
