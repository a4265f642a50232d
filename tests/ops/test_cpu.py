"""torch's fused CPU kernel serves exactly the plain, finite calls (flashattn/ops/cpu.py), and what it
returns meets the error rule against float64, forward and backward, GQA included."""
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
    assert cpu.applies(q, k, PLAIN, q, k) and cpu.applies(q, k, CAUSAL, q, k)
    assert not cpu.applies(q, k[:, :5], CAUSAL, q)                 # top-left != bottom-right when Sq != Sk
    assert cpu.applies(q, k[:, :5], PLAIN, q)
    assert not cpu.applies(q.double(), k.double(), PLAIN)        # float64: the high-precision path
    assert not cpu.applies(q, k, Variant(softcap=1.0))
    assert not cpu.applies(q, k, Variant(deterministic=True))
    assert not cpu.applies(q, k, PLAIN, dlse=torch.zeros(1, 4, 9))
    bad = q.clone()
    bad[0, 3, 1, 2] = float("nan")
    assert not cpu.applies(bad, k, PLAIN, bad, k)
    bad[0, 3, 1, 2] = float("-inf")
    assert not cpu.applies(bad, k, PLAIN, bad, k)
    big = torch.full((1, 9, 4, 16), 60000.0, dtype=torch.float16)   # finite; its float16 sum would overflow
    assert cpu.applies(big, big, PLAIN, big)


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
