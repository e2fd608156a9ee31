"""Decode-step cross-attention over a ragged set of peer latents.

At each boundary layer, the latent router's primary expert produces one new
token per sequence. That token's latent query attends, head by head, to the
latents its active peers computed for the prompt. Peers differ in prompt
length per sequence, so the keys and values are packed, not padded:
``k`` and ``v`` are ``[total, heads, dim]`` and sequence ``b`` owns rows
``offsets[b]:offsets[b + 1]``. A sequence with no peer rows gets a zero
output, which through the interaction's gate means "the primary alone".

Two implementations, one result:
- ``reference``: pad, mask and call ``scaled_dot_product_attention``. It is
  the CPU path and the ground truth in tests.
- ``triton_ragged``: flash-decoding. Stage 1 splits each sequence's rows into
  ``splits`` chunks, one program per (sequence, head, chunk), each keeping an
  online-softmax running max, sum and weighted value. Stage 2 merges the
  chunks. There is no padding, so a short sequence costs only its own rows.

``ragged_attention`` dispatches: Triton for CUDA tensors, the reference
otherwise. Under ``TRITON_INTERPRET=1``, the Triton path also runs on CPU
tensors, which is how the tests check it on a machine without a GPU.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install without triton still has the reference path
    triton = None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [B, H, D] and k, v [T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q and k disagree on heads and dim: {tuple(q.shape[1:])} vs {tuple(k.shape[1:])}")
    if offsets.shape != (q.shape[0] + 1,):
        raise ValueError(f"offsets must have B + 1 = {q.shape[0] + 1} entries, got {tuple(offsets.shape)}")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """Pad each sequence's peer rows to the longest, mask the padding, and use SDPA."""
    _check(q, k, v, offsets)
    b, h, d = q.shape
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    longest = max(lengths, default=0)
    if longest == 0:
        return torch.zeros_like(q)
    kp = q.new_zeros(b, longest, h, d)
    vp = q.new_zeros(b, longest, h, d)
    mask = torch.zeros(b, longest, dtype=torch.bool, device=q.device)
    for i, n in enumerate(lengths):
        start = int(offsets[i])
        kp[i, :n], vp[i, :n], mask[i, :n] = k[start:start + n], v[start:start + n], True
    # SDPA in float32: a fully masked row (no peers) must give zeros, not NaN, and bf16 scores lose precision.
    out = F.scaled_dot_product_attention(
        q.float().unsqueeze(2), kp.float().transpose(1, 2), vp.float().transpose(1, 2),
        attn_mask=mask[:, None, None, :], scale=scale,
    ).squeeze(2)
    empty = torch.tensor([n == 0 for n in lengths], device=q.device)
    return torch.where(empty[:, None, None], 0.0, out).to(q.dtype)


if triton is not None:

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, off_ptr, m_ptr, l_ptr, acc_ptr, scale,
        stride_qb, stride_qh, stride_kt, stride_kh, n_heads, n_splits,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        start = tl.load(off_ptr + b)
        end = tl.load(off_ptr + b + 1)
        per_split = tl.cdiv(end - start, n_splits)
        lo = start + s * per_split
        hi = tl.minimum(lo + per_split, end)
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + dims).to(tl.float32)
        m = tl.full((), float("-inf"), tl.float32)
        l = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for block in range(lo, hi, BLOCK_N):
            rows = block + tl.arange(0, BLOCK_N)
            live = rows < hi
            at = rows[:, None] * stride_kt + h * stride_kh + dims[None, :]
            k = tl.load(k_ptr + at, mask=live[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(k * q[None, :], axis=1) * scale
            scores = tl.where(live, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            p = tl.exp(scores - m_new)
            p = tl.where(live, p, 0.0)
            correction = tl.exp(m - m_new)
            v = tl.load(v_ptr + at, mask=live[:, None], other=0.0).to(tl.float32)
            acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
            l = l * correction + tl.sum(p, axis=0)
            m = m_new
        slot = (b * n_heads + h) * n_splits + s
        tl.store(m_ptr + slot, m)
        tl.store(l_ptr + slot, l)
        tl.store(acc_ptr + slot * HEAD_DIM + dims, acc)

    @triton.jit
    def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, stride_oh, n_heads, n_splits,
                      HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        dims = tl.arange(0, HEAD_DIM)
        splits = tl.arange(0, SPLITS)
        live = splits < n_splits
        base = (b * n_heads + h) * n_splits
        m = tl.load(m_ptr + base + splits, mask=live, other=float("-inf"))
        l = tl.load(l_ptr + base + splits, mask=live, other=0.0)
        acc = tl.load(acc_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :], mask=live[:, None], other=0.0)
        m_all = tl.max(m, axis=0)
        # A split with no rows has m = -inf; so does a sequence with no peers at all, whose output is zero.
        # Subtracting a finite stand-in keeps -inf - -inf (NaN) out of the arithmetic.
        m_all = tl.where(m_all > float("-inf"), m_all, 0.0)
        weight = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)
        total = tl.sum(l * weight, axis=0)
        out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def triton_ragged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                  scale: float | None = None, splits: int = 4, block_n: int = 32) -> torch.Tensor:
    """Flash-decoding over packed peer rows (see the module docstring)."""
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton")
    _check(q, k, v, offsets)
    b, h, d = q.shape
    if d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two for the Triton kernel")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    offsets = offsets.to(device=q.device, dtype=torch.int32).contiguous()
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    m = torch.empty(b * h * splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(b * h * splits, d, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    if b == 0:
        return out
    _split_kernel[(b, h, splits)](q, k, v, offsets, m, l, acc, scale, q.stride(0), q.stride(1), k.stride(0),
                                  k.stride(1), h, splits, HEAD_DIM=d, BLOCK_N=block_n)
    _merge_kernel[(b, h)](m, l, acc, out, out.stride(0), out.stride(1), h, splits, HEAD_DIM=d,
                          SPLITS=triton.next_power_of_2(splits))
    return out


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, or any tensor under its interpreter."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """The Triton kernel on CUDA, the padded SDPA reference on the CPU."""
    if q.device.type == "cuda" and triton_usable(q.device):
        return triton_ragged(q, k, v, offsets, scale)
    return reference(q, k, v, offsets, scale)
