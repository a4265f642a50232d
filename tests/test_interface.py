"""The public API: flash-attn compatibility, input validation, packed variants, empty inputs,
custom-operator registration and torch.compile."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re

import pytest
import torch

import flashattn
from flashattn import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from flashattn.ops import capabilities, custom_ops, dispatch, philox
from flashattn.ops.reference import attention_standard

from conftest import DEVICE, HAS_CUDA


def _qkv(b=1, sq=20, sk=20, h=2, hk=2, d=32, dtype=torch.float16, device=DEVICE):
    q = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    k = torch.randn(b, sk, hk, d, dtype=dtype, device=device)
    return q, k, torch.randn_like(k)


def test_signature_matches_flash_attn():
    """flash-attn's positional signature, then our keyword-only additions."""
    import inspect
    expected = ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap",
                "alibi_slopes", "deterministic", "return_attn_probs", "attn_bias", "block_mask", "tile_size"]
    for fn, head in ((flash_attn_func, ["q", "k", "v"]), (flash_attn_qkvpacked_func, ["qkv"]),
                     (flash_attn_kvpacked_func, ["q", "kv"])):
        params = inspect.signature(fn).parameters
        assert list(params) == head + expected[3:]
        keyword_only = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        assert keyword_only == ["attn_bias", "block_mask", "tile_size"]


@pytest.mark.parametrize("call, error, words", [
    (lambda q, k, v: flash_attn_func(q[0], k, v), ValueError, "4 dims"),
    (lambda q, k, v: flash_attn_func(q.numpy() if q.device.type == "cpu" else None, k, v), TypeError, "torch.Tensor"),
    (lambda q, k, v: flash_attn_func(q, k.float(), v), TypeError, "one dtype"),
    (lambda q, k, v: flash_attn_func(q, k, v[:, :5]), ValueError, "same shape"),
    (lambda q, k, v: flash_attn_func(q, k[:1], v[:1]), ValueError, "batch size"),
    (lambda q, k, v: flash_attn_func(q[..., :16], k, v), ValueError, "head dim of q (16)"),
    (lambda q, k, v: flash_attn_func(q, k[:, :, :1].repeat(1, 1, 3, 1), v[:, :, :1].repeat(1, 1, 3, 1)),
     ValueError, "multiple of nheads"),
    (lambda q, k, v: flash_attn_func(q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError, "nheads must be >= 1"),
    (lambda q, k, v: flash_attn_func(q, k, v, dropout_p=1.5), ValueError, "dropout_p"),
    (lambda q, k, v: flash_attn_func(q, k, v, window_size=(3,)), ValueError, "window_size"),
    (lambda q, k, v: flash_attn_func(q, k, v, softcap=-1.0), ValueError, "softcap"),
    (lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda q, k, v: flash_attn_func(q, k, v, causal=1), TypeError, "causal"),
    (lambda q, k, v: flash_attn_qkvpacked_func(q), ValueError, "(batch, seqlen, 3, nheads, headdim)"),
    (lambda q, k, v: flash_attn_kvpacked_func(q, k), ValueError, "(batch, seqlen_k, 2, nheads_k, headdim)"),
    (lambda q, k, v: flash_attn_func(q, k, v, window_size=(2.0, 3)), ValueError, "pair of ints >= -1"),
    (lambda q, k, v: flash_attn_func(q, k, v, window_size=(-2, 3)), ValueError, "got (-2, 3)"),
    (lambda q, k, v: flash_attn_func(q, k, v, softcap=float("inf")), ValueError, "finite float >= 0"),
    (lambda q, k, v: flash_attn_func(q, k, v, deterministic=1), TypeError, "deterministic must be a bool"),
    (lambda q, k, v: flash_attn_func(q, k, v, return_attn_probs="yes"), TypeError, "return_attn_probs"),
    (lambda q, k, v: flash_attn_func(q, k, v, alibi_slopes=[0.5, 0.25]), TypeError,
     "alibi_slopes must be a torch.Tensor"),
    (lambda q, k, v: flash_attn_func(q, k, v, alibi_slopes=torch.ones(2, dtype=torch.float16)), TypeError,
     "alibi_slopes must be float32"),
    (lambda q, k, v: flash_attn_func(q, k, v, alibi_slopes=torch.ones(3, device=q.device)), ValueError,
     "(nheads,) = (2,) or (batch, nheads) = (2, 2), got (3,)"),
    (lambda q, k, v: flash_attn_func(q, k, v, alibi_slopes=torch.ones(2, 2).to("meta")), ValueError,
     "alibi_slopes must be on q's device"),
    (lambda q, k, v: flash_attn_func(q, k, v, attn_bias=torch.zeros(20, 20, dtype=torch.int32)), TypeError,
     "bool mask (True = may attend) or a float bias"),
    (lambda q, k, v: flash_attn_func(q, k, v, attn_bias=torch.zeros(20, 20, dtype=torch.float64)), TypeError,
     "got torch.float64"),
    (lambda q, k, v: flash_attn_func(q, k, v, attn_bias=torch.zeros(2, 3, 20, 20, device=q.device)), ValueError,
     "(2, 3, 20, 20) is not broadcastable to (batch, nheads, seqlen_q, seqlen_k) = (2, 2, 20, 20)"),
    (lambda q, k, v: flash_attn_func(q, k, v, attn_bias=torch.zeros(1, 2, 2, 20, 20, device=q.device)), ValueError,
     "at most 4 dims"),
    (lambda q, k, v: flash_attn_func(q, k, v, attn_bias=torch.zeros(20, 20).to("meta")), ValueError,
     "attn_bias must be on q's device"),
    (lambda q, k, v: flash_attn_func(q, k, v, block_mask=torch.ones(1, 1, dtype=torch.bool)), TypeError,
     "block_mask must be a flashattn.BlockMask"),
    (lambda q, k, v: flash_attn_func(q, k, v, block_mask=flashattn.BlockMask.from_dense(
        torch.ones(2, 1, dtype=torch.bool), block_size=16).to(q.device)), ValueError,
     "ceil(seqlen_q / 16)=2, ceil(seqlen_k / 16)=2)"),
    (lambda q, k, v: flash_attn_func(q, k, v, block_mask=flashattn.BlockMask.from_dense(
        torch.ones(1, 3, 1, 1, dtype=torch.bool), block_size=32).to(q.device)), ValueError, "1 or nheads=2"),
    (lambda q, k, v: flash_attn_func(q, k, v, block_mask=flashattn.BlockMask.from_dense(
        torch.ones(1, 1, dtype=torch.bool), block_size=32).to("meta")), ValueError, "use block_mask.to(q.device)"),
], ids=["rank", "not-tensor", "dtype-mismatch", "kv-shape", "batch", "head-dim-mismatch", "gqa-divisible",
        "heads0", "dropout-range", "window-form", "softcap-negative", "scale-nan", "causal-type", "qkv-shape",
        "kv-packed-shape", "window-float", "window-below-minus-one", "softcap-inf", "deterministic-type",
        "return-attn-probs-type", "alibi-not-tensor", "alibi-dtype", "alibi-shape", "alibi-device",
        "bias-int-dtype", "bias-other-float-dtype", "bias-not-broadcastable", "bias-5-dims", "bias-device",
        "block-mask-type", "block-mask-shape", "block-mask-heads", "block-mask-device"])
def test_bad_input_raises_clear_error(call, error, words):
    q, k, v = _qkv(b=2, h=2, hk=2)
    with pytest.raises(error, match=re.escape(words)):
        call(q, k, v)


def test_head_dim_out_of_range():
    q, k, v = _qkv(d=264)
    with pytest.raises(ValueError, match=r"head dim 264 is outside \[1, 256\]"):
        flash_attn_func(q, k, v)


def test_devices_must_match():
    q, k, v = _qkv(device="cpu")
    with pytest.raises(ValueError, match="one device"):
        flash_attn_func(q, k.to("meta"), v.to("meta"))


def test_float64_only_on_the_pytorch_path(use_backend):
    use_backend("triton")
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 is not supported by the triton kernel"):
        flash_attn_func(q, k, v)


# One way to request each option of capabilities.ALL_FEATURES (q: (1, 20, 2, 32), k/v: (1, 20, 2, 32)).
FEATURE_REQUESTS = {
    "causal": lambda: dict(causal=True),
    "dropout": lambda: dict(dropout_p=0.1),
    "window": lambda: dict(window_size=(8, 0)),
    "softcap": lambda: dict(softcap=30.0),
    "alibi": lambda: dict(alibi_slopes=torch.ones(2, device=DEVICE)),
    "bias": lambda: dict(attn_bias=torch.zeros(20, 20, device=DEVICE)),
    "mask": lambda: dict(attn_bias=torch.ones(20, 20, dtype=torch.bool, device=DEVICE)),
    "block_sparse": lambda: dict(block_mask=flashattn.BlockMask.from_dense(
        torch.ones(2, 2, dtype=torch.bool, device=DEVICE), block_size=16)),
    "deterministic": lambda: dict(deterministic=True),
}
# The Triton kernels implement every option today; the refusal is checked against a kernel declared
# without the options (the check reads only the declarations, so a future gap is caught the same way).
LIMITED = ("causal", "gqa", "deterministic")
LIMITED_MISSING = sorted(set(capabilities.ALL_FEATURES) - set(LIMITED))


@pytest.fixture
def limited_triton(monkeypatch, use_backend):
    """The triton backend declared with only LIMITED features."""
    use_backend("triton")
    spec = dataclasses.replace(capabilities.TRITON, features=frozenset(LIMITED))
    monkeypatch.setitem(capabilities.KERNELS, "triton", spec)


def test_every_feature_has_a_request():
    assert set(FEATURE_REQUESTS) | {"gqa"} == set(capabilities.ALL_FEATURES)


def test_triton_declares_every_option():
    assert capabilities.TRITON.features == frozenset(capabilities.ALL_FEATURES)


@pytest.mark.parametrize("feature", LIMITED_MISSING)
def test_options_not_implemented_are_never_ignored(feature, limited_triton):
    """Each option a kernel does not declare raises NotImplementedError naming it."""
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=rf"does not implement yet: {feature} \(this call combines"):
        flash_attn_func(q, k, v, **FEATURE_REQUESTS[feature]())


def test_every_missing_option_is_listed(limited_triton):
    q, k, v = _qkv()
    requested = {}
    for feature in FEATURE_REQUESTS:
        if feature != "mask":                     # bias and mask share attn_bias
            requested.update(FEATURE_REQUESTS[feature]())
    missing = [f for f in LIMITED_MISSING if f != "mask"]
    with pytest.raises(NotImplementedError, match=re.escape(f"does not implement yet: {', '.join(missing)} ")):
        flash_attn_func(q, k, v, **requested)


@pytest.mark.parametrize("feature", sorted(capabilities.TRITON.features - {"gqa"}))
def test_declared_options_are_accepted(feature, use_backend):
    """What the Triton kernels declare, they run (the matrix in tests/ops/test_variants.py checks
    the values)."""
    use_backend("triton")
    q, k, v = _qkv(dtype=torch.float32)
    assert flash_attn_func(q, k, v, **FEATURE_REQUESTS[feature]()).shape == q.shape


def test_window_minus_one_zero_is_causal(use_backend):
    """window_size=(-1, 0) is causal (flash-attn): the Triton kernels take it as such."""
    use_backend("triton")
    q, k, v = _qkv(dtype=torch.float32)
    assert torch.equal(flash_attn_func(q, k, v, window_size=(-1, 0)), flash_attn_func(q, k, v, causal=True))


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "cuda-magic")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="FLASHATTN_BACKEND"):
        flash_attn_func(q, k, v)


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("FLASHATTN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.select_backend(torch.device("cpu")) == "reference"
    assert dispatch.select_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("FLASHATTN_BACKEND", "reference")
    assert dispatch.select_backend(torch.device("cuda")) == "reference"


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_packed_variants_equal_unpacked(backend, use_backend):
    use_backend(backend)
    q, k, v = _qkv(sq=20, sk=20, h=4, hk=2)
    qkv = torch.stack([q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)], dim=2).requires_grad_()
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    ref = flash_attn_func(*qkv.detach().unbind(2), causal=True)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()

    kv = torch.stack([k, v], dim=2)
    assert torch.equal(flash_attn_kvpacked_func(q, kv), flash_attn_func(q, k, v))


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("b, sq, sk, h", [(0, 5, 5, 2), (1, 0, 5, 2), (1, 5, 0, 2)],
                         ids=["batch0", "seqlen_q0", "seqlen_k0"])
def test_empty_inputs(backend, b, sq, sk, h, use_backend):
    use_backend(backend)
    q, k, v = (x.requires_grad_() for x in _qkv(b=b, sq=sq, sk=sk, h=h, hk=h))
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (b, h, sq)
    assert (out == 0).all() and (lse == float("inf")).all()
    out.sum().backward()
    for x in (q, k, v):
        assert x.grad.shape == x.shape and (x.grad == 0).all()


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_default_scale_and_explicit_scale(backend, use_backend):
    use_backend(backend)
    q, k, v = _qkv(dtype=torch.float32)
    ref, _ = attention_standard(q, k, v, 0.3, False)
    torch.testing.assert_close(flash_attn_func(q, k, v, softmax_scale=0.3), ref, atol=1e-5, rtol=1e-5)
    ref, _ = attention_standard(q, k, v, 1 / math.sqrt(q.shape[-1]), False)
    torch.testing.assert_close(flash_attn_func(q, k, v), ref, atol=1e-5, rtol=1e-5)


def test_last_dim_not_contiguous():
    q, k, v = _qkv(dtype=torch.float32)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last-dim stride != 1
    assert qt.stride(-1) != 1
    torch.testing.assert_close(flash_attn_func(qt, k, v), flash_attn_func(q, k, v))


def _op_options(with_variants: bool, sq: int, sk: int, h: int):
    """The custom operators' option arguments (custom_ops.VARIANT_ARGS): plain causal, or every option."""
    if not with_variants:
        return (True, -1, 0, 0.0, None, 0.0, None, None, None, None, None, None, None, 0, False, None, None, 0, 0, 0)
    bm = flashattn.BlockMask.from_dense(torch.rand(1, h, -(-sq // 16), -(-sk // 16)) < 0.7, block_size=16)
    bm = bm.to(DEVICE)
    bias = torch.randn(1, h, 1, sk, device=DEVICE, requires_grad=True)
    return (True, 9, 0, 3.0, torch.rand(h, device=DEVICE), 0.25, philox.draw_seed(), bias, bm.mask, bm.kv_num_blocks,
            bm.kv_indices, bm.q_num_blocks, bm.q_indices, bm.block_size, True, None, None, 0, 0, 16)


_OPCHECK_CASES = pytest.mark.parametrize(
    "backend, with_variants", [("triton", False), ("triton", True), ("reference", False), ("reference", True)],
    ids=["triton", "triton-every-option", "reference", "reference-every-option"])


@_OPCHECK_CASES
def test_custom_ops_pass_opcheck(backend, with_variants):
    """The operators themselves (schema, fake implementations, no aliasing); they carry no autograd:
    custom_ops.attention's autograd.Function wraps them."""
    q, k, v = _qkv(sq=17, sk=23, h=2, hk=1, dtype=torch.float32)
    options = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in _op_options(with_variants, 17, 23, 2))
    torch.library.opcheck(custom_ops.attention_forward, (q, k, v, 0.2, *options, backend))
    out, lse = custom_ops.attention_forward(q, k, v, 0.2, *options, backend)
    for bias_grad in ((False, True) if with_variants else (False,)):
        torch.library.opcheck(custom_ops.attention_backward,
                              (torch.randn_like(out), q, k, v, out, lse, None, 0.2, *options, bias_grad, backend))


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Passes every operator through and records the names of the flashattn ones."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "flashattn":
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@_OPCHECK_CASES
def test_eager_path_equals_operator_path(backend, with_variants):
    """Eager calls skip the custom operators (their dispatch costs more than a short kernel); under a
    dispatch mode (as under tracing) the operators run: same outputs and gradients, bit for bit."""
    q, k, v = _qkv(sq=17, sk=23, h=2, hk=1, dtype=torch.float32)
    options = _op_options(with_variants, 17, 23, 2)
    bias = options[custom_ops.VARIANT_ARGS.index("attn_bias")]
    grad_of = [x for x in (q, k, v, bias) if x is not None]
    results = []
    for mode in (contextlib.nullcontext(), _RecordOps()):
        for x in grad_of:
            x.requires_grad_().grad = None
        with mode:
            out, lse = custom_ops.attention(q, k, v, 0.2, *options, backend)
            (out.square().sum() + lse.sum()).backward()
        results.append((out, lse, *(x.grad for x in grad_of)))
    assert mode.seen == ["attention_forward.default", "attention_backward.default"]
    for eager, operator in zip(*results):
        torch.testing.assert_close(eager, operator, rtol=0, atol=0)


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_torch_compile_fullgraph(backend, use_backend):
    """A model calling flash_attn_func compiles without graph breaks and gives the same result."""
    use_backend(backend)
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 3 * 32, device=DEVICE)

        def forward(self, x):
            q, k, v = self.proj(x).unflatten(-1, (3, 2, 16)).unbind(2)
            return flash_attn_func(q, k, v, causal=True).flatten(-2)

    model = Block()
    x = torch.randn(2, 19, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_torch_compile_fullgraph_every_option(use_backend):
    """Every option traces too, the dropout seed draw and the bias gradient included."""
    use_backend("reference")
    torch._dynamo.reset()
    bias = torch.randn(2, 1, 19, device=DEVICE, requires_grad=True)
    slopes = torch.rand(2, device=DEVICE)
    block_mask = flashattn.local_global_block_mask(19, 19, local_blocks=0, global_blocks=1, block_size=16,
                                                   device=DEVICE)

    def attend(x, dropout_p):
        q, k, v = x.unflatten(-1, (3, 2, 16)).unbind(2)
        return flash_attn_func(q, k, v, dropout_p, causal=True, window_size=(7, 0), softcap=4.0,
                               alibi_slopes=slopes, attn_bias=bias, block_mask=block_mask).flatten(-2)

    x = torch.randn(2, 19, 96, device=DEVICE, requires_grad=True)
    compiled = torch.compile(attend, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    torch.testing.assert_close(compiled(x, 0.0), attend(x, 0.0))
    out = compiled(x, 0.3)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and bias.grad.shape == bias.shape and torch.isfinite(bias.grad).all()


def test_version():
    assert flashattn.__version__


def test_no_size_limit_but_the_kernels_row_indices(use_backend):
    """Tensors past 2^31 elements and any row stride are taken (the kernels' bases are 64-bit, and so
    are their offsets within a sequence where those may pass 2^31): what is refused, with the numbers,
    is a sequence of 2^29 rows or more (32-bit row indices) and rows of more than 2^23 elements (nheads x
    headdim), whose output tiles of 256 rows pass 2^31. (Meta tensors and expanded views: no memory
    behind them.)"""
    from flashattn.interface import MAX_SEQLEN, _check_extents

    use_backend("triton")
    big = torch.empty(1, 2 ** 20, 16, 128, dtype=torch.bfloat16, device="meta")          # 2^31 elements
    _check_extents(big, big, (2 ** 20, 2 ** 20))
    packed = torch.empty(1, 2 ** 26, 16, 128, dtype=torch.bfloat16, device="meta")     # 2^37 elements
    _check_extents(packed, packed, (2 ** 20, 2 ** 20))
    small = torch.zeros(1, 4, 1, 8, dtype=torch.float16, device=DEVICE)
    huge = torch.zeros(1, 1, 1, 8, dtype=torch.float16, device=DEVICE).expand(1, MAX_SEQLEN, 1, 8)  # stride 0
    with pytest.raises(ValueError, match=r"a query sequence of 536870912 rows: .* shorter than 2\^29"):
        flash_attn_func(huge, small, small)
    with pytest.raises(ValueError, match=r"a key sequence of 536870912 rows"):
        flash_attn_func(small, huge, huge)
    _check_extents(huge[:, 1:], small, (MAX_SEQLEN - 1, 4))                           # one row less
    strided = torch.empty_strided((1, 300, 1, 8), (0, 2 ** 24, 0, 1), dtype=torch.float16, device="meta")
    _check_extents(small, strided, (4, 300))                                           # rows 2^24 apart
    many_heads = torch.empty(1, 4, 2 ** 15 + 1, 256, dtype=torch.float16, device="meta")   # rows past 2^23
    with pytest.raises(ValueError, match=r"k: nheads x headdim = 8388864"):
        _check_extents(small, many_heads, (4, 4))
    _check_extents(small, many_heads[:, :, 1:], (4, 4))                                # 2^23: the last fits

@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_casts_the_inputs_as_torch_sdpa_does(backend, use_backend):
    """Under torch.autocast, float32 inputs (and a float bias) are cast to the autocast dtype, as
    torch's scaled_dot_product_attention's are; float64 is left alone; gradients reach the float32
    leaves in float32. The packed and varlen forms take the same path."""
    use_backend(backend)
    torch.manual_seed(0)
    low = torch.bfloat16
    q, k, v = (torch.randn(2, 17, 4, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 4, 17, 17, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=low):
        out = flash_attn_func(q, k.to(low), v, causal=True, attn_bias=bias)
        assert out.dtype == low
        packed = flash_attn_qkvpacked_func(torch.stack((q, k, v), dim=2), causal=True)
        assert packed.dtype == low
        cu = torch.tensor([0, 17, 34], dtype=torch.int32, device=DEVICE)
        varlen = flashattn.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 17, 17,
                                                  causal=True)
        assert varlen.dtype == low
        if backend == "reference":
            assert flash_attn_func(q.double(), k.double(), v.double()).dtype == torch.float64
    expected = flash_attn_func(*(x.detach().to(low) for x in (q, k, v)), causal=True, attn_bias=bias.to(low))
    assert torch.equal(out, expected)
    torch.testing.assert_close(packed, varlen.view_as(packed), atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0
