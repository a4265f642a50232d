"""The Hopper one-pass backward (flashattn/ops/triton/backward_sm90.py) is Gluon, which has no
interpreter: its numerical tests run on an sm_90 GPU (tests/ops/test_attention.py, test_one_pass_*).
Here, on any machine, every build the library launches compiles for sm_90 and fits in an H100's
shared memory, so CI sees a kernel that no longer compiles."""
import itertools

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from flashattn.ops.triton import backward_sm90 as G

H100_SHARED = 232448   # bytes of shared memory a block may use on sm_90
POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "DK": "*bf16", "DV": "*bf16",
            "LSE": "*fp32", "DELTA": "*fp32", "DQ_ACC": "*fp32", "SEM": "*i32"}


def _signature(fn) -> dict[str, str]:
    def kind(name: str) -> str:
        if name in POINTERS:
            return POINTERS[name]
        if name in ("softmax_scale", "qk_scale"):
            return "fp32"
        return "constexpr" if name.isupper() or name == "num_warps" else "i32"
    return {p.name: kind(p.name) for p in fn.params}


@pytest.mark.parametrize("head_dim, causal, deterministic", list(itertools.product(G.HEAD_DIMS, (False, True),
                                                                                    (False, True))),
                         ids=lambda x: str(x))
def test_every_build_compiles_for_sm90(head_dim, causal, deterministic):
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=G.BLOCK_M[head_dim], BLOCK_N=G.BLOCK_N, IS_CAUSAL=causal,
                      STAGES=G.STAGES, DQ_STAGES=G.DQ_STAGES, DETERMINISTIC=deterministic, num_warps=G.NUM_WARPS)
    src = GluonASTSource(fn=G._attn_bwd_sm90, signature=_signature(G._attn_bwd_sm90), constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=G.NUM_WARPS))
    assert kernel.metadata.shared <= H100_SHARED
    # The deterministic build adds the dQ writer warp (rounded up to a warp group).
    assert kernel.metadata.num_warps == G.NUM_WARPS + (4 if deterministic else 0)
