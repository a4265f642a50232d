"""torch's fused CPU kernel serves exactly the plain, finite calls (flashattn/ops/cpu.py), and what it
returns meets the error rule against float64, forward and backward, GQA included."""
import math

import pytest
import torch

from conftest import DEVICE
from errors import assert_within_factor
from flashattn import flash_attn_func
from flashattn.ops import cpu
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
