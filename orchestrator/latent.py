"""Building, training, saving and measuring the latent mixture (``routers.latent``) with real experts.

The experts come from the model store, frozen, in float32 on one device:
the "latent group", which must hold every expert of the mixture at once.
A checkpoint stores the router and the interaction layers, together with
the names and weight hashes of the experts they were trained for. Loading
it into other experts is refused before anything runs.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from routers.embedding import Embedder
from routers.latent import ExpertShape, Interaction, LatentError, LatentMixture, LatentRouter
from workers.backends.transformers_backend import TransformersBackend
from workers.config import TransformersExpert
from workers.model_store import MANIFEST, ModelStore

CHECKPOINT_VERSION = 1
MINILM_DIM = 384
"""The width of all-MiniLM-L6-v2's embeddings, which the router reads."""


@dataclass(frozen=True)
class LatentSettings:
    q: int = 3
    d_latent: int = 256
    heads: int = 4
    router_hidden: int = 256


@dataclass
class Example:
    prompt: str
    answer: str


def load_examples(path: Path) -> list[Example]:
    """A JSONL of ``{"prompt", "answer"}``; errors name the line."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LatentError(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str):
            raise LatentError(f"{path}:{n}: each line needs string fields prompt and answer")
        if not row["prompt"].strip() or not row["answer"].strip():
            raise LatentError(f"{path}:{n}: prompt and answer must not be empty")
        out.append(Example(row["prompt"], row["answer"]))
    if not out:
        raise LatentError(f"{path} holds no examples")
    return out


def mmlu_examples(data: Path, limit: int, seed: int = 0) -> list[Example]:
    """A text task from MMLU-Pro dev questions: the question and its options, then the gold option's text."""
    rows = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    out = []
    for row in rows[:limit]:
        options = "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(row["options"]))
        gold = row["options"][row["answer_index"]]
        out.append(Example(f"Question: {row['question']}\n{options}\nAnswer:", f" {row['answer']}. {gold}"))
    return out


def expert_version(store: ModelStore, source: str) -> str:
    folder = store.resolve(source)
    manifest = Path(folder) / MANIFEST
    if isinstance(folder, Path) and manifest.exists():
        return json.loads(manifest.read_text())["source_sha256"][:16]
    return f"path:{folder}"


def identities(configs: list[TransformersExpert], store: ModelStore) -> list[tuple[str, str]]:
    """(name, version) of each expert: what a checkpoint is valid for, known without loading any weights."""
    return [(c.name, expert_version(store, c.source)) for c in configs]


def group_backends(configs: list[TransformersExpert], store_root: Path | None, threads: int | None = None
                   ) -> dict[str, TransformersBackend]:
    """One backend per expert, all on one device, prompts as plain text: the mixture is trained on the
    tokenizer's plain encoding, so the primary must not see a chat template it never trained with."""
    update: dict[str, object] = {"chat_template": "never"}
    if threads is not None:
        update["threads"] = threads
    backends = {c.name: TransformersBackend(c.model_copy(update=update), store_root) for c in configs}
    devices = {b.device for b in backends.values()}
    if len(devices) > 1:
        raise LatentError(f"the latent group's experts must share one device, but they would run on "
                          f"{', '.join(sorted(devices))}: set every expert's device alike")
    return backends


def check_fit(backends: dict[str, TransformersBackend], limit_bytes: int | None, where: str) -> int:
    """The bytes the experts need together; LatentError when they exceed ``limit_bytes`` of one device."""
    need = sum(b.estimate_memory_bytes() for b in backends.values())
    if limit_bytes is not None and need > limit_bytes:
        parts = ", ".join(f"{n} {b.estimate_memory_bytes() / 2**30:.2f}" for n, b in backends.items())
        raise LatentError(f"the latent group's experts need {need / 2**30:.2f} GiB together ({parts}), but {where} "
                          f"offers {limit_bytes / 2**30:.2f} GiB: use fewer or smaller experts, or a larger device")
    return need


def load_experts(backends: dict[str, TransformersBackend], store: ModelStore
                 ) -> tuple[dict[str, tuple[torch.nn.Module, object]], list[ExpertShape]]:
    experts, shapes = {}, []
    for name, backend in backends.items():
        backend.load()
        experts[name] = (backend.model, backend.tokenizer)
        cfg = backend.model.config
        shapes.append(ExpertShape(name, cfg.num_hidden_layers, cfg.hidden_size,
                                  expert_version(store, backend.config.source)))
    return experts, shapes


def build_mixture(experts: dict, shapes: list[ExpertShape], settings: LatentSettings, embed_dim: int,
                  seed: int = 0) -> LatentMixture:
    torch.manual_seed(seed)
    router = LatentRouter(embed_dim, len(shapes), settings.router_hidden)
    interaction = Interaction(shapes, settings.q, settings.d_latent, settings.heads)
    return LatentMixture(experts, shapes, settings.q, router, interaction)


def save_checkpoint(mixture: LatentMixture, shapes: list[ExpertShape], settings: LatentSettings, path: Path,
                    meta: dict) -> None:
    torch.save({
        "version": CHECKPOINT_VERSION,
        "experts": [{"name": s.name, "version": s.version} for s in shapes],
        "settings": settings.__dict__,
        "router": mixture.router.state_dict(),
        "interaction": mixture.interaction.state_dict(),
        "meta": meta,
    }, path)


def _open_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise LatentError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise LatentError(f"{path} is not a latent checkpoint: {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise LatentError(f"{path} is not a latent checkpoint of version {CHECKPOINT_VERSION}")
    return ckpt


def checkpoint_experts(path: Path) -> list[str]:
    """The expert names a checkpoint was trained for, in its order, before any expert is looked at."""
    return [e["name"] for e in _open_checkpoint(path)["experts"]]


def _verify(ckpt: dict, path: Path, experts: list[tuple[str, str]]) -> dict:
    """The checkpoint, once it is shown to be for exactly these (name, version) experts, in this order."""
    want = [{"name": n, "version": v} for n, v in experts]
    if ckpt["experts"] != want:
        trained = ", ".join(f"{e['name']}@{e['version']}" for e in ckpt["experts"])
        given = ", ".join(f"{e['name']}@{e['version']}" for e in want)
        raise LatentError(f"{path} was trained for experts {trained}, not {given}: train a checkpoint for these "
                          "experts with `concilium train-latent`")
    return ckpt


def read_checkpoint(path: Path, experts: list[tuple[str, str]]) -> dict:
    return _verify(_open_checkpoint(path), path, experts)


def _router_of(ckpt: dict) -> LatentRouter:
    weight = ckpt["router"]["net.0.weight"]  # [hidden, embed_dim]: the embedder it was trained with
    router = LatentRouter(weight.shape[1], len(ckpt["experts"]), weight.shape[0])
    router.load_state_dict(ckpt["router"])
    return router


def router_for(path: Path, configs_of: Callable[[list[str]], list[TransformersExpert]], store: ModelStore
               ) -> tuple[list[TransformersExpert], LatentRouter]:
    """The router alone, for the process that routes (the interaction stays with the latent group), read once:
    ``configs_of`` maps the checkpoint's expert names to their configs, which must match its weight versions."""
    ckpt = _open_checkpoint(path)
    configs = configs_of([e["name"] for e in ckpt["experts"]])
    return configs, _router_of(_verify(ckpt, path, identities(configs, store)))


def load_mixture(path: Path, experts: dict, shapes: list[ExpertShape]) -> LatentMixture:
    ckpt = read_checkpoint(path, [(s.name, s.version) for s in shapes])
    settings = LatentSettings(**ckpt["settings"])
    interaction = Interaction(shapes, settings.q, settings.d_latent, settings.heads)
    interaction.load_state_dict(ckpt["interaction"])
    device = next(experts[shapes[0].name][0].parameters()).device
    return LatentMixture(experts, shapes, settings.q, _router_of(ckpt).to(device), interaction.to(device))


@dataclass
class StepLosses:
    answer: float
    router: float
    balance: float


def train_step(mixture: LatentMixture, embedder: Embedder, batch: list[Example], optimizer: torch.optim.Optimizer,
               balance_weight: float = 0.01) -> StepLosses:
    """Every expert takes a turn as the primary, with the others as its peers. The answer loss trains the
    interaction; the per-expert losses name the best primary, which the router learns to pick; a small
    load-balance term keeps the router from collapsing onto one expert."""
    prompts, answers = [e.prompt for e in batch], [e.answer for e in batch]
    per_expert = []
    for name in mixture.names:
        peers = [[n for n in mixture.names if n != name]] * len(batch)
        cache = mixture.encode_peers(prompts, peers)
        per_expert.append(mixture.answer_loss(name, prompts, answers, cache))
    losses = torch.stack(per_expert, 1)  # [B, E]
    logits = mixture.router(torch.as_tensor(embedder.encode(prompts)))
    router_loss = F.cross_entropy(logits, losses.detach().argmin(1))
    share = logits.softmax(-1).mean(0)
    balance = ((share - 1 / len(mixture.names)) ** 2).sum()
    answer_loss = losses.mean()
    total = answer_loss + router_loss + balance_weight * balance
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return StepLosses(answer_loss.item(), router_loss.item(), balance.item())


@dataclass
class HeldOut:
    primary_alone: float
    best_single: float
    best_single_name: str
    mixture: float
    router_accuracy: float


@torch.no_grad()
def evaluate(mixture: LatentMixture, embedder: Embedder, examples: list[Example], batch_size: int = 4) -> HeldOut:
    """Answer-token loss on held-out examples, side by side: the router's primary alone, the best single
    expert (chosen on these examples, so favoured), and the latent mixture (the router's primary with its
    peers)."""
    alone, mixed, picked_best = [], [], []
    per_expert: dict[str, list[float]] = {n: [] for n in mixture.names}
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        prompts, answers = [e.prompt for e in batch], [e.answer for e in batch]
        primary = mixture.router(torch.as_tensor(embedder.encode(prompts))).argmax(-1).tolist()
        losses = {}
        for name in mixture.names:
            losses[name] = mixture.answer_loss(name, prompts, answers, None).tolist()
            per_expert[name] += losses[name]
        for name in mixture.names:  # the samples routed to each primary, as one batch
            rows = [j for j, p in enumerate(primary) if mixture.names[p] == name]
            if not rows:
                continue
            peers = [[n for n in mixture.names if n != name]] * len(rows)
            cache = mixture.encode_peers([prompts[j] for j in rows], peers)
            mixed += mixture.answer_loss(name, [prompts[j] for j in rows], [answers[j] for j in rows], cache).tolist()
            for j in rows:
                alone.append(losses[name][j])
                picked_best.append(name == min(mixture.names, key=lambda n: losses[n][j]))
    best = min(per_expert, key=lambda n: statistics.mean(per_expert[n]))
    return HeldOut(statistics.mean(alone), statistics.mean(per_expert[best]), best, statistics.mean(mixed),
                   sum(picked_best) / len(picked_best))


def train(mixture: LatentMixture, embedder: Embedder, train_set: list[Example], val_set: list[Example],
          steps: int, batch_size: int, lr: float, validate_every: int,
          progress: Callable[[int, StepLosses, float | None], None], seed: int = 0) -> list[tuple[int, float]]:
    """Returns the validation answer loss (the mixture's) at each validation step."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(list(mixture.trainable()), lr=lr)
    curve = []
    for step in range(1, steps + 1):
        batch = rng.sample(train_set, min(batch_size, len(train_set)))
        losses = train_step(mixture, embedder, batch, optimizer)
        val = None
        if step % validate_every == 0 or step == steps:
            val = evaluate(mixture, embedder, val_set).mixture
            curve.append((step, val))
        progress(step, losses, val)
    return curve


@dataclass
class LatencyRow:
    prompt_tokens: int
    primary_alone_s: float
    latent_s: float

    @property
    def ratio(self) -> float:
        return self.latent_s / self.primary_alone_s


@torch.no_grad()
def latency(mixture: LatentMixture, primary: str, prompt_tokens: list[int], new_tokens: int, repeats: int
            ) -> list[LatencyRow]:
    """Generation time of the primary alone against the latent mode (peers encode the prompt once, then the
    primary decodes with the hooks), greedy, one prompt, same run, medians."""
    peers = [[n for n in mixture.names if n != primary]]
    tok = mixture.tokenizers[primary]
    rows = []
    for n in prompt_tokens:
        words = ("the quick brown fox jumps over the lazy dog " * n).split()
        prompt = " ".join(words[:n])
        while len(tok(prompt)["input_ids"]) > n:
            prompt = " ".join(prompt.split()[:-1])
        enc = mixture._tokens(primary, [prompt], side="left")
        model = mixture.experts[primary]
        gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}

        def alone() -> None:
            model.generate(**enc, **gen)

        def latent() -> None:
            cache = mixture.encode_peers([prompt], peers)
            with mixture.attached(primary, cache):
                model.generate(**enc, **gen)

        times: dict[str, list[float]] = {"alone": [], "latent": []}
        for _ in range(repeats + 1):  # the first round warms up and is not counted
            for name, fn in (("alone", alone), ("latent", latent)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        rows.append(LatencyRow(n, statistics.median(times["alone"][1:]), statistics.median(times["latent"][1:])))
    return rows
