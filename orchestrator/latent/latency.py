"""``concilium bench latent``: the latent mode's generation latency over the primary alone, side by side."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from orchestrator.latent.mixture import LatentMixture


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
        cuda = model.device.type == "cuda"
        for _ in range(repeats + 1):  # the first round warms up and is not counted
            for name, fn in (("alone", alone), ("latent", latent)):
                t0 = time.perf_counter()
                fn()
                if cuda:  # the time of the work, not of its launch
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        rows.append(LatencyRow(n, statistics.median(times["alone"][1:]), statistics.median(times["latent"][1:])))
    return rows
