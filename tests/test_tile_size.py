"""tile_size: the caller's square tiles reach the portable kernels (and the PyTorch path's loops),
forward and backward, with the same results; bad values are refused before anything runs."""
import math

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from errors import assert_within_factor
from flashattn import BlockMask, flash_attn_func, flash_attn_varlen_func
from flashattn.ops import reference
from flashattn.ops.reference import attention_standard
from flashattn.ops.triton import backward, forward

DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16


def _spy(monkeypatch, module, name, position=None):
    """Record the tile sides each call of module.name receives: the BLOCK_M / BLOCK_N keywords of a
    kernel launch, or the positional (block_m, block_n) at `position` of a PyTorch-path function."""
    seen = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        seen.append(tuple(args[position:position + 2]) if position is not None
                    else (kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return seen


@pytest.mark.parametrize("tile", [16, 32, 64])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_tiles_reach_the_kernels_and_keep_the_results(backend, tile, use_backend, monkeypatch):
    use_backend(backend)
    torch.manual_seed(0)
    q = torch.randn(1, 70, 4, 40, device=DEVICE, dtype=DTYPE)
    k = torch.randn(1, 90, 2, 40, device=DEVICE, dtype=DTYPE)
    v = torch.randn_like(k)
    if backend == "triton":
        fwd, bwd = _spy(monkeypatch, forward, "_launch_fwd"), _spy(monkeypatch, backward, "_launch_bwd")
    else:
        fwd = _spy(monkeypatch, reference, "flash_attention_forward", position=5)
        bwd = _spy(monkeypatch, reference, "flash_attention_backward", position=9)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flash_attn_func(*leaves, causal=True, tile_size=tile)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    assert fwd and all(seen == (tile, tile) for seen in fwd), fwd
    assert bwd and all(seen == (tile, tile) for seen in bwd), bwd
    results = []
    for ref_dtype in (torch.float64, DTYPE):
        ref_leaves = [x.to(ref_dtype).requires_grad_() for x in (q, k, v)]
        ref_out, _ = attention_standard(*ref_leaves, 1 / math.sqrt(40), True)
        results.append((ref_out, *torch.autograd.grad(ref_out, ref_leaves, do.to(ref_dtype))))
    for name, ours, same, r64 in zip(("out", "dq", "dk", "dv"), (out, *grads), results[1], results[0]):
        assert_within_factor(name, ours, same, r64, DTYPE, 40)


def test_varlen_takes_it_too(use_backend, monkeypatch):
    use_backend("triton")
    seen = _spy(monkeypatch, forward, "_launch_fwd")
    q = torch.randn(30, 2, 32, device=DEVICE, dtype=DTYPE)
    cu = torch.tensor([0, 12, 30], dtype=torch.int32, device=DEVICE)
    out = flash_attn_varlen_func(q, q, q, cu, cu, 18, 18, tile_size=16)
    assert out.shape == q.shape and seen and all(s == (16, 16) for s in seen)


def test_bad_tile_sizes_are_refused():
    q = torch.randn(1, 8, 2, 16, device=DEVICE, dtype=DTYPE)
    for bad in (0, 48, 512, 32.0, True):
        with pytest.raises(ValueError, match="tile_size must be None"):
            flash_attn_func(q, q, q, tile_size=bad)
    mask = BlockMask.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE), 16)
    with pytest.raises(ValueError, match="larger than the block mask's blocks"):
        flash_attn_func(q, q, q, block_mask=mask, tile_size=32)
