import torch, triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (
    tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty,
                    row0, off_m, n_blocks, BN: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row0 + off_m, 0], q_bar, q_smem)
    for j in range(n_blocks):
        s = j % STAGES
        ph = (j // STAGES) & 1
        mbarrier.wait(kv_empty.index(s), ph ^ 1)   # fresh barrier: waiting on phase 1 passes immediately
        mbarrier.expect(kv_ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row0 + j * BN, 0], kv_ready.index(s), k_smem.index(s))
        tma.async_copy_global_to_shared(v_desc, [row0 + j * BN, 0], kv_ready.index(s), v_smem.index(s))

@gluon.jit
def _compute_partition(o_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty,
                       row0, off_m, n_blocks, qk_scale, N_CTX,
                       BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
    num_warps: gl.constexpr = gl.num_warps()   # warps of *this* partition
    dtype: gl.constexpr = o_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    m_i = gl.full([BM], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.full([BM], 0.0, gl.float32, layout=row_s)
    acc = gl.zeros([BM, D], gl.float32, layout=o_layout)
    mbarrier.wait(q_bar, 0)
    for j in range(n_blocks):
        s = j % STAGES
        mbarrier.wait(kv_ready.index(s), (j // STAGES) & 1)
        qk = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)),
                           gl.zeros([BM, BN], gl.float32, layout=s_layout), use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(0, deps=(qk,))
        offs_n = j * BN + gl.arange(0, BN, layout=col_s)
        qk = gl.where(gl.expand_dims(offs_n < N_CTX, 0), qk * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(qk - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p16 = gl.convert_layout(p.to(dtype), p_layout, assert_trivial=True)
        acc = warpgroup_mma(p16, v_smem.index(s), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(s), count=1)     # release the K/V slot to the loader
    acc = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
    o_smem = gl.allocate_shared_memory(dtype, [BM, D], o_desc.layout)
    o_smem.store(acc.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [row0 + off_m, 0], o_smem)
    tma.store_wait(0)

@gluon.jit
def attn_fwd_ws(q_desc, k_desc, v_desc, o_desc, N_CTX, qk_scale,
                BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    off_m = gl.program_id(0) * BM
    row0 = gl.program_id(1) * N_CTX
    n_blocks = gl.cdiv(N_CTX, BN)
    q_smem = gl.allocate_shared_memory(dtype, [BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=1)
    fence_async_shared()
    gl.warp_specialize([
        (_compute_partition, (o_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty,
                              row0, off_m, n_blocks, qk_scale, N_CTX, BM, BN, D, STAGES)),
        (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty,
                           row0, off_m, n_blocks, BN, STAGES)),
    ], [1], [24])

def attention_ws(q, k, v, BM=128, BN=64, STAGES=3, num_warps=4, maxnreg=None):
    B, H, N, D = q.shape
    o = torch.empty_like(q)
    q2, k2, v2, o2 = (t.reshape(B * H * N, D) for t in (q, k, v, o))
    ql = gl.NVMMASharedLayout.get_default_for([BM, D], gl.bfloat16)
    kl = gl.NVMMASharedLayout.get_default_for([BN, D], gl.bfloat16)
    qd = TensorDescriptor.from_tensor(q2, [BM, D], ql); od = TensorDescriptor.from_tensor(o2, [BM, D], ql)
    kd = TensorDescriptor.from_tensor(k2, [BN, D], kl); vd = TensorDescriptor.from_tensor(v2, [BN, D], kl)
    grid = (triton.cdiv(N, BM), B * H)
    kw = dict(num_warps=num_warps)
    if maxnreg: kw["maxnreg"] = maxnreg
    attn_fwd_ws[grid](qd, kd, vd, od, N, D ** -0.5 * 1.4426950408889634, BM, BN, D, STAGES, **kw)
    return o

if __name__ == "__main__":
    import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gcompile import gcompile, desc_sig
    x = torch.empty(1024, 128, dtype=torch.bfloat16)
    for D in (64, 128):
        ql = gl.NVMMASharedLayout.get_default_for([128, D], gl.bfloat16)
        kl = gl.NVMMASharedLayout.get_default_for([64, D], gl.bfloat16)
        qs = desc_sig(TensorDescriptor.from_tensor(x[:, :D], [128, D], ql)); ks = desc_sig(TensorDescriptor.from_tensor(x[:, :D], [64, D], kl))
        sig = dict(q_desc=qs, k_desc=ks, v_desc=ks, o_desc=qs, N_CTX="i32", qk_scale="fp32",
                   BM="constexpr", BN="constexpr", D="constexpr", STAGES="constexpr")
        for mx in (None, 168):
            opts = {} if mx is None else {"maxnreg": mx}
            k_, fig, sass = gcompile(attn_fwd_ws, sig, dict(BM=128, BN=64, D=D, STAGES=3), num_warps=4, **opts)
            print([l.strip() for l in k_.asm["ptx"].splitlines() if "setmaxnreg" in l])
