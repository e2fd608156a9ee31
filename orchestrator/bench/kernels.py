"""``concilium bench kernels``: the ragged decode-attention kernel against padded SDPA, side by side.

For each batch size and peer length, the peer rows per sequence are drawn
uniformly between half the length and the length, as ragged prompts are.
Both variants run on the same tensors in the same run. Wherever the Triton
kernel can run (CUDA, or Triton's interpreter on a CPU), its output is checked
against the padded reference first; it is timed only on CUDA: on a CPU the
timing would measure the interpreter, not the kernel, so the CPU report says
"not measured on GPU".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.ragged_attention import reference, triton_ragged, triton_usable


@dataclass
class KernelTiming:
    batch: int
    peer_len: int
    padded_sdpa_ms: float
    triton_ms: float | None
    max_abs_diff: float | None

    @property
    def speedup(self) -> float | None:
        return None if self.triton_ms is None else self.padded_sdpa_ms / self.triton_ms


def _time(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (compiles the Triton kernel on first use)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def run_kernel_bench(batches: list[int], peer_lens: list[int], heads: int, dim: int, device: torch.device,
                     dtype: torch.dtype, repeats: int, progress: Callable[[str], None]) -> list[KernelTiming]:
    checked = triton_usable(device)
    timed_triton = device.type == "cuda" and checked
    g = torch.Generator().manual_seed(0)
    out = []
    for b in batches:
        for n in peer_lens:
            progress(f"batch {b}, peers {n}")
            lengths = torch.randint(max(1, n // 2), n + 1, (b,), generator=g)
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
            total = int(offsets[-1])
            q = torch.randn(b, heads, dim, generator=g).to(device, dtype)
            k = torch.randn(total, heads, dim, generator=g).to(device, dtype)
            v = torch.randn(total, heads, dim, generator=g).to(device, dtype)
            offsets = offsets.to(device)
            diff = None
            if checked:  # the numbers first, before any timing
                diff = (triton_ragged(q, k, v, offsets).float() - reference(q, k, v, offsets).float()).abs().max().item()
            padded = _time(lambda: reference(q, k, v, offsets), device, repeats)
            triton_ms = _time(lambda: triton_ragged(q, k, v, offsets), device, repeats) if timed_triton else None
            out.append(KernelTiming(b, n, padded, triton_ms, diff))
    return out
