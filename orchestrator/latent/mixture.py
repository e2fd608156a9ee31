"""Latent mixture of experts ("Mixture of Thoughts"), made cheap to run.

A small MLP over the frozen MiniLM query embedding scores the experts. Per
sample, the top-K experts are active, and the top-1 is the primary, which
writes the answer. At Q boundaries, placed at the same fractions of each
expert's depth (the experts differ in depth, width and tokenizer), an adapter
(LayerNorm + Linear) maps hidden states into a shared ``d_latent``. There,
the primary's latent queries cross-attend to its active peers' latents, and
the result is projected back to the primary's width and added through a
gate that starts at 0. An untrained mixture is exactly the primary alone.

What keeps it cheap, unlike the paper's lockstep decoding:
- the peers encode the prompt once, and their boundary latents (keys and
  values) are cached in a ``PeerCache``;
- the primary then generates with its own KV cache. At each boundary, a
  forward hook cross-attends from the new token to the cached peer latents,
  through the ragged decode kernel (``kernels.ragged_attention``);
- peers are never re-run per token, and they see only the prompt, so no
  future token can leak into them.

The experts stay frozen. Only the router and the interaction layers train.
This module is torch only: it knows nothing of Ray, HTTP or the scheduler.
``LatentRouting`` wraps the trained router as a service router, so that the
service routes with it like any other; its decisions carry ``Mode.LATENT``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels.ragged_attention import ragged_attention
from routers.base import Decision, RouteOptions, Router, RoutingError, TrainingSet
from routers.embedding import TextEncoder
from routers.vocabulary import Mode
from workers.errors import UserError


class LatentError(UserError, ValueError):
    """A latent mixture asked to do what it cannot: k past the pool, a checkpoint for other experts."""


@dataclass(frozen=True)
class ExpertShape:
    name: str
    layers: int
    width: int
    version: str
    """What the weights are (the model store's source hash): a checkpoint is only valid for these."""


def boundary_layers(layers: int, q: int) -> list[int]:
    """Q decoder layers at uniform fractions of the depth: the outputs of layers L·1/(Q+1) … L·Q/(Q+1)."""
    if not 1 <= q < layers:
        raise LatentError(f"{q} boundaries do not fit {layers} layers")
    return [max(0, math.floor(layers * (i + 1) / (q + 1) + 0.5) - 1) for i in range(q)]  # half rounds up


class LatentRouter(nn.Module):
    """Scores each expert as the primary, from the query embedding; routing is decided per sample."""

    def __init__(self, embed_dim: int, n_experts: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, n_experts))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings)


class LatentRouting(Router):
    """The trained router as a service router: per query, the top-k experts with the primary first.

    The decision names the primary (``experts[0]``) and its peers; the scheduler
    runs such decisions in the latent group instead of the solve and aggregate
    phases, and the primary writes the one answer.
    """

    def __init__(self, router: LatentRouter, experts: list[str], embedder: TextEncoder) -> None:
        if router.net[-1].out_features != len(experts):
            raise RoutingError(f"the router scores {router.net[-1].out_features} experts, not {len(experts)}")
        self.router, self.experts, self.embedder = router.eval(), list(experts), embedder

    def fit(self, train: TrainingSet) -> None:
        raise RoutingError("the latent router learns with its interaction layers: run `concilium train-latent`")

    def check(self, options: RouteOptions, allowed: list[str] | None = None) -> None:
        usable = [e for e in self.experts if allowed is None or e in allowed]
        if options.k > len(usable):
            among = "the latent mixture has" if allowed is None else "the allow-list leaves"
            raise RoutingError(f"k = {options.k}, but {among} {len(usable)} of the mixture's experts "
                               f"({', '.join(self.experts)})")

    @torch.no_grad()
    def route(self, texts: list[str], options: RouteOptions, vectors: object = None,
              categories: list[str | None] | None = None) -> list[Decision]:
        self.check(options)
        embeddings = torch.as_tensor(vectors if vectors is not None else self.embedder.encode(texts)).float()
        logits = self.router(embeddings.to(self.router.net[0].weight.device)).cpu()
        probs, chosen = logits.softmax(-1), logits.topk(options.k, dim=-1).indices.tolist()
        decisions = []
        for row, picked in zip(probs.tolist(), chosen):
            names = [self.experts[i] for i in picked]
            decisions.append(Decision(
                experts=names, scores=dict(zip(self.experts, row)), aggregator=names[0], mode=Mode.LATENT,
                trace={"primary": names[0], "peers": names[1:],
                       "why": "the trained router's top-k by softmax score; the top-1 writes the answer while "
                              "cross-attending to its peers' prompt latents"},
            ))
        return decisions


@dataclass
class PeerCache:
    """The active peers' prompt latents for one batch, as keys and values per boundary, in two layouts:
    padded (``[B, H, S, Dh]`` with ``mask [B, S]``) for a whole-sequence pass, and packed
    (``[N, H, Dh]`` with ``offsets [B + 1]``) for the decode kernel."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    packed_keys: list[torch.Tensor] = field(default_factory=list)
    packed_values: list[torch.Tensor] = field(default_factory=list)
    offsets: torch.Tensor | None = None

    def pack(self) -> PeerCache:
        lengths = self.mask.sum(1)
        self.offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        rows = self.mask.nonzero(as_tuple=True)  # (batch, position) of every real peer row, batch-major
        self.packed_keys = [k.permute(0, 2, 1, 3)[rows] for k in self.keys]
        self.packed_values = [v.permute(0, 2, 1, 3)[rows] for v in self.values]
        return self


class Interaction(nn.Module):
    """Adapters, cross-attention and the gated write-back, for every expert at every boundary."""

    def __init__(self, shapes: list[ExpertShape], q: int, d_latent: int = 256, heads: int = 4) -> None:
        super().__init__()
        if d_latent % heads:
            raise LatentError(f"d_latent {d_latent} is not a multiple of {heads} heads")
        self.shapes = {s.name: s for s in shapes}
        self.q, self.d_latent, self.heads = q, d_latent, heads
        self.adapters = nn.ModuleDict({
            s.name: nn.ModuleList([nn.Sequential(nn.LayerNorm(s.width), nn.Linear(s.width, d_latent))
                                   for _ in range(q)]) for s in shapes
        })
        self.query = nn.ModuleList([nn.Linear(d_latent, d_latent) for _ in range(q)])
        self.key = nn.ModuleList([nn.Linear(d_latent, d_latent) for _ in range(q)])
        self.value = nn.ModuleList([nn.Linear(d_latent, d_latent) for _ in range(q)])
        self.out = nn.ModuleDict({s.name: nn.ModuleList([nn.Linear(d_latent, s.width) for _ in range(q)])
                                  for s in shapes})
        self.gate = nn.ParameterDict({s.name: nn.Parameter(torch.zeros(q)) for s in shapes})

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.d_latent // self.heads).transpose(1, 2)

    def peer_kv(self, name: str, boundary: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, T, Dh]`` from a peer's hidden states at one boundary."""
        latent = self.adapters[name][boundary](hidden)
        return self._heads(self.key[boundary](latent)), self._heads(self.value[boundary](latent))

    def write_back(self, name: str, boundary: int, hidden: torch.Tensor, cache: PeerCache) -> torch.Tensor:
        """The primary's hidden states plus the gated cross-attention to its peers' prompt latents."""
        latent = self.adapters[name][boundary](hidden.float())  # the interaction runs in float32
        q = self._heads(self.query[boundary](latent))  # [B, H, T, Dh]
        if q.shape[2] == 1 and cache.offsets is not None:  # one new token: the ragged decode kernel
            att = ragged_attention(q[:, :, 0], cache.packed_keys[boundary], cache.packed_values[boundary],
                                   cache.offsets, 1 / math.sqrt(q.shape[-1])).unsqueeze(2)
        else:
            att = _masked_attention(q, cache.keys[boundary], cache.values[boundary], cache.mask)
        att = att.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], self.d_latent)
        return hidden + self.gate[name][boundary] * self.out[name][boundary](att).to(hidden.dtype)


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA over padded peer rows; a sample without any peer rows gets zeros, not NaN."""
    if k.shape[2] == 0:
        return torch.zeros_like(q)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return torch.where(mask.any(1)[:, None, None, None], out, 0.0)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


class LatentMixture(nn.Module):
    """Frozen experts (Hugging Face causal LMs with their tokenizers), the router and the interaction."""

    def __init__(self, experts: dict[str, tuple[nn.Module, object]], shapes: list[ExpertShape], q: int,
                 router: LatentRouter, interaction: Interaction) -> None:
        super().__init__()
        self.names = [s.name for s in shapes]
        self.experts = nn.ModuleDict({n: experts[n][0] for n in self.names})
        self.tokenizers = {n: experts[n][1] for n in self.names}
        self.boundaries = {s.name: boundary_layers(s.layers, q) for s in shapes}
        self.router, self.interaction = router, interaction
        for p in self.experts.parameters():
            p.requires_grad_(False)
        self.experts.eval()

    def trainable(self) -> Iterator[nn.Parameter]:
        yield from self.router.parameters()
        yield from self.interaction.parameters()

    def _tokens(self, name: str, texts: list[str], side: str = "right") -> dict[str, torch.Tensor]:
        """Tokenised with the given padding side; the tokenizer's own side is restored, because the
        expert's generation path, which shares the tokenizer, pads on the left."""
        tok = self.tokenizers[name]
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        before, tok.padding_side = tok.padding_side, side
        try:
            enc = tok(texts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = before
        device = next(self.experts[name].parameters()).device
        return {k: v.to(device) for k, v in enc.items()}

    def encode_peers(self, prompts: list[str], peers: list[list[str]]) -> PeerCache:
        """Run each peer once over the prompts of the samples it serves; concatenate, per sample, the
        boundary keys and values of its peers, each peer with its own padding."""
        b = len(prompts)
        per_sample: list[list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = [[] for _ in range(b)]
        for name in self.names:
            rows = [i for i in range(b) if name in peers[i]]
            if not rows:
                continue
            enc = self._tokens(name, [prompts[i] for i in rows])
            with torch.no_grad():  # the decoder alone: a peer's logits are never needed
                hidden = self.experts[name].get_decoder()(**enc, output_hidden_states=True).hidden_states
            real = enc["attention_mask"].bool()
            for j, layer in enumerate(self.boundaries[name]):
                keys, values = self.interaction.peer_kv(name, j, hidden[layer + 1].float())
                for r, i in enumerate(rows):
                    if j == 0:
                        per_sample[i].append(([], []))
                    per_sample[i][-1][0].append(keys[r][:, real[r]])
                    per_sample[i][-1][1].append(values[r][:, real[r]])
        heads, dh = self.interaction.heads, self.interaction.d_latent // self.interaction.heads
        lengths = [sum(ks[0].shape[1] for ks, _ in peers_of) for peers_of in per_sample]
        longest = max(lengths, default=0)
        device = next(self.interaction.parameters()).device
        mask = torch.zeros(b, longest, dtype=torch.bool, device=device)
        keys_out, values_out = [], []
        for j in range(self.interaction.q):
            kj = torch.zeros(b, heads, longest, dh, device=device)
            vj = torch.zeros_like(kj)
            for i, peers_of in enumerate(per_sample):
                at = 0
                for ks, vs in peers_of:
                    n = ks[j].shape[1]
                    kj[i, :, at:at + n], vj[i, :, at:at + n] = ks[j], vs[j]
                    mask[i, at:at + n] = True
                    at += n
            keys_out.append(kj)
            values_out.append(vj)
        return PeerCache(keys_out, values_out, mask).pack()

    @contextlib.contextmanager
    def attached(self, primary: str, cache: PeerCache) -> Iterator[None]:
        """Hooks on the primary's boundary layers that write the peers' latents back into its stream."""
        layers = decoder_layers(self.experts[primary])
        handles = []
        for j, index in enumerate(self.boundaries[primary]):
            def hook(module: nn.Module, args: tuple, output: object, j: int = j) -> object:
                hidden = output[0] if isinstance(output, tuple) else output
                mixed = self.interaction.write_back(primary, j, hidden, cache)
                return (mixed, *output[1:]) if isinstance(output, tuple) else mixed
            handles.append(layers[index].register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def answer_loss(self, primary: str, prompts: list[str], answers: list[str],
                    cache: PeerCache | None) -> torch.Tensor:
        """Per-sample mean cross-entropy of the primary on the answer tokens (teacher forcing), with the
        interaction on when ``cache`` is given, else the primary alone."""
        tok = self.tokenizers[primary]
        enc = self._tokens(primary, [p + a for p, a in zip(prompts, answers)], side="left")
        lengths = enc["attention_mask"].sum(1).tolist()
        answer_lens = [max(1, n - len(tok(p)["input_ids"])) for n, p in zip(lengths, prompts)]
        # Left padding puts every answer at the end, so only the last few positions need logits: the LM head
        # over a whole prompt is the costliest part of the pass with a large vocabulary (Gemma 3: 262k).
        keep = max(answer_lens) + 1
        with self.attached(primary, cache) if cache is not None else contextlib.nullcontext():
            logits = self.experts[primary](**enc, logits_to_keep=keep).logits  # [B, keep, V]
        targets = enc["input_ids"][:, -keep + 1:]
        counted = torch.arange(keep - 1, device=targets.device)[None, :] >= (keep - 1 - torch.tensor(
            answer_lens, device=targets.device))[:, None]
        labels = torch.where(counted, targets, -100)
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, reduction="none")
        return losses.sum(1) / counted.sum(1)
