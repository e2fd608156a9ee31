"""The ragged decode-attention kernel against its reference, run by Triton's interpreter on the CPU.

There is no GPU here, so ``TRITON_INTERPRET=1`` (set in conftest before any
kernel module is imported) runs the real Triton program, the same source
that compiles for CUDA, on CPU tensors. The reference is itself checked
against a per-sequence softmax written out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.ragged_attention import ragged_attention, reference, triton_ragged

SHAPES = [
    # (peer rows per sequence, heads, head dim)
    ([1], 1, 16),
    ([0], 2, 16),
    ([0, 0, 3], 2, 32),
    ([1, 7, 0, 64, 129], 4, 32),
    ([200, 1], 2, 64),
    ([33] * 6, 8, 16),
]


def _inputs(lengths: list[int], heads: int, dim: int, dtype: torch.dtype, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(offsets[-1])
    q = torch.randn(len(lengths), heads, dim, generator=g).to(dtype)
    k = torch.randn(total, heads, dim, generator=g).to(dtype)
    v = torch.randn(total, heads, dim, generator=g).to(dtype)
    return q, k, v, offsets


def _by_hand(q, k, v, offsets):  # noqa: ANN001, ANN202
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        for h in range(q.shape[1]):
            if hi == lo:
                continue
            scores = k[lo:hi, h].double() @ q[b, h].double() / math.sqrt(q.shape[2])
            out[b, h] = torch.softmax(scores, 0) @ v[lo:hi, h].double()
    return out


@pytest.mark.parametrize(("lengths", "heads", "dim"), SHAPES)
def test_reference_is_a_per_sequence_softmax(lengths, heads, dim):
    q, k, v, offsets = _inputs(lengths, heads, dim, torch.float32)
    torch.testing.assert_close(reference(q, k, v, offsets).double(), _by_hand(q, k, v, offsets), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("lengths", "heads", "dim"), SHAPES)
def test_triton_kernel_matches_the_reference(lengths, heads, dim, dtype):
    q, k, v, offsets = _inputs(lengths, heads, dim, dtype, seed=len(lengths))
    got = triton_ragged(q, k, v, offsets)
    want = reference(q, k, v, offsets)
    assert got.dtype == dtype and got.shape == q.shape
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    empty = [i for i, n in enumerate(lengths) if n == 0]
    assert torch.count_nonzero(got[empty]) == 0  # no peers: nothing added to the primary


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_the_split_count_does_not_change_the_result(splits):
    q, k, v, offsets = _inputs([5, 0, 90], 2, 32, torch.float32)
    torch.testing.assert_close(triton_ragged(q, k, v, offsets, splits=splits, block_n=16),
                               reference(q, k, v, offsets), atol=1e-5, rtol=1e-5)


def test_dispatch_takes_the_reference_on_the_cpu():
    q, k, v, offsets = _inputs([3, 4], 2, 16, torch.float32)
    assert torch.equal(ragged_attention(q, k, v, offsets), reference(q, k, v, offsets))


def test_bad_shapes_are_rejected_with_the_reason():
    q, k, v, offsets = _inputs([3, 4], 2, 16, torch.float32)
    with pytest.raises(ValueError, match="offsets must have B \\+ 1 = 3 entries"):
        reference(q, k, v, offsets[:2])
    with pytest.raises(ValueError, match="disagree on heads and dim"):
        reference(q, k[:, :1], v[:, :1], offsets)
    q, k, v, offsets = _inputs([3], 2, 24, torch.float32)
    with pytest.raises(ValueError, match="head dim 24 must be a power of two"):
        triton_ragged(q, k, v, offsets)
