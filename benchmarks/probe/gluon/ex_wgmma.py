import torch, triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (
    tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

@gluon.jit
def qk_tile_kernel(a_desc, b_desc, c_desc, num_warps: gl.constexpr):
    # a_desc: [128, 64] bf16 tile (Q, M x D); b_desc: [64, 64] bf16 tile (K, N x D, row-major)
    # c_desc: [128, 64] fp32 tile (S = Q @ K^T)
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    a_smem = gl.allocate_shared_memory(a_desc.dtype, a_desc.block_type.shape, a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, b_desc.block_type.shape, b_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    fence_async_shared()   # make the mbarrier init visible to the async (TMA) proxy

    pid = gl.program_id(0)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [pid * BM, 0], bar, a_smem)
    tma.async_copy_global_to_shared(b_desc, [0, 0], bar, b_smem)
    mbarrier.wait(bar, phase=0)
    mbarrier.invalidate(bar)

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16])
    acc = gl.zeros([BM, BN], gl.float32, layout=mma_layout)
    # B operand must be shared memory, logically [K, N]: K^T is a permuted view of the [N, K] tile.
    acc = warpgroup_mma(a_smem, b_smem.permute((1, 0)), acc, use_acc=False, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

    c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    c_smem.store(acc)
    fence_async_shared()   # generic-proxy smem writes -> async-proxy (TMA) read
    tma.async_copy_shared_to_global(c_desc, [pid * BM, 0], c_smem)
    tma.store_wait(pendings=0)

def make_descs(M=256, N=64, D=64, device="cpu"):
    q = torch.randn(M, D, dtype=torch.bfloat16, device=device)
    k = torch.randn(N, D, dtype=torch.bfloat16, device=device)
    s = torch.empty(M, N, dtype=torch.float32, device=device)
    a_l = gl.NVMMASharedLayout.get_default_for([128, D], gl.bfloat16)
    b_l = gl.NVMMASharedLayout.get_default_for([N, D], gl.bfloat16)
    c_l = gl.NVMMASharedLayout.get_default_for([128, N], gl.float32)
    return (q, k, s), (TensorDescriptor.from_tensor(q, [128, D], a_l),
                       TensorDescriptor.from_tensor(k, [N, D], b_l),
                       TensorDescriptor.from_tensor(s, [128, N], c_l))

if __name__ == "__main__":
    import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gcompile import gcompile, desc_sig
    (q, k, s), (ad, bd, cd) = make_descs()
    sig = {"a_desc": desc_sig(ad), "b_desc": desc_sig(bd), "c_desc": desc_sig(cd), "num_warps": "constexpr"}
    print(sig)
    kern, fig, sass = gcompile(qk_tile_kernel, sig, {"num_warps": 4}, num_warps=4)
    print([l.strip() for l in kern.asm["ptx"].splitlines() if "wgmma" in l][:4])
