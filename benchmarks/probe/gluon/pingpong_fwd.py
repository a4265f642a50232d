"""Probe (written in session 5 without a GPU: it compiles for sm_90 here, it has not run): a Gluon
forward with FlashAttention-3's ping-pong schedule, the next step past forward._attn_fwd_ws.

One program per 128 query rows of one (batch, head), three partitions (gl.warp_specialize):
    producer      1 warp: Q's two 64-row halves once, then K_j, V_j into a ring of STAGES slots
                  (kv_ready / kv_empty mbarriers; a slot is empty when both consumers released it)
    consumer 0/1  a warp group each, 64 query rows each. Iteration j issues Q K_j^T and then
                  P_{j-1} V_{j-1} (O rescaled by block j-1's alpha first), waits for the first and runs
                  the softmax of block j while the second is in the tensor cores; and the two warp
                  groups take turns to issue (mbarriers `turn`), so one's exponentials also overlap the
                  other's products.
Inputs are (B, H, N, D) contiguous, N a multiple of 128 (a probe, not the library's layout), bf16/fp16.
`python benchmarks/probe/gluon/pingpong_fwd.py` compiles it for sm_90 and prints registers and spills;
on a GPU, `--run` checks it against SDPA and times it beside SDPA.
"""
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

ROWS = 64                                   # query rows per consumer warp group
BLOCK_N = {64: 128, 128: 128, 256: 64}      # keys per block, per head dim (registers: O is 2 x D / 2 a thread)
STAGES = 2


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, row0, off_m, n_blocks,
              ROWS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row0 + off_m, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [row0 + off_m + ROWS, 0], q_bar, q_smem.index(1))
    for j in range(n_blocks):
        s = j % STAGES
        mbarrier.wait(kv_empty.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(kv_ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row0 + j * BLOCK_N, 0], kv_ready.index(s), k_smem.index(s))
        tma.async_copy_global_to_shared(v_desc, [row0 + j * BLOCK_N, 0], kv_ready.index(s), v_smem.index(s))


@gluon.jit
def _my_turn(turn, t, WG: gl.constexpr):
    """Wait for this warp group's t-th turn to issue products (warp group 0 goes first)."""
    if WG == 0:
        mbarrier.wait(turn.index(0), (t & 1) ^ 1)
    else:
        mbarrier.wait(turn.index(1), t & 1)


@gluon.jit
def _softmax(qk, m_i, l_i, qk_scale, offs_m, offs_n, MASKED: gl.constexpr):
    """P of one block and the running max and sum; alpha rescales O once its last product is in."""
    qk = qk * qk_scale
    if MASKED:
        qk = gl.where(gl.expand_dims(offs_m, 1) >= gl.expand_dims(offs_n, 0), qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, axis=1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(qk - gl.expand_dims(m_new, 1))
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _consumer(O, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, row0, off_m, n_blocks, qk_scale,
              WG: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, CAUSAL: gl.constexpr, WARPS: gl.constexpr):
    dtype: gl.constexpr = O.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q = q_smem.index(WG)
    offs_m = off_m + WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)

    # Block 0: Q K_0^T alone.
    mbarrier.wait(kv_ready.index(0), 0)
    _my_turn(turn, 0, WG)
    qk = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.arrive(turn.index(1 - WG), count=1)
    qk = warpgroup_mma_wait(0, deps=(qk,))
    p, m_i, l_i, alpha = _softmax(qk, m_i, l_i, qk_scale, offs_m, cols, CAUSAL and n_blocks == 1)
    for j in range(1, n_blocks):
        s = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(kv_ready.index(s), (j // STAGES) & 1)
        _my_turn(turn, j, WG)
        # Q K_j^T first, then P_{j-1} V_{j-1}: the softmax of block j runs while the second is still
        # in the tensor cores (and while the other warp group issues its pair).
        qk = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        mbarrier.arrive(turn.index(1 - WG), count=1)
        qk = warpgroup_mma_wait(1, deps=(qk,))
        if CAUSAL and j == n_blocks - 1:
            p, m_i, l_i, alpha = _softmax(qk, m_i, l_i, qk_scale, offs_m, j * BLOCK_N + cols, True)
        else:
            p, m_i, l_i, alpha = _softmax(qk, m_i, l_i, qk_scale, offs_m, j * BLOCK_N + cols, False)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        mbarrier.arrive(kv_empty.index(prev), count=1)
    # The last block's P V.
    last = (n_blocks - 1) % STAGES
    _my_turn(turn, n_blocks, WG)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    mbarrier.arrive(turn.index(1 - WG), count=1)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    mbarrier.arrive(kv_empty.index(last), count=1)

    acc = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    dcols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_ptrs = O + (row0 + off_m + WG * ROWS) * HEAD_DIM + gl.expand_dims(rows * HEAD_DIM, 1) + gl.expand_dims(dcols, 0)
    gl.store(o_ptrs, acc.to(dtype))


@gluon.jit
def pingpong_fwd(q_desc, k_desc, v_desc, O, N_CTX, qk_scale, HEAD_DIM: gl.constexpr, ROWS: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    off_m = gl.program_id(0) * (2 * ROWS)
    row0 = gl.program_id(1) * N_CTX
    if CAUSAL:
        n_blocks = gl.cdiv(off_m + 2 * ROWS, BLOCK_N)
    else:
        n_blocks = gl.cdiv(N_CTX, BLOCK_N)
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)       # both consumers release a slot
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_consumer, (O, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, row0, off_m, n_blocks, qk_scale,
                     0, ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, num_warps)),
        (_consumer, (O, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, row0, off_m, n_blocks, qk_scale,
                     1, ROWS, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, num_warps)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, row0, off_m,
                     n_blocks, ROWS, BLOCK_N, STAGES)),
    ], [4, 1], [240, 24])


def _descriptors(q, k, v):
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    d = q.shape[-1]
    q_layout = gl.NVMMASharedLayout.get_default_for([ROWS, d], gdt)
    kv_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N[d], d], gdt)
    return (TensorDescriptor.from_tensor(q.reshape(-1, d), [ROWS, d], q_layout),
            TensorDescriptor.from_tensor(k.reshape(-1, d), [BLOCK_N[d], d], kv_layout),
            TensorDescriptor.from_tensor(v.reshape(-1, d), [BLOCK_N[d], d], kv_layout))


def attention(q, k, v, causal):
    b, h, n, d = q.shape
    o = torch.empty_like(q)
    qd, kd, vd = _descriptors(q, k, v)
    pingpong_fwd[(n // (2 * ROWS), b * h)](qd, kd, vd, o, n, d ** -0.5 * 1.4426950408889634, HEAD_DIM=d, ROWS=ROWS,
                                          BLOCK_N=BLOCK_N[d], STAGES=STAGES, CAUSAL=causal, num_warps=4)
    return o


if __name__ == "__main__":
    if "--run" in sys.argv:
        for d, causal in ((128, False), (128, True), (64, False), (256, False), (256, True)):
            q, k, v = (torch.randn(2, 4, 1024, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            print(f"D{d}", "causal" if causal else "full", "max error",
                  (attention(q, k, v, causal) - ref).abs().max().item())
            h = 2048 // d
            q, k, v = (torch.randn(4, h, 4096, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * 4 * h * 4096 ** 2 * d / (2 if causal else 1)
            for name, fn in (("pingpong", lambda: attention(q, k, v, causal)),
                             ("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))):
                print(name, round(flops / triton.testing.do_bench(fn) / 1e9, 1), "TFLOP/s")
    else:
        import os
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gcompile import desc_sig, gcompile
        for d in (64, 128, 256):
            x = torch.empty(1024, d, dtype=torch.bfloat16)
            qd, kd, _ = _descriptors(x, x, x)
            sig = dict(q_desc=desc_sig(qd), k_desc=desc_sig(kd), v_desc=desc_sig(kd), O="*bf16", N_CTX="i32",
                       qk_scale="fp32", HEAD_DIM="constexpr", ROWS="constexpr", BLOCK_N="constexpr",
                       STAGES="constexpr", CAUSAL="constexpr", num_warps="constexpr")
            for causal in (False, True):
                print(f"D{d} causal={causal}: ", end="")
                gcompile(pingpong_fwd, sig, dict(HEAD_DIM=d, ROWS=ROWS, BLOCK_N=BLOCK_N[d], STAGES=STAGES,
                                                 CAUSAL=causal, num_warps=4), num_warps=4)
