"""NaN and inf are never hidden: a NaN or inf in q, k or v reaches the outputs, LSE and gradients
that depend on it, as in standard attention; rows that see no key still give 0 (issue 15, item 7).

Every backend and every Triton kernel family: the PyTorch path and the portable Triton kernels (under
the interpreter on CPU: small shapes, fp16/fp32), the warp-specialized forward (forced on, the
interpreter runs it too), and on an H100/H200 every family at the lengths configs' sm_90 tables send
to it (`gpu` marker): ping-pong forward, one-pass backward (and its deterministic build),
warp-specialized forward, portable kernels, fp32.

What each check asks, per row of O, lse and dQ and per key of dK and dV (B, H, S granularity):
  - required: the entries that depend on the bad value in exact arithmetic are NaN (all head_dim
    entries of them; of O with a NaN in v, its column): O, lse and dQ of the rows that see a bad key, or of the bad query row; dK of
    the keys those rows see (and dV, unless the bad value is in V, which dV never reads);
  - exactly standard attention where it is exact: attention_standard, run densely in float64 and
    differentiated by autograd, has exactly the required set for O and lse with a bad q or k, dQ with
    a bad q, lse and dV with a bad v; there every NaN of ours must be NaN in it (so the sets are equal);
  - unaffected entries untouched: every entry that is not NaN is what a clean run gives (bit for
    bit in the forward; gradients too, up to the order of atomic adds); no inf appears;
  - tiles that never meet the bad value stay clean: rows (keys) whose query (key) block of `grain`
    rows shares no allowed (row, key) pair with the bad key's (row's) block are finite. Within one
    visited tile a masked P or a zero dS multiplies the bad value and IEEE gives NaN (0 * NaN); there
    our NaN may go beyond the required set (and beyond dense standard attention's, whose masked dS is
    exactly 0), while elsewhere dense attention goes further (a NaN in v makes every row of its heads
    NaN, a NaN in q every key's dK): flashattn/ops/reference.py documents both.
"""
from __future__ import annotations

import math

import pytest
import torch

from shapes import Shape
from flashattn import flash_attn_func
from flashattn.ops.reference import attention_standard, window_mask

from conftest import DEVICE, HAS_CUDA


@pytest.fixture(autouse=True)
def _tiled_reference(monkeypatch):
    """Every run here takes the tiled PyTorch path: the clean run is compared bit for bit with the run
    holding a NaN or inf, which torch's fused CPU kernel serves only where its result is reference.py's
    (flashattn/ops/cpu.py; tests/ops/test_cpu.py compares the two on such inputs)."""
    from flashattn.ops import cpu

    monkeypatch.setattr(cpu, "applies", lambda *args, **kwargs: False)

Tensor = torch.Tensor
NAN, INF = float("nan"), float("inf")

# Triton backend: the kernel family forced for the forward ("portable" = as dispatched).
CPU_BACKENDS = ["reference", "triton", "triton-ws"]
# Square tiles of this size contain every tile any kernel visits (the interpreter's are 32 x 16 and
# 16 x 32, the PyTorch path's 128 x 128, the GPU tables' at most 256 x 128).
GRAIN = {"reference": 128, "triton": 32, "triton-ws": 32}
GPU_GRAIN = 256
MASKS = ["full", "causal", "window"]


def _shape(backend: str) -> Shape:
    """seqlen_q != seqlen_k, GQA, and lengths of several `grain` blocks: with causal, the bad key
    (at 3/4 of seqlen_k) has rows in blocks that never meet it, the bad row (at 1/4 of seqlen_q)
    keys in blocks that never meet it."""
    if backend == "reference":
        return Shape(2, 300, 400, 4, 2, 16)
    return Shape(1, 80, 96, 4, 2, 16)


def _dtypes(backend: str) -> list[torch.dtype]:
    # The interpreter's tl.dot gives wrong results on bf16 operands: bf16 is tested on the GPU. The
    # warp-specialized forward takes only 16-bit calls.
    if backend == "triton-ws":
        return [torch.float16]
    return [torch.float16, torch.float32] + ([torch.bfloat16] if backend == "reference" else [])


def _mask_kwargs(mask: str, shape: Shape) -> dict:
    if mask == "causal":
        return dict(causal=True)
    if mask == "window":
        return dict(window_size=(shape.seqlen_k // 5, shape.seqlen_k // 10))
    return {}


def _allowed(shape: Shape, kwargs: dict) -> Tensor:
    """(B, H, Sq, Sk) bool: which keys each query may see."""
    left, right = kwargs.get("window_size", (-1, -1))
    if kwargs.get("causal"):
        right = 0
    rows = torch.arange(shape.seqlen_q, device=DEVICE)
    cols = torch.arange(shape.seqlen_k, device=DEVICE)
    allowed = window_mask(rows, cols, shape.seqlen_k - shape.seqlen_q, left, right)
    return allowed.expand(shape.batch, shape.nheads, -1, -1)


def _shares_tile(allowed: Tensor, grain: int) -> Tensor:
    """(B, H, Sq, Sk) bool: query i and key j lie in a (grain x grain) block pair that holds an
    allowed pair, i.e. one a kernel may visit (tiles never cross these blocks)."""
    b, h, sq, sk = allowed.shape
    nr, nc = -(-sq // grain), -(-sk // grain)
    padded = torch.zeros(b, h, nr * grain, nc * grain, dtype=torch.bool, device=allowed.device)
    padded[..., :sq, :sk] = allowed
    blocks = padded.view(b, h, nr, grain, nc, grain).any(dim=5).any(dim=3)
    return blocks.repeat_interleave(grain, dim=2).repeat_interleave(grain, dim=3)[..., :sq, :sk]


def _inputs(shape: Shape, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    q = torch.randn(shape.batch, shape.seqlen_q, shape.nheads, shape.head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(shape.batch, shape.seqlen_k, shape.nheads_k, shape.head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn_like(k)
    do = torch.randn_like(q)
    return q, k, v, do


def _ours(q, k, v, do, kwargs) -> dict[str, Tensor]:
    """O, lse, dq, dk, dv (and the probabilities) of flash_attn_func."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse, probs = flash_attn_func(*leaves, return_attn_probs=True, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, leaves, do)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, probs=probs)


def _standard(q, k, v, do, kwargs) -> dict[str, Tensor]:
    """The same from attention_standard in float64, differentiated by autograd."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    kwargs = {name: value for name, value in kwargs.items() if name != "deterministic"}
    out, lse = attention_standard(*leaves, 1.0 / math.sqrt(q.shape[-1]), **kwargs)
    dq, dk, dv = torch.autograd.grad(out, leaves, do.double())
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def _per_row(name: str, x: Tensor) -> Tensor:
    """(B, H, S, last) view: rows of O/dQ, keys of dK/dV, the lse with a last dim of 1."""
    return x[..., None] if name == "lse" else x.transpose(1, 2)


def _check_entries(name: str, ours: Tensor, clean: Tensor, standard: Tensor, required: Tensor,
                   far: Tensor | None, exact: bool, standard_is_required: bool, column: int | None = None) -> None:
    """The rules of the module docstring for one tensor; required and far are (B, H, S) bool. With
    `column`, the required rows need NaN only there (O's column of a NaN in v)."""
    x, ref, c = _per_row(name, ours), _per_row(name, standard), _per_row(name, clean)
    nan_any, ref_nan = torch.isnan(x).any(-1), torch.isnan(ref).any(-1)
    nan_all = torch.isnan(x).all(-1) if column is None else torch.isnan(x[..., column])
    if standard_is_required:
        assert torch.equal(ref_nan, required), f"{name}: standard attention's NaN set is not the expected one"
    missing = required & ~nan_all
    assert not missing.any(), f"{name}: no NaN at {missing.nonzero().tolist()[:8]} (hidden)"
    if far is None:
        beyond = nan_any & ~ref_nan
        assert not beyond.any(), f"{name}: NaN at {beyond.nonzero().tolist()[:8]}, where standard attention has none"
    else:
        leaked = nan_any & far
        assert not leaked.any(), f"{name}: NaN at {leaked.nonzero().tolist()[:8]}, in tiles that never meet the bad value"
    assert not torch.isinf(x[~nan_any]).any() or name == "lse", f"{name}: inf"
    keep = ~torch.isnan(x)
    if exact:
        assert torch.equal(x[keep], c[keep]), f"{name}: the entries without NaN differ from a clean run"
    else:
        scale = c[keep].abs().max().item() if keep.any() else 0.0
        tol = 4 * torch.finfo(ours.dtype).eps
        torch.testing.assert_close(x[keep], c[keep], rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{name}: the entries without NaN differ from a clean run: {m}")


def _check(shape: Shape, dtype: torch.dtype, kwargs: dict, where: str, value: float, grain: int,
           exact_grads: bool = True) -> None:
    """Put `value` into one entry of `where` (q: batch B-1, row Sq/4 + 3, head H-1; k or v: batch
    B-1, key 3Sk/4 + 3, kv head Hk-1) and check O, lse, dQ, dK, dV against a clean run and float64 standard
    attention (module docstring)."""
    q, k, v, do = _inputs(shape, dtype)
    b0, d0 = shape.batch - 1, shape.head_dim // 3
    # Off the tile boundaries, so that some rows of the bad key's tile may not see it.
    i0, h0 = shape.seqlen_q // 4 + 3, shape.nheads - 1
    j0, hk0 = 3 * shape.seqlen_k // 4 + 3, shape.nheads_k - 1
    group = shape.nheads // shape.nheads_k
    allowed = _allowed(shape, kwargs)
    shares = _shares_tile(allowed, grain)
    in_group = torch.zeros(shape.batch, shape.nheads, dtype=torch.bool, device=DEVICE)   # heads of kv head hk0
    in_group[b0, hk0 * group:(hk0 + 1) * group] = True
    if where == "q" and value == INF:
        # +inf in q gives +inf and -inf scores, hence NaN, when the row sees keys of both signs in
        # that dimension: make them alternate (keys that every score would send to -inf: see
        # test_inf_that_sends_every_score_to_minus_inf).
        col = k[b0, :, h0 // group, d0]
        sign = torch.where(torch.arange(shape.seqlen_k, device=DEVICE) % 2 == 0, 1.0, -1.0)
        k[b0, :, h0 // group, d0] = (col.abs() + 0.1) * sign.to(dtype)
    bad = [x.clone() for x in (q, k, v)]
    if where == "q":
        bad[0][b0, i0, h0, d0] = value
    else:
        bad["qkv".index(where)][b0, j0, hk0, d0] = value

    ours, clean = _ours(*bad, do, kwargs), _ours(q, k, v, do, kwargs)
    standard = _standard(*bad, do, kwargs)

    # Rows whose O is NaN in exact arithmetic; rows that share a visited tile with the bad value.
    if where == "q":
        rows = torch.zeros(shape.batch, shape.nheads, shape.seqlen_q, dtype=torch.bool, device=DEVICE)
        rows[b0, h0, i0] = bool(allowed[b0, h0, i0].any())
        tainted = rows
        far_rows = None
    else:
        rows = in_group[..., None] & allowed[..., j0]
        near = in_group[..., None] & shares[..., j0]
        # A bad v also reaches, through 0 * NaN, the O (hence delta) of the rows sharing its tile.
        tainted = near if where == "v" else rows
        far_rows = ~near

    def keys_of(row_set: Tensor, pairs: Tensor) -> Tensor:
        """(B, Hk, Sk): keys of kv head paired (in `pairs`) with a row of `row_set` in its group."""
        hit = (row_set[..., None] & pairs).any(dim=2)                    # (B, H, Sk)
        return hit.view(shape.batch, shape.nheads_k, group, shape.seqlen_k).any(dim=2)

    seen_keys = keys_of(rows, allowed)
    far_keys = ~keys_of(tainted, shares)
    none_q = torch.zeros_like(rows)
    none_k = torch.zeros_like(seen_keys)
    qk_case = where in ("q", "k")
    checks = [
        # name, required, far, standard attention's NaN set is exactly the required one
        ("out", rows, far_rows, qk_case),
        ("lse", rows if qk_case else none_q, None, True),
        ("dq", rows, far_rows, where == "q"),
        ("dk", seen_keys, far_keys, False),
        ("dv", seen_keys if qk_case else none_k, far_keys, where == "v"),
    ]
    for name, required, far, standard_is_required in checks:
        exact = name in ("out", "lse") or exact_grads
        _check_entries(name, ours[name], clean[name], standard[name], required, far, exact, standard_is_required,
                       d0 if (name, where) == ("out", "v") else None)
    if qk_case:
        # return_attn_probs: the probabilities of a row whose scores hold a NaN are NaN too.
        p_rows = torch.isnan(ours["probs"]).any(-1)
        assert torch.equal(p_rows, rows) and torch.isnan(ours["probs"][rows]).all()
        assert torch.equal(ours["probs"][~rows], clean["probs"][~rows])


def _use(backend: str, use_backend, monkeypatch) -> None:
    """Select the backend; "triton-ws" forces the warp-specialized forward for plain calls."""
    use_backend("reference" if backend == "reference" else "triton")
    if backend == "triton-ws":
        from flashattn.ops.triton import configs, forward

        def refused(*args, **kwargs):
            raise AssertionError("the plain forward left the warp-specialized kernel")

        monkeypatch.setattr(configs, "warp_specialized", lambda *args, **kwargs: True)
        monkeypatch.setattr(configs, "ping_pong_forward", lambda *args, **kwargs: False)
        monkeypatch.setattr(forward, "_launch_fwd", refused)


def _cpu_cases(wheres: tuple[str, ...]):
    for backend in CPU_BACKENDS:
        for dtype in _dtypes(backend):
            for mask in MASKS:
                if backend == "triton-ws" and mask == "window":
                    continue                                 # not a plain call: the portable kernel
                for where in wheres:
                    yield pytest.param(backend, dtype, mask, where,
                                       id=f"{backend}-{str(dtype)[6:]}-{mask}-{where}")


@pytest.mark.skipif(HAS_CUDA, reason="CPU shapes (the GPU test below runs full-size ones)")
@pytest.mark.parametrize("backend, dtype, mask, where", list(_cpu_cases(("q", "k", "v"))))
def test_nan_propagates(backend, dtype, mask, where, use_backend, monkeypatch):
    """A NaN in one query row, at one key of k, or at one key of v: the rows that see it (or the
    row) get NaN O, lse (not for v) and gradients; rows that do not see it (causal rows before the
    key, rows outside its window, other heads and batches) are untouched."""
    _use(backend, use_backend, monkeypatch)
    _check(_shape(backend), dtype, _mask_kwargs(mask, _shape(backend)), where, NAN, GRAIN[backend])


@pytest.mark.skipif(HAS_CUDA, reason="CPU shapes (the GPU test below runs full-size ones)")
@pytest.mark.parametrize("backend, dtype, mask, where", list(_cpu_cases(("q",))))
def test_inf_in_q_propagates(backend, dtype, mask, where, use_backend, monkeypatch):
    """+inf in one query row against keys of both signs gives +inf and -inf scores, hence NaN
    probabilities (inf - inf) as in standard attention: O, lse and dQ of that row and dK, dV of the
    keys it sees are NaN, nothing else changes."""
    _use(backend, use_backend, monkeypatch)
    _check(_shape(backend), dtype, _mask_kwargs(mask, _shape(backend)), where, INF, GRAIN[backend])


EMPTY_ROWS = {
    "causal-q>k": lambda sq, sk: dict(causal=True),                         # rows i < sq - sk see nothing
    "window": lambda sq, sk: dict(window_size=(2, 1)),                      # rows i < sq - sk - 1 too
    "bool-mask": lambda sq, sk: dict(attn_bias=_bool_mask_with_empty_rows(sq, sk)),
}


def _bool_mask_with_empty_rows(sq: int, sk: int) -> Tensor:
    torch.manual_seed(3)
    mask = torch.rand(1, 1, sq, sk, device=DEVICE) > 0.3
    mask[..., 5, :] = False
    mask[..., sq - 2, :] = False
    return mask


@pytest.mark.parametrize("case", list(EMPTY_ROWS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rows_that_see_no_key_still_give_zero(backend, dtype, case, use_backend):
    """Causal with seqlen_q > seqlen_k, a window that excludes every key, a fully masked row of a
    bool mask: those rows give O = 0 and lse = +inf, every gradient is finite, and all of it matches
    float64 standard attention."""
    use_backend(backend)
    shape = Shape(1, 70, 40, 2, 1, 16)
    if HAS_CUDA and backend == "triton":
        # On sm_90 the causal fp16 case runs the ping-pong forward and the one-pass backward.
        shape = Shape(1, 4096, 3000, 4, 2, 128) if case == "causal-q>k" else Shape(2, 1100, 700, 4, 2, 64)
    kwargs = EMPTY_ROWS[case](shape.seqlen_q, shape.seqlen_k)
    q, k, v, do = _inputs(shape, dtype)
    ours, standard = _ours(q, k, v, do, kwargs), _standard(q, k, v, do, kwargs)
    empty = torch.isinf(standard["lse"])                                    # (B, H, Sq)
    assert empty.sum() >= 2 and (standard["lse"][empty] > 0).all()
    assert torch.equal(torch.isinf(ours["lse"]), empty) and (ours["lse"][empty] == INF).all()
    assert (ours["out"].transpose(1, 2)[empty] == 0).all()
    for name in ("out", "dq", "dk", "dv"):
        assert torch.isfinite(ours[name]).all(), name
        torch.testing.assert_close(ours[name].double(), standard[name], rtol=0.05, atol=0.05)
    assert torch.isfinite(ours["lse"][~empty]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inf_that_sends_every_score_to_minus_inf(backend, dtype, use_backend):
    """The limit (reference.py's docstring): +inf in q against keys that are all negative in that
    dimension gives a row whose every score is -inf, which no kernel can tell from a row that sees
    no key. Standard attention (attention_standard, as torch SDPA's math path) gives 0 and lse =
    +inf; the PyTorch path does the same, the Triton kernels give that or NaN (depending on whether
    an unmasked tile sees the -inf max first). Either way no finite nonzero output hides it, and
    no other row changes."""
    use_backend(backend)
    shape = Shape(1, 40, 40, 2, 2, 16)
    if HAS_CUDA and backend == "triton":
        # On sm_90 the fp16 call runs the ping-pong forward.
        shape = Shape(1, 4096, 4096, 2, 2, 128) if dtype == torch.float16 else Shape(1, 1000, 1000, 2, 2, 64)
    q, k, v, do = _inputs(shape, dtype)
    k[..., 0] = -(k[..., 0].abs() + 0.1)
    bad = q.clone()
    i0 = shape.seqlen_q // 2
    bad[0, i0, 1, 0] = INF
    for causal in (False, True):
        ours, clean = _ours(bad, k, v, do, dict(causal=causal)), _ours(q, k, v, do, dict(causal=causal))
        standard = _standard(bad, k, v, do, dict(causal=causal))
        assert (standard["out"][0, i0, 1] == 0).all() and standard["lse"][0, 1, i0] == INF
        row, lse = ours["out"][0, i0, 1], ours["lse"][0, 1, i0]
        if backend == "reference":
            assert (row == 0).all() and lse == INF
        else:
            assert ((row == 0).all() and lse == INF) or (torch.isnan(row).all() and torch.isnan(lse))
        others = torch.ones_like(ours["lse"], dtype=torch.bool)
        others[0, 1, i0] = False
        assert torch.equal(ours["lse"][others], clean["lse"][others])
        assert torch.equal(ours["out"].transpose(1, 2)[others], clean["out"].transpose(1, 2)[others])


@pytest.mark.parametrize("where, value", [("q", NAN), ("q", INF), ("k", NAN), ("v", NAN)],
                         ids=["q-nan", "q-inf", "k-nan", "v-nan"])
def test_standard_attention_agrees_with_sdpa_math(where, value):
    """attention_standard, the yardstick above, has the NaN sets of torch SDPA's math path in float64
    (no mask, GQA): the same entries of O, dQ, dK and dV are NaN. (SDPA's math path masks by adding
    -inf, so with causal a NaN key also makes the rows that may not see it NaN; the masks here replace
    masked scores instead, as SDPA's fused kernels do.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = Shape(2, 20, 24, 4, 2, 8)
    q, k, v, do = _inputs(shape, torch.float64)
    sign = torch.where(torch.arange(24, device=DEVICE) % 2 == 0, 1.0, -1.0).double()
    k[1, :, 1, 2] = (k[1, :, 1, 2].abs() + 0.1) * sign
    bad = [x.clone() for x in (q, k, v)]
    if where == "q":
        bad[0][1, 10, 3, 2] = value
    else:
        bad["qkv".index(where)][1, 12, 1, 2] = value
    standard = _standard(*bad, do, {})
    leaves = [x.transpose(1, 2).clone().requires_grad_() for x in bad]
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(*leaves, enable_gqa=True)
    grads = torch.autograd.grad(out, leaves, do.transpose(1, 2))
    for name, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        ours_nan = torch.isnan(standard[name])
        assert ours_nan.any() or name == "dv" and where == "v"
        assert torch.equal(ours_nan, torch.isnan(theirs.transpose(1, 2))), name


# ------------------------------------------------------------------------------------------------
# Full size on the GPU: every kernel family, at lengths the sm_90 tables send to it.
# ------------------------------------------------------------------------------------------------

# (id, dtype, shape, causal, deterministic, forward family, backward family)
GPU_FAMILIES = [
    ("pingpong-onepass-bf16-d128", torch.bfloat16, Shape(1, 4096, 4096, 4, 2, 128), False, False,
     "ping-pong", "one-pass"),
    ("pingpong-onepass-bf16-d128-causal", torch.bfloat16, Shape(1, 4096, 4096, 4, 2, 128), True, False,
     "ping-pong", "one-pass"),
    ("pingpong-onepass-det-fp16-d128", torch.float16, Shape(1, 4096, 4096, 4, 2, 128), False, True,
     "ping-pong", "one-pass"),
    ("ws-onepass-bf16-d256", torch.bfloat16, Shape(1, 1024, 1024, 4, 2, 256), False, False,
     "warp-specialized", "one-pass"),
    ("pingpong-onepass-bf16-d256-causal", torch.bfloat16, Shape(1, 1024, 1024, 4, 2, 256), True, False,
     "ping-pong", "one-pass"),
    ("ws-onepass-det-bf16-d256", torch.bfloat16, Shape(1, 1024, 1024, 4, 2, 256), False, True,
     "warp-specialized", "one-pass"),
    ("portable-bf16-d64", torch.bfloat16, Shape(1, 1024, 1024, 4, 2, 64), False, False, "portable", "portable"),
    ("portable-bf16-d64-causal", torch.bfloat16, Shape(1, 1024, 1024, 4, 2, 64), True, False,
     "portable", "portable"),
    ("portable-fp32-d64-causal", torch.float32, Shape(1, 1024, 1024, 4, 2, 64), True, False,
     "portable", "portable"),
]


def _gpu_cases():
    for name, dtype, shape, causal, det, fwd, bwd in GPU_FAMILIES:
        for where, value in (("q", NAN), ("q", INF), ("k", NAN), ("v", NAN)):
            marks = [pytest.mark.gpu]
            case_id = f"{name}-{where}-{'nan' if math.isnan(value) else 'inf'}"
            yield pytest.param(dtype, shape, causal, det, fwd, bwd, where, value, id=case_id, marks=marks)


@pytest.mark.skipif(not (HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)),
                    reason="the sm_90 tables pick the kernel families on Hopper")
@pytest.mark.parametrize("dtype, shape, causal, deterministic, fwd, bwd, where, value", list(_gpu_cases()))
def test_every_kernel_family_shows_nan_on_the_gpu(dtype, shape, causal, deterministic, fwd, bwd, where, value,
                                                  use_backend):
    """The checks of test_nan_propagates and test_inf_in_q_propagates at full size, through the kernel
    that the sm_90 tables give each call (asserted, so that a table change cannot leave a family
    untested)."""
    from flashattn.ops.triton import choice
    from flashattn.ops.variant import Variant

    use_backend("triton")
    q, k, v, do = _inputs(shape, dtype)
    variant = Variant(causal=causal, window_right=0 if causal else -1, deterministic=deterministic)
    scale = 1.0 / math.sqrt(shape.head_dim)
    assert choice.kernel_for("fwd", q, k, v, variant, scale) == fwd
    assert choice.kernel_for("bwd", q, k, v, variant, scale, dout=do) == bwd
    kwargs = dict(causal=causal, deterministic=deterministic)
    # The one-pass backward adds dQ with atomics (unless deterministic): its order may differ.
    _check(shape, dtype, kwargs, where, value, GPU_GRAIN, exact_grads=bwd != "one-pass" or deterministic)
