"""The PyTorch Philox (flashattn/ops/philox.py) against Triton's own tl.philox, bit for bit.

Without CUDA the kernel runs under Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 before triton is imported); with CUDA it runs compiled on the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from flashattn import flash_attn_func
from flashattn.ops import capabilities, philox

from conftest import DEVICE, HAS_CUDA


@triton.jit
def _philox_kernel(seed, C0, C1, C2, C3, R, U, N: tl.constexpr):
    offs = tl.arange(0, N)
    r, _, _, _ = tl.philox(seed, tl.load(C0 + offs), tl.load(C1 + offs), tl.load(C2 + offs),
                           tl.load(C3 + offs))
    tl.store(R + offs, r.to(tl.int32, bitcast=True))
    tl.store(U + offs, tl.uint_to_uniform_float(r))


@triton.jit
def _dropout_tile_kernel(seed, p, KEEP, bh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask of one tile exactly as a kernel will make it: counters (j, i, b * H + h, 0)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    c0 = offs_n[None, :] + offs_m[:, None] * 0
    c1 = offs_m[:, None] + offs_n[None, :] * 0
    c2 = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32) + bh
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c2 * 0)
    keep = tl.uint_to_uniform_float(r) >= p
    tl.store(KEEP + offs_m[:, None] * BLOCK_N + offs_n[None, :], keep.to(tl.int8))


def test_interpreter_is_on_without_cuda():
    assert HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"


SEEDS = [0, 1, 12345, 2 ** 32 - 1, 2 ** 32 + 7, 2 ** 40 + 3, philox.SEED_HIGH - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_is_bit_identical_to_triton(seed):
    n = 1024
    g = torch.Generator().manual_seed(seed % 1000)
    counters = [torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), dtype=torch.int32, generator=g) for _ in range(4)]
    counters[0][:16] = torch.arange(16)            # small counters, the common case
    counters[3][:512] = 0
    r = torch.empty(n, dtype=torch.int32, device=DEVICE)
    u = torch.empty(n, dtype=torch.float32, device=DEVICE)
    _philox_kernel[(1,)](seed, *(c.to(DEVICE) for c in counters), r, u, N=n)
    ours, *_ = philox.philox(seed, *counters)
    assert torch.equal(r.cpu().to(torch.int64) & philox.MASK32, ours)
    uniform = philox.uint_to_uniform_float(ours)
    assert torch.equal(u.cpu(), uniform)
    assert 0.0 <= uniform.min() and uniform.max() < 1.0


@pytest.mark.parametrize("seed, p, bh", [(7, 0.1, 0), (2 ** 33 + 5, 0.5, 13), (99, 0.9, 5)])
def test_dropout_tile_matches_a_triton_kernel(seed, p, bh):
    """keep_mask with the documented counter layout == what a Triton kernel computes."""
    keep = torch.empty(32, 16, dtype=torch.int8, device=DEVICE)
    _dropout_tile_kernel[(1,)](seed, p, keep, bh, BLOCK_M=32, BLOCK_N=16)
    ours = philox.keep_mask(seed, p, torch.arange(32), torch.arange(16), torch.tensor(bh))
    assert torch.equal(keep.cpu().bool(), ours)


def test_keep_rate_is_one_minus_p():
    """Over 2^18 draws the keep rate is within 5 standard deviations of 1 - p (fixed seeds: never flaky)."""
    for seed, p in [(1, 0.1), (2, 0.5), (3, 0.9), (4, 0.01)]:
        keep = philox.dropout_keep_mask(seed, p, 2, 2, 256, 256)
        n = keep.numel()
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5


def test_masks_of_heads_rows_and_seeds_are_independent():
    keep = philox.dropout_keep_mask(11, 0.5, 2, 3, 64, 64)
    flat = keep.reshape(6, -1).float()
    for a in range(6):
        for b in range(a + 1, 6):
            assert 0.4 < (flat[a] == flat[b]).float().mean() < 0.6
    other = philox.dropout_keep_mask(12, 0.5, 2, 3, 64, 64)
    assert 0.4 < (keep == other).float().mean() < 0.6


@pytest.mark.parametrize("backend", [s.name for s in capabilities.KERNELS.values() if "dropout" in s.features])
def test_seed_is_drawn_from_torch_default_generator(backend, use_backend):
    """torch.manual_seed fixes the seed; the draw is one torch.randint on the CPU, and only with dropout."""
    use_backend(backend)
    torch.manual_seed(5)
    seed = philox.draw_seed()
    assert seed.dtype == torch.int64 and seed.device.type == "cpu" and seed.dim() == 0
    assert 0 <= seed.item() < philox.SEED_HIGH
    torch.manual_seed(5)
    assert philox.draw_seed().item() == seed.item()

    q = torch.randn(1, 20, 2, 16, device=DEVICE)
    torch.manual_seed(5)
    _, _, probs = flash_attn_func(q, q, q, dropout_p=0.3, return_attn_probs=True)
    expected = philox.dropout_keep_mask(seed.item(), 0.3, 1, 2, 20, 20, DEVICE)
    assert torch.equal(~torch.signbit(probs), expected)

    torch.manual_seed(5)
    flash_attn_func(q, q, q)                       # no dropout: the generator is not touched
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))
