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
from flashattn.ops.triton.common import _seed_halves, dropout_keep

from conftest import DEVICE, HAS_CUDA


@triton.jit
def _philox_kernel(seed, C0, C1, C2, C3, R, U, N: tl.constexpr):
    """All four outputs of tl.philox (R: (4, N)) and the first one's uniform."""
    offs = tl.arange(0, N)
    r0, r1, r2, r3 = tl.philox(seed, tl.load(C0 + offs), tl.load(C1 + offs), tl.load(C2 + offs),
                               tl.load(C3 + offs))
    tl.store(R + offs, r0.to(tl.int32, bitcast=True))
    tl.store(R + N + offs, r1.to(tl.int32, bitcast=True))
    tl.store(R + 2 * N + offs, r2.to(tl.int32, bitcast=True))
    tl.store(R + 3 * N + offs, r3.to(tl.int32, bitcast=True))
    tl.store(U + offs, tl.uint_to_uniform_float(r0))


@triton.jit
def _dropout_tile_kernel(seed_lo, seed_hi, p, KEEP, bh, first_row, first_col, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         KEYS_FIRST: tl.constexpr):
    """The keep mask of one tile as the kernels make it (common.dropout_keep), rows first or keys first."""
    offs_m = first_row + tl.arange(0, BLOCK_M)
    keep = dropout_keep(seed_lo, seed_hi, p, offs_m, first_col, bh, BLOCK_N, KEYS_FIRST)
    if KEYS_FIRST:
        ptrs = KEEP + tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    else:
        ptrs = KEEP + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(ptrs, keep.to(tl.int8))


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
    r = torch.empty(4, n, dtype=torch.int32, device=DEVICE)
    u = torch.empty(n, dtype=torch.float32, device=DEVICE)
    _philox_kernel[(1,)](seed, *(c.to(DEVICE) for c in counters), r, u, N=n)
    ours = philox.philox(seed, *counters)
    for i in range(4):
        assert torch.equal(r[i].cpu().to(torch.int64) & philox.MASK32, ours[i])
    uniform = philox.uint_to_uniform_float(ours[0])
    assert torch.equal(u.cpu(), uniform)
    assert 0.0 <= uniform.min() and uniform.max() < 1.0


@pytest.mark.parametrize("keys_first", [False, True], ids=["rows-first", "keys-first"])
@pytest.mark.parametrize("seed, p, bh, first_row, first_col",
                         [(7, 0.1, 0, 0, 0), (2 ** 33 + 5, 0.5, 13, 48, 32), (99, 0.9, 5, 7, 4096)])
def test_dropout_tile_matches_the_kernels_helper(seed, p, bh, first_row, first_col, keys_first):
    """keep_mask with the documented counters == the kernels' tile helper (four keys a Philox call),
    in both of its orientations, for tiles away from the origin."""
    shape = (16, 32) if keys_first else (32, 16)
    keep = torch.empty(shape, dtype=torch.int8, device=DEVICE)
    _dropout_tile_kernel[(1,)](*_seed_halves(seed), p, keep, bh, first_row, first_col, BLOCK_M=32, BLOCK_N=16,
                               KEYS_FIRST=keys_first)
    ours = philox.keep_mask(seed, p, first_row + torch.arange(32), first_col + torch.arange(16), torch.tensor(bh))
    assert torch.equal(keep.cpu().bool(), ours.T if keys_first else ours)


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
