"""torch's fused CPU kernel serves exactly the plain calls whose values it computes as reference.py does
(flashattn/ops/cpu.py), and what it returns meets the error rule against float64, forward and backward,
GQA included."""
import itertools
import math

import pytest
import torch

from conftest import DEVICE
from errors import assert_within_factor
import flashattn
from flashattn import flash_attn_func
from flashattn.ops import cpu, custom_ops
from flashattn.ops.reference import attention_standard
from flashattn.ops.variant import CAUSAL, PLAIN, Variant

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path")


def test_which_calls_it_serves():
    q, k = torch.randn(1, 9, 4, 16), torch.randn(1, 9, 2, 16)
    assert cpu.applies(q, k, PLAIN) and cpu.applies(q, k, CAUSAL)
    assert not cpu.applies(q, k[:, :5], CAUSAL)                  # top-left != bottom-right when Sq != Sk
    assert cpu.applies(q, k[:, :5], PLAIN)
    assert cpu.applies(q, k, Variant(causal=True, window_right=0))
    assert not cpu.applies(q.double(), k.double(), PLAIN)        # float64: the high-precision path
    assert not cpu.applies(q, k, Variant(softcap=1.0))
    assert not cpu.applies(q, k, Variant(deterministic=True))
    assert not cpu.applies(q, k, Variant(tile_size=32))
    assert not cpu.applies(q, k, PLAIN, dlse=torch.zeros(1, 4, 9))


def test_which_values_it_serves():
    """NaN or inf in v (forward), or in k, v, dout (backward), or in q without a clean lse: reference.py.
    A legitimate lse of 0, and a finite float16 input whose float16 sum would overflow, stay on the kernel."""
    q, k, v = torch.randn(1, 9, 4, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    out, lse = cpu.forward(q, k, v, 0.25, False)
    args = (q, k, v, out, lse, 0.25, False)
    assert cpu.backward(torch.randn_like(q), *args) is not None
    for name in ("q", "k", "v", "dout"):
        for value in (float("nan"), float("inf"), float("-inf")):
            tensors = dict(q=q.clone(), k=k.clone(), v=v.clone(), dout=torch.randn_like(q))
            tensors[name][0, 3, 1, 2] = value
            if name == "v":
                assert cpu.forward(tensors["q"], tensors["k"], tensors["v"], 0.25, False) is None
            bad_lse = lse.clone()
            bad_lse[0, 1, 3] = float("nan")           # what the forward gives a NaN in q
            assert cpu.backward(tensors["dout"], tensors["q"], tensors["k"], tensors["v"], out,
                                bad_lse if name == "q" else lse, 0.25, False) is None, (name, value)
    q[0, 3, 1, 2] = float("inf")
    assert cpu.forward(q, k, v, 0.25, False) is None
    zero = torch.zeros(1, 9, 4, 16)                   # one key, scores 0: lse = log(1) = 0, finite inputs
    out, lse = cpu.forward(zero, k[:, :1], v[:, :1], 0.25, False)
    assert (lse == 0).all() and torch.equal(out, v[:, :1].repeat_interleave(2, dim=2).expand_as(out))
    big = torch.full((1, 9, 4, 16), 60000.0, dtype=torch.float16)   # finite; its float16 sum would overflow
    assert cpu.forward(big, big, big, 1e-9, False) is not None


def _nonfinite_cases():
    nan, inf = float("nan"), float("inf")
    for shape, causal, which, value, where, dtype in itertools.product(
            ((1, 40, 40, 4, 2, 16), (1, 520, 520, 1, 1, 16), (2, 37, 70, 4, 4, 16)), (False, True), "qkvd",
            (nan, inf, -inf), ("element", "row", "masked key"), (torch.float32, torch.bfloat16, torch.float16)):
        if (causal and shape[1] != shape[2]) or (where == "masked key" and which != "k"):
            continue
        if shape[1] == 520 and (dtype != torch.float32 or where == "row"):
            continue
        yield shape, causal, which, value, where, dtype


def test_nonfinite_inputs_as_reference(monkeypatch, use_backend):
    """With a NaN or inf in any input (an element, a row, or a key whose score is +-inf in every row
    that sees it, which the kernel serves), flash_attn_func's outputs and gradients on the CPU path are
    reference.py's: the same NaN and inf entries, the rest within rounding. Lengths of one and of two
    of the kernel's key blocks, GQA, seqlen_q != seqlen_k."""
    use_backend("reference")
    applies = cpu.applies
    tolerance = {torch.float32: 2e-4, torch.bfloat16: 3e-1, torch.float16: 3e-2}

    def run(q, k, v, do, causal, fused):
        monkeypatch.setattr(cpu, "applies", applies if fused else (lambda *args, **kwargs: False))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse, _ = flash_attn_func(*leaves, causal=causal, return_attn_probs=True)
        return (out, lse, *torch.autograd.grad(out, leaves, do))

    for (b, sq, sk, h, hk, d), causal, which, value, where, dtype in _nonfinite_cases():
        g = torch.Generator().manual_seed(sq + sk)
        q, do = (torch.randn(b, sq, h, d, generator=g).to(dtype) for _ in range(2))
        k, v = (torch.randn(b, sk, hk, d, generator=g).to(dtype) for _ in range(2))
        x = dict(q=q, k=k, v=v, d=do)[which]
        row, head, col = x.shape[1] // 3, x.shape[2] - 1, d // 2
        if where == "element":
            x[-1, row, head, col] = value
        elif where == "row":
            x[-1, row, head] = value
        else:                                   # q's column col > 0: key `row`'s scores are all +-inf
            q[..., col] = q[..., col].abs() + 0.5
            x[-1, row, head, col] = value
        case = ((b, sq, sk, h, hk, d), causal, which, value, where, dtype)
        for name, ours, ref in zip(("out", "lse", "dq", "dk", "dv"), run(q, k, v, do, causal, True),
                                   run(q, k, v, do, causal, False)):
            assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isinf(), ref.isinf()), (name, case)
            torch.testing.assert_close(ours.float(), ref.float(), atol=tolerance[dtype], rtol=tolerance[dtype],
                                       equal_nan=True, msg=lambda m: f"{name} {case}: {m}")


def test_output_layout(use_backend):
    """O comes back where torch's kernel writes it, as torch.empty_like(q) would lay it out: q's layout
    when q is dense (so the SDPA drop-in's contiguous (B, H, S, D) inputs get a contiguous O, nothing
    copied), contiguous otherwise; the custom operator's O is contiguous, as its fake declares."""
    use_backend("reference")
    dense = {"bshd": torch.randn(1, 33, 4, 16), "bhsd": torch.randn(1, 4, 33, 16).transpose(1, 2),
             "sbhd": torch.randn(33, 2, 4, 16).transpose(0, 1)}
    packed = torch.randn(1, 33, 3, 4, 16)[:, :, 0]                      # not dense: qkvpacked's view
    for name, x in (*dense.items(), ("packed", packed)):
        out = flash_attn_func(x, x, x)
        assert out.stride() == torch.empty_like(x).stride(), name
    q = torch.randn(1, 4, 33, 16)
    assert flashattn.scaled_dot_product_attention(q, q, q).is_contiguous()
    x = dense["bhsd"]
    out, lse = custom_ops.attention_forward(x, x, x, 0.25, False, -1, -1, 0.0, None, 0.0, None, None, None, None,
                                            None, None, None, 0, False, None, None, 0, 0, 0, "reference")
    assert out.is_contiguous() and lse.is_contiguous()
    torch.testing.assert_close(out, flash_attn_func(x, x, x, softmax_scale=0.25), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64(dtype, causal, use_backend):
    use_backend("reference")
    torch.manual_seed(0)
    q = torch.randn(2, 67, 8, 40, dtype=dtype)
    k = torch.randn(2, 67, 2, 40, dtype=dtype)
    v = torch.randn_like(k)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse, _ = flash_attn_func(*leaves, causal=causal, return_attn_probs=True)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    results = []
    for ref_dtype in (torch.float64, dtype):
        ref_leaves = [x.to(ref_dtype).requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = attention_standard(*ref_leaves, 1 / math.sqrt(40), causal)
        results.append((ref_out, ref_lse, *torch.autograd.grad(ref_out, ref_leaves, do.to(ref_dtype))))
    for name, ours, same, r64 in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), results[1], results[0]):
        assert_within_factor(name, ours, same, r64, dtype, 40)
