"""The public API: flash-attn compatibility, input validation, packed variants, empty inputs,
custom-operator registration and torch.compile."""
from __future__ import annotations

import math
import re

import pytest
import torch

import flashattn
from flashattn import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from flashattn.ops import custom_ops, dispatch
from flashattn.ops.reference import attention_standard

from conftest import DEVICE, HAS_CUDA


def _qkv(b=1, sq=20, sk=20, h=2, hk=2, d=32, dtype=torch.float16, device=DEVICE):
    q = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    k = torch.randn(b, sk, hk, d, dtype=dtype, device=device)
    return q, k, torch.randn_like(k)


def test_signature_matches_flash_attn():
    import inspect
    expected = ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap",
                "alibi_slopes", "deterministic", "return_attn_probs"]
    assert list(inspect.signature(flash_attn_func).parameters) == expected
    assert list(inspect.signature(flash_attn_qkvpacked_func).parameters) == ["qkv"] + expected[3:]
    assert list(inspect.signature(flash_attn_kvpacked_func).parameters) == ["q", "kv"] + expected[3:]


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
], ids=["rank", "not-tensor", "dtype-mismatch", "kv-shape", "batch", "head-dim-mismatch", "gqa-divisible",
        "heads0", "dropout-range", "window-form", "softcap-negative", "scale-nan", "causal-type", "qkv-shape",
        "kv-packed-shape"])
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


@pytest.mark.parametrize("kwargs, feature", [
    (dict(dropout_p=0.1), "dropout"),
    (dict(window_size=(8, 0)), "window"),
    (dict(softcap=30.0), "softcap"),
    (dict(alibi_slopes=torch.ones(2)), "alibi"),
], ids=["dropout", "window", "softcap", "alibi"])
def test_options_not_yet_implemented_are_never_ignored(kwargs, feature):
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=feature):
        flash_attn_func(q, k, v, **kwargs)


def test_every_missing_option_is_listed():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="dropout, softcap, window"):
        flash_attn_func(q, k, v, dropout_p=0.1, softcap=5.0, window_size=(4, 4))


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


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    q, k, v = _qkv(sq=17, sk=23, h=2, hk=1, dtype=torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(custom_ops.attention_forward, (q, k, v, 0.2, True, backend))
    out, lse = custom_ops.attention_forward(q, k, v, 0.2, True, backend)
    torch.library.opcheck(custom_ops.attention_backward,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
                           lse.detach(), None, 0.2, True, backend))


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


def test_version():
    assert flashattn.__version__
