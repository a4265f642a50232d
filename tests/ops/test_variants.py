"""Attention variants: dropout, sliding window, softcap, ALiBi, bias and bool masks, block-sparse,
deterministic; alone, in every pair, and all at once.

The matrix is built from the kernels' declarations (flashattn/ops/capabilities.py): every option a
backend declares is tested alone and paired with every other option it declares (causal and GQA
included), forward, LSE and gradients (q, k, v, and the bias when it requires grad), against the
float64 dense reference (attention_standard, differentiated by autograd) with the error rule of
tests/errors.py. When the Triton kernels declare a feature, their cases appear here by themselves.
The other tests pin down each option's exact semantics.
"""
from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

import flashattn
from errors import assert_within_factor
from shapes import Shape, random_inputs as _inputs
from flashattn import (BlockMask, butterfly_block_mask, flash_attn_func, flash_attn_kvpacked_func,
                       flash_attn_qkvpacked_func, local_global_block_mask, strided_block_mask)
from flashattn.ops import capabilities, philox, reference
from flashattn.ops.reference import attention_standard
from flashattn.ops.variant import Variant

from conftest import DEVICE, HAS_CUDA

Tensor = torch.Tensor

# Everything but causal and GQA, which tests/ops/test_attention.py covers on their own.
VARIANTS = tuple(f for f in capabilities.ALL_FEATURES if f not in ("causal", "gqa"))
# Options that share an argument cannot be requested together (a float bias carries a mask as -inf;
# see test_float_bias_with_minus_inf_masks).
EXCLUSIVE = {frozenset({"bias", "mask"})}


def _shape(backend: str, gqa: bool) -> Shape:
    """Odd sizes, seqlen_q != seqlen_k. The PyTorch path's tiles are 128 x 128 (32 x 32 with the
    block masks below), so these cross several; the interpreter runs the Triton kernels smaller."""
    if backend == "triton" and not HAS_CUDA:
        return Shape(1, 40, 57, 2, 1 if gqa else 2, 32)
    return Shape(2, 150, 270, 4, 2 if gqa else 4, 40)


def _dtypes(spec: capabilities.KernelSpec) -> list[torch.dtype]:
    dtypes = list(spec.dtypes)
    if spec.name == "triton" and not HAS_CUDA:
        # The interpreter's tl.dot gives wrong results on bf16 operands: bf16 is tested on the GPU.
        dtypes.remove(torch.bfloat16)
    return dtypes


def _combos(spec: capabilities.KernelSpec) -> list[tuple[str, ...]]:
    declared = [f for f in capabilities.ALL_FEATURES if f in spec.features]
    combos = [(f,) for f in declared if f in VARIANTS]
    combos += [pair for pair in itertools.combinations(declared, 2)
               if set(pair) & set(VARIANTS) and frozenset(pair) not in EXCLUSIVE]
    return combos


def _cases():
    marks = [pytest.mark.gpu] if HAS_CUDA else []
    for spec in capabilities.KERNELS.values():
        for dtype in _dtypes(spec):
            for combo in _combos(spec):
                name = f"{spec.name}-{str(dtype)[6:]}-{'+'.join(combo)}"
                yield pytest.param(spec.name, dtype, combo, id=name, marks=marks)


def _random_block_mask(shape: Shape, block_size: int, per_head: bool, density: float = 0.6) -> BlockMask:
    nq, nk = -(-shape.seqlen_q // block_size), -(-shape.seqlen_k // block_size)
    dims = (shape.batch, shape.nheads) if per_head else (1, 1)
    return BlockMask.from_dense(torch.rand(*dims, nq, nk, device=DEVICE) < density, block_size)


def _options(combo: tuple[str, ...], shape: Shape, dtype: torch.dtype) -> tuple[dict, Tensor | None]:
    """flash_attn_func's keyword arguments for the options in `combo` (attention_standard takes the
    same ones), and the float bias (requires grad) when there is one."""
    b, sq, sk, h = shape.batch, shape.seqlen_q, shape.seqlen_k, shape.nheads
    kwargs, bias = {}, None
    for feature in combo:
        if feature == "causal":
            kwargs["causal"] = True
        elif feature == "dropout":
            kwargs["dropout_p"] = 0.17
        elif feature == "window":
            kwargs["window_size"] = (sk // 6, sk // 14)
        elif feature == "softcap":
            kwargs["softcap"] = 1.5
        elif feature == "alibi":
            # (nheads,) on some dtypes, (batch, nheads) on others: both layouts are covered.
            dims = (h,) if dtype in (torch.float16, torch.float64) else (b, h)
            kwargs["alibi_slopes"] = torch.rand(*dims, device=DEVICE) * 0.2 + 0.01
        elif feature == "bias":
            bias = torch.randn(b, 1, sq, sk, device=DEVICE, dtype=dtype)   # broadcast over heads
        elif feature == "mask":
            mask = torch.rand(1, h, sq, sk, device=DEVICE) > 0.25
            mask[..., 3, :] = False                                      # a row that sees nothing
            kwargs["attn_bias"] = mask
        elif feature == "block_sparse":
            kwargs["block_mask"] = _random_block_mask(shape, 16 if sq < 64 else 32, per_head=True)
        elif feature == "deterministic":
            kwargs["deterministic"] = True
    return kwargs, bias


def _run_standard(q, k, v, do, bias, kwargs, dtype, keep):
    """attention_standard on copies in `dtype`: (out, lse, dq, dk, dv[, dbias])."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    kwargs = {name: value for name, value in kwargs.items() if name != "deterministic"}
    if bias is not None:
        leaves.append(bias.detach().to(dtype).requires_grad_())
        kwargs["attn_bias"] = leaves[-1]
    out, lse = attention_standard(*leaves[:3], 1.0 / math.sqrt(q.shape[-1]), dropout_mask=keep, **kwargs)
    return (out, lse, *torch.autograd.grad(out, leaves, do.to(dtype)))


@pytest.mark.parametrize("backend, dtype, combo", list(_cases()))
def test_variants_match_float64_reference(backend, dtype, combo, use_backend):
    use_backend(backend)
    torch.manual_seed(0)
    shape = _shape(backend, "gqa" in combo)
    q, k, v, do = _inputs(shape, dtype)
    kwargs, bias = _options(combo, shape, dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    if bias is not None:
        leaves.append(bias.clone().requires_grad_())
        kwargs["attn_bias"] = leaves[-1]
    out, lse, probs = flash_attn_func(*leaves[:3], return_attn_probs=True, **kwargs)
    grads = torch.autograd.grad(out, leaves, do)
    keep = ~torch.signbit(probs) if "dropout" in combo else None  # the exact mask the kernel used

    ref64 = _run_standard(q, k, v, do, bias, kwargs, torch.float64, keep)
    same = _run_standard(q, k, v, do, bias, kwargs, dtype, keep)
    names = ("out", "lse", "dq", "dk", "dv") + (("dbias",) if bias is not None else ())
    for name, ours, s, r in zip(names, (out, lse, *grads), same, ref64):
        assert ours.shape == r.shape
        assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) if name == "lse" \
            else ours.dtype == dtype
        assert_within_factor(name, ours, s, r, dtype, shape.head_dim)


# ------------------------------------------------------------------------------------------------
# Every option at once, and the properties that hold with all of them.
# ------------------------------------------------------------------------------------------------

REFERENCE_DTYPES = list(capabilities.REFERENCE.dtypes)
SHAPE = Shape(2, 150, 270, 4, 2, 40)


def _every_option(shape: Shape, dtype: torch.dtype, dropout_p: float = 0.2):
    """Every option (the float bias carries a -inf mask, and one fully masked row)."""
    bias = torch.randn(shape.nheads, 1, shape.seqlen_k, device=DEVICE, dtype=dtype)
    bias = bias.expand(shape.nheads, shape.seqlen_q, shape.seqlen_k).clone()
    bias[:, 5, :] = float("-inf")
    bias[1, :, 7] = float("-inf")
    kwargs = dict(dropout_p=dropout_p, causal=True, window_size=(90, 3), softcap=2.0,
                  alibi_slopes=torch.rand(shape.batch, shape.nheads, device=DEVICE) * 0.1,
                  block_mask=local_global_block_mask(shape.seqlen_q, shape.seqlen_k, local_blocks=2,
                                                     global_blocks=1, block_size=32, device=DEVICE),
                  deterministic=True)
    return kwargs, bias


@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=lambda d: str(d)[6:])
def test_every_option_at_once(dtype, use_backend):
    use_backend("reference")
    torch.manual_seed(1)
    q, k, v, do = _inputs(SHAPE, dtype)
    kwargs, bias = _every_option(SHAPE, dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
    out, lse, probs = flash_attn_func(*leaves[:3], return_attn_probs=True, attn_bias=leaves[3], **kwargs)
    grads = torch.autograd.grad(out, leaves, do)
    keep = ~torch.signbit(probs)
    ref64 = _run_standard(q, k, v, do, bias, kwargs, torch.float64, keep)
    same = _run_standard(q, k, v, do, bias, kwargs, dtype, keep)
    for name, ours, s, r in zip(("out", "lse", "dq", "dk", "dv", "dbias"), (out, lse, *grads), same, ref64):
        assert_within_factor(name, ours, s, r, dtype, SHAPE.head_dim)
    assert (out[:, 5] == 0).all() and (lse[:, :, 5] == float("inf")).all()   # the row that sees nothing
    assert (grads[3][:, 5] == 0).all()


def test_backward_is_bitwise_reproducible_with_every_option(use_backend):
    use_backend("reference")
    q, k, v, do = _inputs(SHAPE, torch.float16)
    kwargs, bias = _every_option(SHAPE, torch.float16)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)                                   # the same dropout seed
        leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
        out = flash_attn_func(*leaves[:3], attn_bias=leaves[3], **kwargs)
        runs.append((out, *torch.autograd.grad(out, leaves, do)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_attn_probs_reconstruct_the_output(use_backend):
    """return_attn_probs: the probabilities after every option, dropped entries negated;
    O = (kept probs / (1 - p)) V and each row that sees a key sums to 1."""
    use_backend("reference")
    torch.manual_seed(4)
    dtype, p = torch.float64, 0.2
    q, k, v, _ = _inputs(SHAPE, dtype)
    kwargs, bias = _every_option(SHAPE, dtype, dropout_p=p)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, attn_bias=bias, **kwargs)
    assert probs.shape == (SHAPE.batch, SHAPE.nheads, SHAPE.seqlen_q, SHAPE.seqlen_k)
    assert probs.dtype == torch.float64
    kept = torch.where(torch.signbit(probs), 0.0, probs) / (1 - p)
    v_heads = v.repeat_interleave(SHAPE.nheads // SHAPE.nheads_k, dim=2).transpose(1, 2)
    torch.testing.assert_close(kept @ v_heads, out.transpose(1, 2), atol=1e-12, rtol=1e-12)
    sums = probs.abs().sum(-1)
    seen = torch.isfinite(lse)
    torch.testing.assert_close(sums[seen], torch.ones_like(sums[seen]))
    assert (sums[~seen] == 0).all()


# ------------------------------------------------------------------------------------------------
# Dropout.
# ------------------------------------------------------------------------------------------------

DROPOUT_BACKENDS = [s.name for s in capabilities.KERNELS.values() if "dropout" in s.features]


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_dropout_uses_the_documented_philox_mask(backend, use_backend):
    """The output is dense attention with exactly the Philox mask of the drawn seed: counters
    (j, i, b * nheads + h, 0), the seed one torch.randint on the default CPU generator."""
    use_backend(backend)
    shape = Shape(2, 33, 70, 4, 2, 16)
    q, k, v, do = _inputs(shape, torch.float64 if backend == "reference" else torch.float32)
    torch.manual_seed(10)
    seed = philox.draw_seed().item()
    keep = philox.dropout_keep_mask(seed, 0.4, 2, 4, 33, 70, DEVICE)
    torch.manual_seed(10)
    out, _, probs = flash_attn_func(q, k, v, 0.4, return_attn_probs=True)
    assert torch.equal(~torch.signbit(probs), keep)
    ref, _ = attention_standard(q, k, v, 0.25, dropout_p=0.4, dropout_mask=keep)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_dropout_seed_reproducible_and_fresh_per_call(backend, use_backend):
    use_backend(backend)
    shape = Shape(1, 64, 64, 2, 2, 16)
    q, k, v, do = _inputs(shape, torch.float32)

    def run():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, _, probs = flash_attn_func(*leaves, 0.5, return_attn_probs=True)
        return (out, *torch.autograd.grad(out, leaves, do)), torch.signbit(probs)

    torch.manual_seed(7)
    first, mask_first = run()
    second, mask_second = run()                      # the next call: a fresh mask
    torch.manual_seed(7)
    again, mask_again = run()                        # the same seed: the same everything
    assert torch.equal(mask_first, mask_again)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    differ = (mask_first != mask_second).float().mean().item()
    assert 0.4 < differ < 0.6                         # independent masks differ in 2 p (1 - p) = 1/2


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(backend, p, use_backend):
    """The kept fraction is 1 - p within 5 standard deviations (fixed seed: deterministic)."""
    use_backend(backend)
    shape = Shape(2, 128, 128, 4, 4, 8)
    q, k, v, _ = _inputs(shape, torch.float32)
    torch.manual_seed(8)
    _, _, probs = flash_attn_func(q, k, v, p, return_attn_probs=True)
    kept = (~torch.signbit(probs)).float()
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------------------------------------
# Sliding window and the tiles the loops visit.
# ------------------------------------------------------------------------------------------------

def _count_tiles(monkeypatch) -> list[tuple[int, int]]:
    """Record the (start_m, start_n) of every tile whose scores the PyTorch path computes."""
    visited = []
    original = reference._tile_scores

    def counting(q_i, k_j, softmax_scale, variant, grp, start_m, start_n, offset):
        visited.append((start_m, start_n))
        return original(q_i, k_j, softmax_scale, variant, grp, start_m, start_n, offset)

    monkeypatch.setattr(reference, "_tile_scores", counting)
    return visited


def _band_tiles(sq: int, sk: int, left: int, right: int, bm: int, bn: int) -> set[tuple[int, int]]:
    """Brute force: the tiles that hold at least one allowed (i, j) of the window."""
    allowed = reference.window_mask(torch.arange(sq), torch.arange(sk), sk - sq, left, right)
    return {(m, n) for m in range(0, sq, bm) for n in range(0, sk, bn) if allowed[m:m + bm, n:n + bn].any()}


WINDOWS = [(8, 8), (0, 0), (20, -1), (-1, 5), (-1, 0), (3, 40), (-1, -1)]
LENGTHS = [(256, 256), (100, 157), (157, 100)]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
@pytest.mark.parametrize("sq, sk", LENGTHS, ids=lambda n: str(n))
def test_window_visits_only_tiles_in_the_band(window, sq, sk, monkeypatch):
    """Forward and backward compute exactly the tiles that meet the band, each once."""
    left, right = window
    variant = Variant(causal=right == 0, window_left=left, window_right=right)
    q = torch.randn(1, sq, 1, 8, dtype=torch.float64)
    k = torch.randn(1, sk, 1, 8, dtype=torch.float64)
    visited = _count_tiles(monkeypatch)
    out, lse = reference.flash_attention_forward(q, k, k, 0.3, variant, block_m=16, block_n=32)
    expected = _band_tiles(sq, sk, left, right, 16, 32)
    assert len(visited) == len(set(visited)) and set(visited) == expected
    visited.clear()
    reference.flash_attention_backward(out, q, k, k, out, lse, 0.3, variant, block_m=16, block_n=32)
    assert len(visited) == len(set(visited)) and set(visited) == expected
    ref, ref_lse = attention_standard(q, k, k, 0.3, window_size=window)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_window_cost_is_linear_in_seqlen(monkeypatch):
    visited = _count_tiles(monkeypatch)
    counts = []
    variant = Variant(window_left=32, window_right=32)
    for n in (256, 512, 1024):
        visited.clear()
        x = torch.zeros(1, n, 1, 4)
        reference.flash_attention_forward(x, x, x, 1.0, variant, block_m=32, block_n=32)
        counts.append(len(visited))
    assert counts[1] / counts[0] < 2.1 and counts[2] / counts[1] < 2.1
    assert counts[2] < 1024 // 32 * 4                   # at most 4 key tiles per query tile, not 32


@pytest.mark.parametrize("sq, sk", [(37, 37), (20, 45), (45, 20)], ids=str)
def test_window_ranges_are_tight(sq, sk):
    """key_range / query_range are exactly the span of the allowed keys / queries of a block."""
    for left, right in [(-1, -1), (-1, 0), (0, 0), (3, 7), (10, -1), (-1, 2), (50, 50)]:
        variant = Variant(window_left=left, window_right=right)
        allowed = reference.window_mask(torch.arange(sq), torch.arange(sk), sk - sq, left, right)
        for block in (1, 4, 16):
            for start in range(0, sq, block):
                cols = allowed[start:start + block].any(0).nonzero()
                lo, hi = variant.key_range(start, block, sq, sk)
                assert (lo, hi) == ((cols.min().item(), cols.max().item() + 1) if len(cols) else (lo, lo))
            for start in range(0, sk, block):
                rows = allowed[:, start:start + block].any(1).nonzero()
                lo, hi = variant.query_range(start, block, sq, sk)
                assert (lo, hi) == ((rows.min().item(), rows.max().item() + 1) if len(rows) else (lo, lo))


def test_causal_folds_into_the_window(use_backend):
    """causal=True sets window_size's right bound to 0, and window_size=(-1, 0) is causal."""
    use_backend("reference")
    q, k, v, _ = _inputs(Shape(1, 50, 70, 2, 2, 16), torch.float32)
    assert torch.equal(flash_attn_func(q, k, v, causal=True, window_size=(9, 30)),
                       flash_attn_func(q, k, v, window_size=(9, 0)))
    assert torch.equal(flash_attn_func(q, k, v, window_size=(-1, 0)), flash_attn_func(q, k, v, causal=True))


def test_window_rows_that_see_no_key(use_backend):
    """window (0, 0) with seqlen_q > seqlen_k: the first rows' diagonal is left of key 0."""
    use_backend("reference")
    q, k, v, _ = _inputs(Shape(1, 30, 20, 1, 1, 8), torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse, _ = flash_attn_func(*leaves, window_size=(0, 0), return_attn_probs=True)
    assert (out[:, :10] == 0).all() and (lse[:, :, :10] == float("inf")).all()
    torch.testing.assert_close(out[:, 10:], v)        # each other row sees exactly its own key
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


# ------------------------------------------------------------------------------------------------
# Softcap and ALiBi.
# ------------------------------------------------------------------------------------------------

def test_softcap_with_saturated_scores(use_backend):
    """Large scores: tanh saturates, the gradient through it vanishes smoothly, no NaN."""
    use_backend("reference")
    torch.manual_seed(5)
    q, k, v, do = _inputs(Shape(1, 40, 50, 2, 1, 16), torch.float64)
    q = q * 20
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flash_attn_func(*leaves, softcap=3.0)
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref, _ = attention_standard(*ref_leaves, 0.25, softcap=3.0)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_alibi_is_the_documented_bias(use_backend):
    """alibi_slopes == the float bias -slope * |i + seqlen_k - seqlen_q - j|; (nheads,) == the same
    slopes repeated over the batch."""
    use_backend("reference")
    shape = Shape(2, 30, 47, 3, 3, 16)
    q, k, v, _ = _inputs(shape, torch.float64)
    slopes = torch.tensor([0.5, 0.25, 0.125], device=DEVICE)
    i = torch.arange(30, device=DEVICE)[:, None]
    j = torch.arange(47, device=DEVICE)[None, :]
    bias = -slopes[:, None, None].double() * (i + 47 - 30 - j).abs()
    out = flash_attn_func(q, k, v, alibi_slopes=slopes, causal=True)
    torch.testing.assert_close(out, flash_attn_func(q, k, v, attn_bias=bias, causal=True))
    assert torch.equal(out, flash_attn_func(q, k, v, alibi_slopes=slopes.expand(2, 3).contiguous(), causal=True))


# ------------------------------------------------------------------------------------------------
# Bias and bool masks.
# ------------------------------------------------------------------------------------------------

BIAS_SHAPES = [(), (47,), (30, 47), (3, 1, 47), (2, 1, 30, 1), (2, 3, 30, 47), (1, 3, 30, 47)]


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_bias_broadcasts_and_gets_its_gradient(bias_shape, use_backend):
    use_backend("reference")
    torch.manual_seed(6)
    shape = Shape(2, 30, 47, 3, 1, 16)
    q, k, v, do = _inputs(shape, torch.float64)
    bias = torch.randn(bias_shape, dtype=torch.float64, device=DEVICE)

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
        out = fn(leaves)
        return (out, *torch.autograd.grad(out, leaves, do))

    ours = run(lambda t: flash_attn_func(*t[:3], causal=True, attn_bias=t[3]))
    ref = run(lambda t: attention_standard(*t[:3], 0.25, True, attn_bias=t[3])[0])
    assert ours[-1].shape == bias.shape
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_bias_is_never_expanded(monkeypatch, use_backend):
    """The backend gets a view of the user's tensor with size-1 dims (read with stride 0)."""
    use_backend("reference")
    seen = []
    original = reference.flash_attention_forward

    def spy(q, k, v, softmax_scale, variant, *args, **kwargs):
        seen.append(variant)
        return original(q, k, v, softmax_scale, variant, *args, **kwargs)

    monkeypatch.setattr(reference, "flash_attention_forward", spy)
    q, k, v, _ = _inputs(Shape(2, 30, 47, 3, 3, 16), torch.float32)
    bias = torch.randn(47, device=DEVICE)
    flash_attn_func(q, k, v, attn_bias=bias)
    (variant,) = seen
    assert variant.bias.shape == (1, 1, 1, 47) and variant.bias.data_ptr() == bias.data_ptr()
    view = reference._broadcast_view(variant.bias, 2, 3, 1, 30, 47)
    assert view.stride()[:4] == (0, 0, 0, 0) and view.data_ptr() == bias.data_ptr()


def test_float32_bias_with_half_inputs(use_backend):
    use_backend("reference")
    q, k, v, _ = _inputs(Shape(1, 30, 47, 2, 2, 16), torch.float16)
    bias = torch.randn(30, 47, device=DEVICE, requires_grad=True)
    out = flash_attn_func(q, k, v, attn_bias=bias)
    out.float().sum().backward()
    assert out.dtype == torch.float16 and bias.grad.dtype == torch.float32
    ref, _ = attention_standard(q.double(), k.double(), v.double(), 0.25, attn_bias=bias.detach().double())
    assert (out.double() - ref).abs().max() < 2e-3


def test_float_bias_with_minus_inf_masks(use_backend):
    """-inf in a float bias masks like False in a bool mask, fully masked rows included."""
    use_backend("reference")
    q, k, v, do = _inputs(Shape(2, 30, 47, 2, 2, 16), torch.float64)
    mask = torch.rand(2, 1, 30, 47, device=DEVICE) > 0.5
    mask[:, :, 4] = False
    bias = torch.zeros(mask.shape, dtype=torch.float64, device=DEVICE).masked_fill(~mask, float("-inf"))
    bias.requires_grad_()
    out_bias, lse_bias, _ = flash_attn_func(q, k, v, attn_bias=bias, return_attn_probs=True)
    out_mask, lse_mask, _ = flash_attn_func(q, k, v, attn_bias=mask, return_attn_probs=True)
    torch.testing.assert_close(out_bias, out_mask)
    assert torch.equal(lse_bias.isinf(), lse_mask.isinf()) and (lse_mask[:, :, 4] == float("inf")).all()
    assert (out_mask[:, 4] == 0).all()
    out_bias.backward(do)
    assert torch.isfinite(bias.grad).all() and (bias.grad[~mask.expand_as(bias)] == 0).all()


# ------------------------------------------------------------------------------------------------
# Block-sparse attention and the pattern helpers.
# ------------------------------------------------------------------------------------------------

def _check_index_lists(bm: BlockMask) -> None:
    """kv_indices / q_indices list exactly the True blocks of each row / column, ascending, first."""
    mask = bm.mask.cpu()
    for lists, counts, dense in ((bm.kv_indices, bm.kv_num_blocks, mask),
                                 (bm.q_indices, bm.q_num_blocks, mask.transpose(-1, -2))):
        assert lists.dtype == counts.dtype == torch.int32
        for idx in itertools.product(*map(range, dense.shape[:3])):
            listed = dense[idx].nonzero().flatten()
            assert counts[idx].item() == len(listed)
            assert torch.equal(lists[idx][:len(listed)].cpu().long(), listed)


def _butterfly_rule(r, c):
    """r == c, or r and c differ in exactly one bit."""
    x = r ^ c
    rule = x == 0
    for s in range(12):
        rule = rule | (x == 2 ** s)
    return rule


PATTERNS = {
    "local_global": (lambda sq, sk: local_global_block_mask(sq, sk, local_blocks=1, global_blocks=1, block_size=16),
                     lambda r, c: ((r - c).abs() <= 1) | (c < 1) | (r < 1)),
    "local_global_causal": (lambda sq, sk: local_global_block_mask(sq, sk, local_blocks=2, global_blocks=2,
                                                                   causal=True, block_size=16),
                            lambda r, c: (((r - c).abs() <= 2) | (c < 2) | (r < 2)) & (c <= r)),
    "strided": (lambda sq, sk: strided_block_mask(sq, sk, stride=3, block_size=16),
                lambda r, c: (r - c) % 3 == 0),
    "strided_local_causal": (lambda sq, sk: strided_block_mask(sq, sk, stride=4, local_blocks=1, causal=True,
                                                               block_size=32),
                             lambda r, c: (((r - c) % 4 == 0) | ((r - c).abs() <= 1)) & (c <= r)),
    "butterfly": (lambda sq, sk: butterfly_block_mask(sq, sk, block_size=16), _butterfly_rule),
    "butterfly_global_causal": (lambda sq, sk: butterfly_block_mask(sq, sk, global_blocks=1, causal=True,
                                                                    block_size=16),
                                lambda r, c: (_butterfly_rule(r, c) | (r < 1) | (c < 1)) & (c <= r)),
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("sq, sk", [(100, 140), (161, 97)], ids=str)
def test_pattern_helpers_equal_their_element_masks(pattern, sq, sk):
    build, rule = PATTERNS[pattern]
    bm = build(sq, sk)
    bs = bm.block_size
    rows = torch.arange(sq)[:, None] // bs
    cols = torch.arange(sk)[None, :] // bs
    assert bm.shape == (1, 1, -(-sq // bs), -(-sk // bs))
    assert torch.equal(bm.element_mask(sq, sk)[0, 0], rule(rows, cols))
    _check_index_lists(bm)


def test_butterfly_has_log_many_blocks_per_row():
    bm = butterfly_block_mask(64 * 16, 64 * 16, block_size=16)
    assert (bm.kv_num_blocks == 1 + 6).all() and (bm.q_num_blocks == 7).all()
    assert abs(bm.density() - 7 / 64) < 1e-9


def test_block_masks_combine():
    a = local_global_block_mask(100, 100, local_blocks=0, block_size=16)
    b = strided_block_mask(100, 100, stride=2, block_size=16)
    assert torch.equal((a | b).mask, a.mask | b.mask) and torch.equal((a & b).mask, a.mask & b.mask)
    _check_index_lists(a | b)
    with pytest.raises(ValueError, match="block sizes 16 and 32"):
        a | strided_block_mask(100, 100, stride=2, block_size=32)


@pytest.mark.parametrize("build, error, words", [
    (lambda: BlockMask.from_dense(torch.ones(2, 2)), TypeError, "bool tensor"),
    (lambda: BlockMask.from_dense([[True]]), TypeError, "torch.Tensor"),
    (lambda: BlockMask.from_dense(torch.ones(1, 2, 2, dtype=torch.bool)), ValueError, "got (1, 2, 2)"),
    (lambda: BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool), block_size=24), ValueError,
     "power of two >= 16, got 24"),
    (lambda: BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool), block_size=8), ValueError, "got 8"),
    (lambda: strided_block_mask(10, 10, stride=0), ValueError, "stride must be an int >= 1"),
    (lambda: local_global_block_mask(10, 10, local_blocks=-1), ValueError, "local_blocks"),
    (lambda: butterfly_block_mask(-1, 10), ValueError, "seqlen_q"),
], ids=["not-bool", "not-tensor", "three-dims", "block-size-24", "block-size-8", "stride-0",
        "local-negative", "seqlen-negative"])
def test_block_mask_validation(build, error, words):
    with pytest.raises(error, match=re.escape(words)):
        build()


BLOCK_SPARSE_BACKENDS = [s.name for s in capabilities.KERNELS.values() if "block_sparse" in s.features]


@pytest.mark.parametrize("backend", BLOCK_SPARSE_BACKENDS)
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_block_sparse_equals_dense_with_the_element_mask(backend, per_head, causal, use_backend):
    """Identical (to float64 rounding; to fp32 rounding for the Triton kernels, which take no float64)
    to attention with the equivalent element mask, given as a bool attn_bias; gradients too. GQA,
    partial last blocks, empty block rows."""
    use_backend(backend)
    torch.manual_seed(9)
    small = backend == "triton" and not HAS_CUDA            # the interpreter: a smaller problem
    shape = Shape(1, 70, 90, 4, 2, 16) if small else Shape(2, 100, 140, 4, 2, 16)
    dtype, tol = (torch.float64, 1e-12) if backend == "reference" else (torch.float32, 2e-5)
    q, k, v, do = _inputs(shape, dtype)
    bm = _random_block_mask(shape, 16, per_head, density=0.4)
    bm.mask[..., 0, :] = False                                  # a query block that sees nothing
    bm = BlockMask.from_dense(bm.mask, 16)

    def run(**kwargs):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse, _ = flash_attn_func(*leaves, causal=causal, return_attn_probs=True, **kwargs)
        return (out, lse, *torch.autograd.grad(out, leaves, do))

    sparse = run(block_mask=bm)
    dense = run(attn_bias=bm.element_mask(shape.seqlen_q, shape.seqlen_k))
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert (sparse[0][:, :16] == 0).all()


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_block_sparse_visits_only_listed_blocks(per_head, monkeypatch):
    shape = Shape(2, 100, 140, 4, 2, 8)
    torch.manual_seed(12)
    bm = _random_block_mask(shape, 16, per_head, density=0.25)
    variant = Variant(block_mask=bm)
    q, k, v, _ = _inputs(shape, torch.float64)
    visited = _count_tiles(monkeypatch)
    out, lse = reference.flash_attention_forward(q, k, v, 0.3, variant)
    assert len(visited) == bm.mask.sum().item()
    visited.clear()
    reference.flash_attention_backward(out, q, k, v, out, lse, 0.3, variant)
    assert len(visited) == bm.mask.sum().item()


def test_block_sparse_with_window_skips_both(monkeypatch):
    """A tile is visited only if it is listed and meets the band."""
    bm = local_global_block_mask(256, 256, local_blocks=3, global_blocks=1, block_size=16)
    variant = Variant(causal=True, window_left=40, window_right=0, block_mask=bm)
    x = torch.randn(1, 256, 1, 8, dtype=torch.float64)
    visited = _count_tiles(monkeypatch)
    reference.flash_attention_forward(x, x, x, 0.3, variant)
    band = _band_tiles(256, 256, 40, 0, 16, 16)
    listed = {(r * 16, c * 16) for r, c in bm.mask[0, 0].nonzero().tolist()}
    assert set(visited) == band & listed and len(visited) == len(band & listed)


# ------------------------------------------------------------------------------------------------
# The packed functions pass the new options through.
# ------------------------------------------------------------------------------------------------

def test_packed_functions_take_bias_and_block_mask(use_backend):
    use_backend("reference")
    q, k, v, _ = _inputs(Shape(1, 40, 40, 2, 2, 16), torch.float32)
    bias = torch.randn(2, 40, 40, device=DEVICE)
    bm = strided_block_mask(40, 40, stride=2, block_size=16, device=DEVICE)
    ref = flash_attn_func(q, k, v, causal=True, attn_bias=bias, block_mask=bm)
    qkv = torch.stack([q, k, v], dim=2)
    assert torch.equal(flash_attn_qkvpacked_func(qkv, causal=True, attn_bias=bias, block_mask=bm), ref)
    kv = torch.stack([k, v], dim=2)
    assert torch.equal(flash_attn_kvpacked_func(q, kv, causal=True, attn_bias=bias, block_mask=bm), ref)
    assert flashattn.BlockMask is BlockMask
