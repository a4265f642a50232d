"""The Triton backward's program layouts (configs.BackwardConfig) all give the right gradients: dK/dV
and dQ in separate launches, in one grid, and dV and dK in programs of their own."""
from __future__ import annotations

import math

import pytest
import torch

from errors import assert_within_factor
from flashattn.ops.reference import attention_standard
from shapes import Shape, random_inputs

from conftest import HAS_CUDA

pytest.importorskip("triton")
from flashattn.ops.triton import backward as triton_backward  # noqa: E402
from flashattn.ops.triton import configs  # noqa: E402
from flashattn.ops.triton import forward as triton_forward  # noqa: E402

T = configs.TileConfig
LAYOUTS = {  # small tiles under the interpreter, the table's sizes on a GPU
    "separate": configs.BackwardConfig(kv=T(32, 16, 4, 1), q=T(16, 32, 4, 1)) if not HAS_CUDA else
    configs.BackwardConfig(kv=T(64, 64, 4, 2), q=T(128, 64, 8, 3)),
    "one-grid": configs.BackwardConfig(kv=T(32, 16, 4, 1), q=T(16, 32, 4, 1), one_launch=True) if not HAS_CUDA
    else configs.BackwardConfig(kv=T(64, 64, 4, 2), q=T(64, 64, 4, 2), one_launch=True),
    "dk-apart": configs.BackwardConfig(kv=T(16, 32, 4, 1), q=T(32, 16, 4, 1), dk=T(32, 16, 4, 1)) if not HAS_CUDA
    else configs.BackwardConfig(kv=T(32, 64, 4, 2), q=T(64, 32, 4, 3), dk=T(64, 64, 4, 2)),
}
SHAPES = ([Shape(1, 65, 33, 4, 2, 40), Shape(2, 17, 48, 2, 2, 64)] if not HAS_CUDA else
          [Shape(1, 1000, 777, 8, 2, 128), Shape(2, 513, 513, 4, 4, 256)])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_backward_layout_matches_float64(layout, shape, causal, monkeypatch):
    table = configs._table_config
    monkeypatch.setattr(configs, "_table_config",
                        lambda kind, *a: LAYOUTS[layout] if kind == "bwd" else table(kind, *a))
    monkeypatch.setattr(configs, "_chosen", {})
    torch.manual_seed(3)
    dtype = torch.float16
    q, k, v, do = random_inputs(shape, dtype)
    scale = 1 / math.sqrt(shape.head_dim)
    out, lse = triton_forward.forward(q, k, v, scale, causal)
    grads = triton_backward.backward(do, q, k, v, out, lse, scale, causal)

    def standard(cast):
        leaves = [x.detach().to(cast).requires_grad_() for x in (q, k, v)]
        o, _ = attention_standard(*leaves, scale, causal)
        return torch.autograd.grad(o, leaves, do.to(cast))
    for name, ours, same, ref in zip(("dq", "dk", "dv"), grads, standard(dtype), standard(torch.float64)):
        assert_within_factor(name, ours, same, ref, dtype, shape.head_dim)
