"""The latent execution mode end to end: real Ray, the latent group actor, the bundled experts.

The checkpoints here are built, not trained (training takes minutes a step batch
on this CPU): an untrained mixture has every gate at 0, so its answers must be
exactly the primary's own, which is what makes the pipeline checkable; a
checkpoint with open gates must change them.
"""

from __future__ import annotations

import asyncio

import pytest
import ray
import torch

from orchestrator.api.errors import InvalidRequest
from orchestrator.api.schemas import QueryBody
from orchestrator.api.service import Service
from orchestrator.api.store import open_store
from orchestrator.config import ConciliumConfig, parse_config
from orchestrator.engine.pipeline import Pipeline, check_artifacts
from orchestrator.engine.requests import QueryRequest
from orchestrator.latent.checkpoint import LatentSettings, save_checkpoint
from orchestrator.latent.experts import build_mixture, group_backends, load_experts
from orchestrator.latent.group import LatentGroup, LatentGroupWorker
from orchestrator.latent.mixture import LatentError
from routers.base import RouteOptions
from routers.embedding import DIM
from tests.conftest import run
from tests.test_cli import concilium
from workers.types import Prompt, SamplingParams

pytestmark = pytest.mark.models

# Plain-text prompts that both experts continue (SmolLM2 ends a bare "Answer:" at once, which would make
# an equality of texts empty on both sides).
QUESTIONS = ["The capital of France is", "Water boils at a temperature of", "Once upon a time, a small robot"]
TOKENS = 8


@pytest.fixture(scope="module")
def checkpoints(store, tmp_path_factory):
    """Two checkpoints for the bundled experts: untrained (gates 0) and with the gates wide open."""
    base = ConciliumConfig()
    backends = group_backends([e for e in base.experts], store.root)
    experts, shapes = load_experts(backends, store)
    settings = LatentSettings(q=3, d_latent=64, heads=2)
    folder = tmp_path_factory.mktemp("latent")
    paths = {}
    for name, gate in (("closed", 0.0), ("open", 30.0)):  # a gate this wide must move greedy text
        mixture = build_mixture(experts, shapes, settings, DIM, seed=3)
        with torch.no_grad():
            for g in mixture.interaction.gate.values():
                g.fill_(gate)
        paths[name] = folder / f"{name}.pt"
        save_checkpoint(mixture, shapes, settings, paths[name], {})
    return {"paths": paths, "backends": backends}


def _config(checkpoint, **latent) -> ConciliumConfig:  # noqa: ANN001
    return parse_config({"latent": {"checkpoint": str(checkpoint), **latent},
                         "routing": {"profiles": "/nonexistent-profiles", "max_wait_ms": 50}})


@pytest.fixture(scope="module")
def pipeline(ray_cluster, store, checkpoints):
    loop = asyncio.new_event_loop()
    p = loop.run_until_complete(Pipeline.start(_config(checkpoints["paths"]["closed"])))
    yield p, loop
    loop.run_until_complete(p.close())
    loop.close()


def _greedy_alone(backends, expert: str, prompts: list[str]) -> list[str]:  # noqa: ANN001
    """The expert on its own, as the latent group presents prompts to it (plain text, no chat template, no frame),
    with the expert's own stop strings."""
    stop = tuple(ConciliumConfig().expert(expert).generation.stop)
    return [c.text for c in backends[expert].generate([Prompt(text=p) for p in prompts],
                                                      SamplingParams(max_new_tokens=TOKENS, stop=stop))]


def test_untrained_latent_mode_answers_exactly_as_the_primary_alone(pipeline, checkpoints):
    p, loop = pipeline

    async def ask_all():  # noqa: ANN202  (one window: the requests share a batched group call)
        return await asyncio.gather(*(p.ask(QueryRequest(q, RouteOptions(k=2), router="latent",
                                                         max_new_tokens=TOKENS)) for q in QUESTIONS))

    answers = loop.run_until_complete(ask_all())
    for q, a in zip(QUESTIONS, answers):
        d = a.decision
        assert a.aggregation == "latent" and d.mode == "latent" and d.latent
        assert sorted(d.experts) == ["gemma3", "smollm2"] and a.aggregator == d.experts[0]
        assert [x.expert for x in a.answers] == [d.experts[0]]  # one answer: the primary's
        peer = d.experts[1]
        read = len(checkpoints["backends"][peer].tokenizer(q)["input_ids"])
        assert a.usage[peer] == {"prompt_tokens": read, "completion_tokens": 0}  # the peer read the prompt
        assert abs(sum(d.scores.values()) - 1) < 1e-5
        assert a.text and a.text == _greedy_alone(checkpoints["backends"], d.experts[0], [q])[0]
    assert p.figures()["expert_calls"] <= 2  # batched: one group call per primary in the window


def test_open_gates_change_the_primary_s_answer(store, checkpoints):
    """The group's body in this process (no Ray: a second pipeline beside the module's would not fit the test
    cluster's CPUs), with the gates open: the peers' latents must change what the primary writes."""
    worker = LatentGroupWorker(ConciliumConfig().experts, checkpoints["paths"]["open"], store.root, 2, None)
    assert worker.ready()["experts"] == ["smollm2", "gemma3"]
    out = worker.generate("smollm2", [["gemma3"]], [QUESTIONS[0]], SamplingParams(max_new_tokens=TOKENS))
    assert out.completions[0].meta["peer_tokens"]["gemma3"] == len(
        checkpoints["backends"]["gemma3"].tokenizer(QUESTIONS[0])["input_ids"])
    alone = _greedy_alone(checkpoints["backends"], "smollm2", [QUESTIONS[0]])[0]
    assert alone and out.completions[0].text != alone


def test_the_service_defaults_k_for_latent_and_refuses_k_past_the_mixture(pipeline):
    p, loop = pipeline
    service = Service(p.config, p, open_store(None))
    response = loop.run_until_complete(service.query(QueryBody(query=QUESTIONS[1], router="latent", max_tokens=4)))
    assert response.aggregation == "latent" and len(response.routing.experts) == 2  # latent.k, not routing.k (3)
    assert response.routing.trace["primary"] == response.aggregator
    with pytest.raises(InvalidRequest, match="k = 3, but the latent mixture has 2"):
        service.to_request(QueryBody(query="hi", router="latent", k=3))
    with pytest.raises(InvalidRequest, match="k = 2, but the allow-list leaves 1"):
        service.to_request(QueryBody(query="hi", router="latent", experts=["gemma3"]))
    # k = 1 with an allow-list: that expert alone, no peers.
    one = loop.run_until_complete(service.query(QueryBody(query=QUESTIONS[1], router="latent", k=1,
                                                          experts=["gemma3"], max_tokens=4)))
    assert one.routing.experts == ["gemma3"] and set(one.usage) == {"gemma3"}


def test_mismatched_checkpoint_k_and_memory_are_refused_before_any_work(ray_cluster, store, checkpoints, tmp_path):
    closed = checkpoints["paths"]["closed"]
    ckpt = torch.load(closed, weights_only=True)
    ckpt["experts"][1]["version"] = "0123456789abcdef"
    torch.save(ckpt, tmp_path / "other.pt")
    cases = [
        (_config(tmp_path / "other.pt"), "was trained for experts smollm2@.*gemma3@0123456789abcdef, not"),
        (_config(tmp_path / "missing.pt"), "does not exist"),
        (_config(closed, k=3), "latent.k = 3, but the checkpoint's mixture has 2 experts"),
        (_config(closed, device_memory_gb=0.1), r"need \d+\.\d+ GiB together .* offers 0.10 GiB"),
    ]
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    cases.append((_config(tmp_path / "junk.pt"), "is not a latent checkpoint"))
    before = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    for config, message in cases:
        with pytest.raises(LatentError, match=message):
            check_artifacts(config)
        with pytest.raises(LatentError, match=message):  # the pipeline refuses before it starts any actor
            run(Pipeline.start(config))
    with pytest.raises(LatentError, match="the latent group needs 64 CPU, but the cluster has .* free"):
        run(LatentGroup.start(_config(closed, num_cpus=64)))
    assert {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)} == before


def test_cli_ask_with_the_latent_router(store, checkpoints, tmp_path):
    cfg = tmp_path / "concilium.yaml"
    cfg.write_text(f"latent:\n  checkpoint: {checkpoints['paths']['closed']}\n"
                   "routing:\n  profiles: /nonexistent-profiles\n")
    proc = concilium("ask", "--router", "latent", "--config", str(cfg), "-n", str(TOKENS), QUESTIONS[0])
    assert proc.returncode == 0, proc.stderr
    assert "latent mode: primary" in proc.stderr
    primary = proc.stderr.split("latent mode: primary ")[1].split()[0]
    assert _greedy_alone(checkpoints["backends"], primary, [QUESTIONS[0]])[0] in proc.stdout
    bad = concilium("ask", "--router", "latent", "--k", "3", "--config", str(cfg), "hi")
    assert bad.returncode == 2 and "--k 3: the latent mixture has 2 experts (smollm2, gemma3)" in bad.stderr
