"""Training and measuring the latent mixture (``orchestrator.latent.mixture``) on frozen experts.

Only the router and the interaction layers train. Every expert takes a turn as
the primary with the others as its peers; the answer loss trains the
interaction, and the per-expert losses name the best primary, which the router
learns to pick.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from orchestrator.latent.mixture import LatentError, LatentMixture
from routers.embedding import Embedder


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
