"""The Hopper Gluon kernels (flashattn/ops/triton/forward_sm90.py, the ping-pong forward, and
backward_sm90.py, the one-pass backward) have no interpreter: their numerical tests run on an sm_90
GPU (tests/ops/test_attention.py, test_ping_pong_* and test_one_pass_*). Here, on any machine, every
build the library launches compiles for sm_90 and fits in an H100's shared memory, so CI sees a kernel
that no longer compiles."""
import itertools

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from flashattn.ops.triton import backward_sm90 as B, forward_sm90 as F

H100_SHARED = 232448   # bytes of shared memory a block may use on sm_90
POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DK": "*bf16", "DV": "*bf16",
            "LSE": "*fp32", "DELTA": "*fp32", "DQ_ACC": "*fp32", "SEM": "*i32"}


def _compile_sm90(fn, constexprs: dict, num_warps: int):
    def kind(name: str) -> str:
        if name in POINTERS:
            return POINTERS[name]
        if name in ("softmax_scale", "qk_scale"):
            return "fp32"
        return "constexpr" if name.isupper() or name == "num_warps" else "i32"
    signature = {p.name: kind(p.name) for p in fn.params}
    src = GluonASTSource(fn=fn, signature=signature, constexprs={**constexprs, "num_warps": num_warps})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


@pytest.mark.parametrize("head_dim, causal", list(itertools.product(F.HEAD_DIMS, (False, True))),
                         ids=lambda x: str(x))
def test_every_forward_build_compiles_for_sm90(head_dim, causal):
    kernel = _compile_sm90(F._attn_fwd_sm90, dict(HEAD_DIM=head_dim, ROWS=F.ROWS, BLOCK_N=F.BLOCK_N[head_dim],
                                                  STAGES=F.STAGES[head_dim, causal], IS_CAUSAL=causal), F.NUM_WARPS)
    assert kernel.metadata.shared <= H100_SHARED
    # Two consumer warp groups and the producer warp (rounded up to a warp group).
    assert kernel.metadata.num_warps == 3 * F.NUM_WARPS


@pytest.mark.parametrize("head_dim, causal, deterministic", list(itertools.product(B.HEAD_DIMS, (False, True),
                                                                                    (False, True))),
                         ids=lambda x: str(x))
def test_every_backward_build_compiles_for_sm90(head_dim, causal, deterministic):
    kernel = _compile_sm90(B._attn_bwd_sm90, dict(HEAD_DIM=head_dim, BLOCK_M=B.BLOCK_M[head_dim], BLOCK_N=B.BLOCK_N,
                                                  IS_CAUSAL=causal, STAGES=B.STAGES, DQ_STAGES=B.DQ_STAGES,
                                                  DETERMINISTIC=deterministic), B.NUM_WARPS)
    assert kernel.metadata.shared <= H100_SHARED
    # The deterministic build adds the dQ writer warp (rounded up to a warp group).
    assert kernel.metadata.num_warps == B.NUM_WARPS + (4 if deterministic else 0)
