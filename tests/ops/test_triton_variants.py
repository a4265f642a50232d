"""The Triton kernels' options where the generated matrix (test_variants.py) does not reach: the tiles the
loops visit (window band, block-mask walk), block sizes against the kernels' tile sizes, reads past the
end of strided inputs and biases, the exact dropout mask, every broadcast of the bias gradient, and
bitwise reproducibility with every option.

Without CUDA the kernels run under Triton's interpreter (tiles 32 x 16 forward, configs.INTERPRETER)
at small sizes; with CUDA the same tests run compiled.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from errors import assert_within_factor, summation_rounding  # noqa: E402
from shapes import Shape, random_inputs as _inputs  # noqa: E402
from flashattn import BlockMask, flash_attn_func, local_global_block_mask  # noqa: E402
from flashattn.ops import philox, reference  # noqa: E402
from flashattn.ops.reference import attention_standard  # noqa: E402
from flashattn.ops.triton import backward as triton_backward  # noqa: E402
from flashattn.ops.triton import common, configs  # noqa: E402
from flashattn.ops.triton import forward as triton_forward  # noqa: E402
from flashattn.ops.variant import Variant  # noqa: E402

from conftest import DEVICE, HAS_CUDA  # noqa: E402

Tensor = torch.Tensor
SHAPE = Shape(1, 40, 57, 2, 1, 32) if not HAS_CUDA else Shape(2, 333, 517, 8, 2, 128)


@pytest.fixture(autouse=True)
def _triton(use_backend):
    use_backend("triton")


def _grads(q, k, v, do, bias=None, **kwargs):
    """out, lse and the gradients (q, k, v[, bias]) of flash_attn_func."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    if bias is not None:
        leaves.append(bias.clone().requires_grad_())
        kwargs["attn_bias"] = leaves[-1]
    out, lse, _ = flash_attn_func(*leaves[:3], return_attn_probs=True, **kwargs)
    return (out, lse, *torch.autograd.grad(out, leaves, do))


def _standard(q, k, v, do, dtype, bias=None, keep=None, **kwargs):
    """attention_standard in `dtype`: out, lse and the gradients (q, k, v[, bias])."""
    kwargs = {name: value for name, value in kwargs.items() if name != "deterministic"}
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    if bias is not None:
        leaves.append(bias.detach().to(dtype).requires_grad_())
        kwargs["attn_bias"] = leaves[-1]
    out, lse = attention_standard(*leaves[:3], 1.0 / math.sqrt(q.shape[-1]), dropout_mask=keep, **kwargs)
    return (out, lse, *torch.autograd.grad(out, leaves, do.to(dtype)))


def _check_against_reference(shape, dtype, bias=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    q, k, v, do = _inputs(shape, dtype)
    torch.manual_seed(seed + 1)
    ours = _grads(q, k, v, do, bias, **kwargs)
    keep = None
    if kwargs.get("dropout_p", 0.0) > 0.0:
        torch.manual_seed(seed + 1)                     # the same seed draw as the call above
        seed_value = philox.draw_seed().item()
        keep = philox.dropout_keep_mask(seed_value, kwargs["dropout_p"], shape.batch, shape.nheads,
                                        shape.seqlen_q, shape.seqlen_k, DEVICE)
    ref64 = _standard(q, k, v, do, torch.float64, bias, keep, **kwargs)
    same = _standard(q, k, v, do, dtype, bias, keep, **kwargs)
    reduction = 0.0
    full = (shape.batch, shape.nheads, shape.seqlen_q, shape.seqlen_k)
    if bias is not None and bias.numel() < math.prod(full):
        # A broadcast bias's gradient sums dS over many entries, whose exact sum is often ~0 (a row
        # of dS sums to 0): what is left is the rounding of the fp32 sum, which grows like sqrt(n)
        # and depends on the order of the additions (atomics, tiles), not on the dtype's rounding.
        ds64 = _standard(q, k, v, do, torch.float64, bias.expand(full).clone(), keep, **kwargs)[-1]
        reduction = summation_rounding(ds64, math.prod(full) // bias.numel())
    names = ("out", "lse", "dq", "dk", "dv", "dbias")
    for name, a, s, r in zip(names, ours, same, ref64):
        assert a.shape == r.shape
        assert_within_factor(name, a, s, r, dtype, shape.head_dim, extra_floor=reduction if name == "dbias" else 0.0)
    return ours


# ------------------------------------------------------------------------------------------------
# The tiles the loops visit: the kernels' bound helpers against Variant.key_range / query_range.
# ------------------------------------------------------------------------------------------------

@triton.jit
def _bounds_kernel(OUT, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, KEYS: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr):
    pid = tl.program_id(0)
    if KEYS:
        lo, full_lo, full_hi, hi = common.key_tiles(pid * BLOCK_M, seqlen_q, seqlen_k, window_left, window_right,
                                                    BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    else:
        lo, full_lo, full_hi, hi = common.query_tiles(pid * BLOCK_N, seqlen_q, seqlen_k, window_left,
                                                      window_right, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    tl.store(OUT + pid * 4 + 0, lo)
    tl.store(OUT + pid * 4 + 1, full_lo)
    tl.store(OUT + pid * 4 + 2, full_hi)
    tl.store(OUT + pid * 4 + 3, hi)


WINDOWS = [(8, 8), (0, 0), (20, -1), (-1, 5), (-1, 0), (3, 40), (50, 0), (-1, -1), (0, 100)]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
@pytest.mark.parametrize("sq, sk", [(96, 96), (70, 131), (131, 70)], ids=str)
def test_window_stages_cover_exactly_the_band(window, sq, sk):
    """For each query block (keys) and each key block (queries): the masked and unmasked stages
    [lo, full_lo), [full_lo, full_hi), [full_hi, hi) visit exactly the tiles that meet the band (so a
    window leaving whole tiles empty skips them, and the cost is linear in seqlen), and the unmasked
    tiles are wholly inside the band and in bounds."""
    left, right = window
    causal = right == 0 and left == -1
    has_window = not causal and window != (-1, -1)
    variant = Variant(causal=right == 0, window_left=left, window_right=right)
    unbounded = sq + sk
    wl, wr = (unbounded if w < 0 else w for w in window)
    allowed = reference.window_mask(torch.arange(sq), torch.arange(sk), sk - sq, left, right)
    for keys, (bm, bn) in ((True, (32, 16)), (True, (16, 64)), (False, (32, 16)), (False, (64, 16))):
        n_blocks = triton.cdiv(sq, bm) if keys else triton.cdiv(sk, bn)
        out = torch.zeros(n_blocks * 4, dtype=torch.int32, device=DEVICE)
        _bounds_kernel[(n_blocks,)](out, sq, sk, wl, wr, BLOCK_M=bm, BLOCK_N=bn, KEYS=keys, IS_CAUSAL=causal,
                                    HAS_WINDOW=has_window)
        tile, length = (bn, sk) if keys else (bm, sq)
        for pid, (lo, full_lo, full_hi, hi) in enumerate(out.view(-1, 4).tolist()):
            start = pid * (bm if keys else bn)
            if keys:
                band_lo, band_hi = variant.key_range(start, bm, sq, sk)
                seen = allowed[start:start + bm]
            else:
                band_lo, band_hi = variant.query_range(start, bn, sq, sk)
                seen = allowed[:, start:start + bn].T
            # query_tiles may leave [full_lo, full_hi) empty with full_hi < full_lo (causal); the masked
            # tail then starts at max(full_lo, full_hi).
            assert lo <= full_lo <= hi and full_hi <= hi and (not keys or full_lo <= full_hi)
            visited = set(range(lo, hi, tile))
            band = {t for t in range(0, length, tile) if seen[:, t:t + tile].any()}
            assert visited == band, (pid, lo, hi, sorted(band))
            if band:
                assert lo == band_lo // tile * tile and hi == band_hi
            for t in range(full_lo, full_hi, tile):             # unmasked: every valid row sees all
                assert t + tile <= length and seen[:, t:t + tile].all()
            assert full_lo % tile == 0 or full_lo == hi
            assert full_hi % tile == 0 or full_hi == hi


@triton.jit
def _walk_kernel(IDX, OUT, count, n, SPARSE_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """OUT[x // TILE] = sparse_tiles_before(x) for every tile start x < n + TILE, then the walk's starts."""
    for x in range(0, n + TILE, TILE):
        tl.store(OUT + x // TILE, common.sparse_tiles_before(IDX, count, x, SPARSE_BLOCK, TILE))
    base = n // TILE + 1
    for it in range(0, count * (SPARSE_BLOCK // TILE)):
        tl.store(OUT + base + it, common.sparse_tile_start(IDX, it, SPARSE_BLOCK, TILE))


@pytest.mark.parametrize("block_size, tile", [(16, 16), (64, 16), (128, 32)])
def test_block_walk_positions(block_size, tile):
    """The walk over the listed blocks, cut into tiles: its starts ascend through exactly the listed
    blocks' tiles, and sparse_tiles_before(x) counts the tiles that start before x."""
    torch.manual_seed(0)
    n_blocks = 9
    listed = (torch.rand(n_blocks) < 0.5).nonzero().flatten()
    idx = torch.zeros(n_blocks, dtype=torch.int32)
    idx[:len(listed)] = listed.to(torch.int32)
    n = n_blocks * block_size
    out = torch.full((n // tile + 1 + len(listed) * (block_size // tile),), -1, dtype=torch.int32,
                     device=DEVICE)
    _walk_kernel[(1,)](idx.to(DEVICE), out, len(listed), n, SPARSE_BLOCK=block_size, TILE=tile)
    out = out.cpu()
    starts = [int(b) * block_size + s for b in listed for s in range(0, block_size, tile)]
    assert out[n // tile + 1:].tolist() == starts
    assert out[:n // tile + 1].tolist() == [sum(s < x for s in starts) for x in range(0, n + tile, tile)]


# ------------------------------------------------------------------------------------------------
# Windows that leave whole tiles empty, and rows that see no key.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window, sq, sk", [((0, 0), 96, 96), ((5, 2), 70, 131), ((17, 0), 131, 70),
                                            ((0, 40), 64, 100), ((0, 0), 80, 40), ((3, -1), 50, 90)],
                         ids=lambda x: str(x))
def test_narrow_windows_match_reference(window, sq, sk):
    shape = Shape(1, sq, sk, 2, 1, 16) if not HAS_CUDA else Shape(2, sq * 9, sk * 9, 4, 2, 64)
    _check_against_reference(shape, torch.float32, window_size=window)


# ------------------------------------------------------------------------------------------------
# Block masks whose blocks are smaller or larger than the kernels' tiles.
# ------------------------------------------------------------------------------------------------

BLOCK_CASES = [(16, False, (-1, -1)), (32, True, (-1, -1)), (64, False, (20, 5)), (128, True, (-1, -1)),
               (16, True, (9, 0))]


@pytest.mark.parametrize("block_size, causal, window", BLOCK_CASES, ids=lambda x: str(x))
def test_block_sizes_against_tile_sizes(block_size, causal, window):
    """block_size 16 (below both forward tiles: they shrink to it), 32 (the forward's BLOCK_M), 64 and
    128 (several tiles per block, and blocks longer than the sequence), with the element masks of
    causal and window inside each listed block; per-head masks with GQA."""
    shape = Shape(2, 70, 90, 2, 1, 16) if not HAS_CUDA else Shape(2, 700, 900, 8, 2, 64)
    torch.manual_seed(block_size)
    nq, nk = triton.cdiv(shape.seqlen_q, block_size), triton.cdiv(shape.seqlen_k, block_size)
    mask = torch.rand(shape.batch, shape.nheads, nq, nk, device=DEVICE) < 0.6
    mask[0, 0] = False                                           # a (batch, head) that sees nothing
    bm = BlockMask.from_dense(mask, block_size)
    _check_against_reference(shape, torch.float32, block_mask=bm, causal=causal, window_size=window)


# ------------------------------------------------------------------------------------------------
# No read past a tensor's rows, heads or bias entries.
# ------------------------------------------------------------------------------------------------

def _nan_padded(x: Tensor) -> Tensor:
    """x as a view inside a NaN-filled buffer padded on every dim (no stride is contiguous)."""
    buf = torch.full(tuple(n + 3 for n in x.shape), float("nan"), dtype=x.dtype, device=x.device)
    view = buf[tuple(slice(1, 1 + n) for n in x.shape)]
    view.copy_(x)
    return view


OPTION_SETS = {
    "bias": lambda s: dict(bias=torch.randn(s.batch, s.nheads, s.seqlen_q, s.seqlen_k, device=DEVICE)),
    "bias-rows": lambda s: dict(bias=torch.randn(1, s.nheads, s.seqlen_q, 1, device=DEVICE)),
    "mask": lambda s: dict(attn_bias=torch.rand(s.batch, 1, s.seqlen_q, s.seqlen_k, device=DEVICE) > 0.3),
    "every-option": lambda s: dict(
        bias=torch.randn(s.batch, s.nheads, s.seqlen_q, s.seqlen_k, device=DEVICE), causal=True,
        window_size=(25, 0), softcap=3.0, alibi_slopes=torch.rand(s.nheads, device=DEVICE) * 0.1,
        dropout_p=0.2, block_mask=local_global_block_mask(s.seqlen_q, s.seqlen_k, local_blocks=1,
                                                          global_blocks=1, block_size=16, device=DEVICE)),
}


@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_nan_padding_of_inputs_and_bias_is_never_read(options):
    """Strided q, k, v, dO and bias (or mask) inside NaN padding give bit-identical results to
    contiguous ones, forward and backward, bias gradient included."""
    shape = Shape(2, 33, 40, 2, 1, 16) if not HAS_CUDA else Shape(2, 333, 517, 4, 2, 96)
    torch.manual_seed(5)
    q, k, v, do = _inputs(shape, torch.float16)
    kwargs = OPTION_SETS[options](shape)
    bias = kwargs.pop("bias", None)
    if bias is not None:
        bias = bias.to(torch.float16)
    results = []
    for wrap in (lambda x: x.clone(), _nan_padded):
        extra = dict(kwargs)
        if "attn_bias" in extra:
            extra["attn_bias"] = wrap(extra["attn_bias"]) if extra["attn_bias"].dtype != torch.bool else \
                _padded_mask(extra["attn_bias"], wrap)
        torch.manual_seed(6)
        results.append(_grads(wrap(q), wrap(k), wrap(v), wrap(do), None if bias is None else wrap(bias), **extra))
    for contiguous, padded in zip(*results):
        assert torch.equal(contiguous, padded)
        assert not torch.isnan(padded).any()


def _padded_mask(mask: Tensor, wrap) -> Tensor:
    """A bool mask inside padding of True (a read past its end would let masked keys through)."""
    if wrap is not _nan_padded:
        return mask.clone()
    buf = torch.ones(tuple(n + 3 for n in mask.shape), dtype=torch.bool, device=mask.device)
    view = buf[tuple(slice(1, 1 + n) for n in mask.shape)]
    view.copy_(mask)
    return view


# ------------------------------------------------------------------------------------------------
# Dropout: the kernel's mask is philox.py's, bit for bit.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 2 ** 32 - 1, 2 ** 40 + 2 ** 31 + 12345, philox.SEED_HIGH - 5])
def test_dropout_keep_pattern_is_philox(seed):
    """With the seed fixed (every 32-bit half, signed or not), the forward and backward equal the
    PyTorch path run with the same seed: the same keep pattern, GQA heads (counter b * H + h),
    seqlen_q != seqlen_k, causal."""
    shape = Shape(2, 33, 45, 2, 1, 16) if not HAS_CUDA else Shape(2, 300, 450, 8, 2, 64)
    torch.manual_seed(7)
    q, k, v, do = _inputs(shape, torch.float32)
    variant = Variant(causal=True, window_right=0, dropout_p=0.35, seed=seed)
    scale = 0.25
    out, lse = triton_forward.forward(q, k, v, scale, variant)
    grads = triton_backward.backward(do, q, k, v, out, lse, scale, variant)[:3]
    ref_out, ref_lse = reference.flash_attention_forward(q.double(), k.double(), v.double(), scale, variant)
    ref_grads = reference.flash_attention_backward(do.double(), q.double(), k.double(), v.double(), ref_out,
                                                   ref_lse, scale, variant)[:3]
    for ours, ref in zip((out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=1e-4)
    # A different seed is a different mask: the output moves by far more than rounding.
    other = triton_forward.forward(q, k, v, scale, Variant(causal=True, window_right=0, dropout_p=0.35,
                                                           seed=seed + 1))[0]
    assert (other - out).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# The bias gradient in every broadcast, with and without determinism; softcap, ALiBi, -inf bias.
# ------------------------------------------------------------------------------------------------

# (batch, heads, rows, cols) of the bias, 1 = broadcast; fewer dims broadcast the leading ones.
BIAS_SHAPES = ["bhqk", "b1qk", "1h1k", "11q1", "b111", "k", "qk"]


@pytest.mark.parametrize("bias_dims, deterministic", [
    (dims, det) for dims in BIAS_SHAPES for det in (False, True) if not (det and dims == "bhqk")],
    ids=lambda x: x if isinstance(x, str) else ("deterministic" if x else "atomic"))
def test_bias_gradient_in_every_broadcast(bias_dims, deterministic):
    """dbias summed over the bias's broadcast dims: by atomics, or (deterministic) by torch from a
    buffer with the batch and head dims in full; rows summed in the kernel, columns per key block.
    (A full bias needs no reduction, hence no atomics either way.)"""
    shape = Shape(2, 33, 41, 2, 1, 16) if not HAS_CUDA else Shape(2, 400, 570, 4, 2, 64)
    sizes = dict(b=shape.batch, h=shape.nheads, q=shape.seqlen_q, k=shape.seqlen_k)
    torch.manual_seed(8)
    bias = torch.randn([sizes.get(c, 1) for c in bias_dims], device=DEVICE)
    ours = _check_against_reference(shape, torch.float32, bias=bias, causal=True, deterministic=deterministic)
    assert ours[-1].shape == bias.shape and ours[-1].dtype == bias.dtype


def test_float32_bias_with_half_inputs_and_huge_windows():
    """A float32 bias on float16 inputs is read as float32 and gets a float32 gradient; a window wider
    than both sequences is no window (and overflows nothing)."""
    shape = SHAPE
    torch.manual_seed(15)
    bias = torch.randn(shape.seqlen_q, shape.seqlen_k, device=DEVICE)
    ours = _check_against_reference(shape, torch.float16, bias=bias, window_size=(2 ** 31 - 1, 2 ** 31 - 1))
    assert ours[0].dtype == torch.float16 and ours[-1].dtype == torch.float32


def test_float16_bias_gradient_and_minus_inf_rows():
    """A float16 bias whose -inf entries mask like a bool mask, a whole row included: out 0, lse +inf,
    a zero (never NaN) bias gradient where masked."""
    shape = SHAPE
    torch.manual_seed(9)
    mask = torch.rand(1, shape.nheads, shape.seqlen_q, shape.seqlen_k, device=DEVICE) > 0.4
    mask[:, :, 4] = False
    bias = torch.zeros(mask.shape, dtype=torch.float16, device=DEVICE).masked_fill(~mask, float("-inf"))
    ours = _check_against_reference(shape, torch.float16, bias=bias)
    out, lse, dbias = ours[0], ours[1], ours[-1]
    assert (out[:, 4] == 0).all() and (lse[:, :, 4] == float("inf")).all()
    assert torch.isfinite(dbias).all() and (dbias[~mask] == 0).all()


def test_softcap_with_saturated_scores():
    shape = SHAPE
    torch.manual_seed(10)
    q, k, v, do = _inputs(shape, torch.float32)
    q = q * 20
    ours = _grads(q, k, v, do, softcap=3.0)
    ref64 = _standard(q, k, v, do, torch.float64, softcap=3.0)
    same = _standard(q, k, v, do, torch.float32, softcap=3.0)
    for name, a, s, r in zip(("out", "lse", "dq", "dk", "dv"), ours, same, ref64):
        assert_within_factor(name, a, s, r, torch.float32, shape.head_dim)


def test_alibi_equals_its_bias():
    """ALiBi == the float bias -slope * |i + seqlen_k - seqlen_q - j|, per (batch, head) slopes."""
    shape = SHAPE
    torch.manual_seed(11)
    q, k, v, _ = _inputs(shape, torch.float32)
    slopes = torch.rand(shape.batch, shape.nheads, device=DEVICE) * 0.3
    i = torch.arange(shape.seqlen_q, device=DEVICE)[:, None]
    j = torch.arange(shape.seqlen_k, device=DEVICE)[None, :]
    bias = -slopes[:, :, None, None] * (i + shape.seqlen_k - shape.seqlen_q - j).abs()
    out = flash_attn_func(q, k, v, alibi_slopes=slopes, causal=True)
    torch.testing.assert_close(out, flash_attn_func(q, k, v, attn_bias=bias, causal=True), atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bitwise reproducibility with every option; every backward layout with the options.
# ------------------------------------------------------------------------------------------------

def _every_option(shape: Shape, bias_shape) -> tuple[dict, Tensor]:
    kwargs = dict(dropout_p=0.2, causal=True, window_size=(30, 0), softcap=2.0,
                  alibi_slopes=torch.rand(shape.batch, shape.nheads, device=DEVICE) * 0.1,
                  block_mask=local_global_block_mask(shape.seqlen_q, shape.seqlen_k, local_blocks=1,
                                                     global_blocks=1, block_size=16, device=DEVICE),
                  deterministic=True)
    return kwargs, torch.randn(bias_shape, device=DEVICE)


def test_deterministic_is_bitwise_with_every_option():
    """Two runs with deterministic=True (and the same dropout seed) give bit-identical outputs and
    gradients, the bias gradient reduced over its broadcast batch and heads included."""
    shape = Shape(2, 33, 40, 2, 1, 16) if not HAS_CUDA else Shape(2, 400, 570, 8, 2, 64)
    torch.manual_seed(12)
    q, k, v, do = _inputs(shape, torch.float16)
    kwargs, bias = _every_option(shape, (1, 1, shape.seqlen_q, shape.seqlen_k))
    runs = []
    for _ in range(2):
        torch.manual_seed(13)
        runs.append(_grads(q, k, v, do, bias.half(), **kwargs))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


T = configs.TileConfig
LAYOUTS = {  # the interpreter's sizes; on a GPU the table's shapes are kept
    "one-grid": configs.BackwardConfig(kv=T(32, 16, 4, 1), q=T(16, 32, 4, 1), one_launch=True),
    "dk-apart": configs.BackwardConfig(kv=T(16, 32, 4, 1), q=T(32, 16, 4, 1), dk=T(32, 16, 4, 1)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_layouts_with_every_option(layout, monkeypatch):
    """One grid for dK/dV and dQ, and dK in programs of its own (which then give the bias gradient):
    right with every option."""
    if not HAS_CUDA:
        table = configs._table_config
        monkeypatch.setattr(configs, "_table_config",
                            lambda kind, *a: LAYOUTS[layout] if kind == "bwd" else table(kind, *a))
    shape = Shape(2, 33, 40, 2, 1, 16) if not HAS_CUDA else Shape(2, 400, 570, 8, 2, 64)
    kwargs, bias = _every_option(shape, (shape.batch, 1, shape.seqlen_q, shape.seqlen_k))
    kwargs["deterministic"] = False
    _check_against_reference(shape, torch.float32, bias=bias, seed=14, **kwargs)
