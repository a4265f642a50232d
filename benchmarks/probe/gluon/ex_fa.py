import torch, triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (
    tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

# Simple (non-warp-specialized) FA forward for one head: Q,K,V,O are [B*H*N, D] 2-D views.
@gluon.jit
def attn_fwd(q_desc, k_desc, v_desc, o_desc, N_CTX, qk_scale,
             BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
             CAUSAL: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.program_id(0)
    off_hz = gl.program_id(1)
    row0 = off_hz * N_CTX          # first row of this (batch, head) in the 2-D view
    off_m = pid_m * BM

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)   # layout of per-row vectors (m_i, l_i)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bar.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row0 + off_m, 0], q_bar, q_smem)

    if CAUSAL:
        hi = gl.minimum(N_CTX, off_m + BM)
    else:
        hi = N_CTX
    n_blocks = gl.cdiv(hi, BN)
    kv_bytes: gl.constexpr = 2 * BN * D * 2
    # prologue: fill STAGES-1 slots
    for i in gl.static_range(STAGES - 1):
        mbarrier.expect(kv_bar.index(i), kv_bytes, pred=i < n_blocks)
        tma.async_copy_global_to_shared(k_desc, [row0 + i * BN, 0], kv_bar.index(i), k_smem.index(i), pred=i < n_blocks)
        tma.async_copy_global_to_shared(v_desc, [row0 + i * BN, 0], kv_bar.index(i), v_smem.index(i), pred=i < n_blocks)

    m_i = gl.full([BM], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.full([BM], 0.0, gl.float32, layout=row_s)
    acc = gl.zeros([BM, D], gl.float32, layout=o_layout)
    offs_m = off_m + gl.arange(0, BM, layout=row_s)
    mbarrier.wait(q_bar, 0)

    for j in range(n_blocks):
        # issue load for block j + STAGES - 1 (its slot was consumed at iteration j-1, whose wgmmas were waited)
        nj = j + STAGES - 1
        ns = nj % STAGES
        mbarrier.expect(kv_bar.index(ns), kv_bytes, pred=nj < n_blocks)
        tma.async_copy_global_to_shared(k_desc, [row0 + nj * BN, 0], kv_bar.index(ns), k_smem.index(ns), pred=nj < n_blocks)
        tma.async_copy_global_to_shared(v_desc, [row0 + nj * BN, 0], kv_bar.index(ns), v_smem.index(ns), pred=nj < n_blocks)

        s = j % STAGES
        mbarrier.wait(kv_bar.index(s), (j // STAGES) & 1)
        k_t = k_smem.index(s).permute((1, 0))            # [D, BN] view: B operand of Q @ K^T
        qk = gl.zeros([BM, BN], gl.float32, layout=s_layout)
        qk = warpgroup_mma(q_smem, k_t, qk, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))

        qk = qk * qk_scale                                # qk_scale = sm_scale * log2(e)
        offs_n = j * BN + gl.arange(0, BN, layout=col_s)
        if CAUSAL:
            mask = gl.expand_dims(offs_m, 1) >= gl.expand_dims(offs_n, 0)
        else:
            mask = gl.expand_dims(offs_n < N_CTX, 0)
        qk = gl.where(mask, qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, axis=1))      # gl.max(axis=1) -> SliceLayout(1, s_layout)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(qk - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)

        p16 = gl.convert_layout(p.to(dtype), p_layout)    # P stays in registers as the A operand
        acc = warpgroup_mma(p16, v_smem.index(s), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bar.index(i))
    acc = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
    o_smem = gl.allocate_shared_memory(dtype, [BM, D], o_desc.layout)
    o_smem.store(acc.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [row0 + off_m, 0], o_smem)
    tma.store_wait(0)


def attention(q, k, v, causal, BM=128, BN=64, STAGES=2, num_warps=4):
    B, H, N, D = q.shape
    o = torch.empty_like(q)
    q2, k2, v2, o2 = (t.reshape(B * H * N, D) for t in (q, k, v, o))
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    ql = gl.NVMMASharedLayout.get_default_for([BM, D], gdt)
    kl = gl.NVMMASharedLayout.get_default_for([BN, D], gdt)
    qd = TensorDescriptor.from_tensor(q2, [BM, D], ql)
    kd = TensorDescriptor.from_tensor(k2, [BN, D], kl)
    vd = TensorDescriptor.from_tensor(v2, [BN, D], kl)
    od = TensorDescriptor.from_tensor(o2, [BM, D], ql)
    sm_scale = D ** -0.5
    grid = (triton.cdiv(N, BM), B * H)
    attn_fwd[grid](qd, kd, vd, od, N, sm_scale * 1.4426950408889634, BM, BN, D, STAGES, causal, num_warps=num_warps)
    return o

if __name__ == "__main__":
    import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gcompile import gcompile, desc_sig
    x = torch.empty(1024, 64, dtype=torch.bfloat16)
    ql = gl.NVMMASharedLayout.get_default_for([128, 64], gl.bfloat16)
    kl = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
    qs = desc_sig(TensorDescriptor.from_tensor(x, [128, 64], ql)); ks = desc_sig(TensorDescriptor.from_tensor(x, [64, 64], kl))
    sig = dict(q_desc=qs, k_desc=ks, v_desc=ks, o_desc=qs, N_CTX="i32", qk_scale="fp32",
               BM="constexpr", BN="constexpr", D="constexpr", STAGES="constexpr", CAUSAL="constexpr", num_warps="constexpr")
    for causal in (False, True):
        gcompile(attn_fwd, sig, dict(BM=128, BN=64, D=64, STAGES=2, CAUSAL=causal, num_warps=4), num_warps=4)
