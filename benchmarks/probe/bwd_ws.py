import triton
import triton.language as tl


@triton.jit
def bwd_dkdv_ws(Q, K, V, DO, DK, DV, LSE, DELTA, stride_b, stride_n, stride_h, seqlen, nheads, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
                IS_CAUSAL: tl.constexpr, LSE_DESC: tl.constexpr):
    """All of q, k, v, do, dk, dv share strides (contiguous B, N, H, D). LSE is log2-based here."""
    pid_n = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    base = off_b * stride_b + off_h * stride_h
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_M, HEAD_DIM])
    do_desc = tl.make_tensor_descriptor(DO + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
    dk_desc = tl.make_tensor_descriptor(DK + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
    dv_desc = tl.make_tensor_descriptor(DV + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
    row = (off_b * nheads + off_h) * seqlen
    lse_desc = tl.make_tensor_descriptor(LSE + row, shape=[seqlen], strides=[1], block_shape=[BLOCK_M])
    delta_desc = tl.make_tensor_descriptor(DELTA + row, shape=[seqlen], strides=[1], block_shape=[BLOCK_M])
    k = k_desc.load([start_n, 0])
    v = v_desc.load([start_n, 0])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = start_n // BLOCK_M * BLOCK_M if IS_CAUSAL else 0
    for start_m in tl.range(lo, seqlen, BLOCK_M, warp_specialize=True, num_stages=STAGES):
        q = q_desc.load([start_m, 0])
        do = do_desc.load([start_m, 0])
        if LSE_DESC:
            lse = lse_desc.load([start_m])
            delta = delta_desc.load([start_m])
        else:
            offs_m = start_m + tl.arange(0, BLOCK_M)
            lse = tl.load(LSE + row + offs_m)
            delta = tl.load(DELTA + row + offs_m)
        qkT = tl.dot(k, q.T)
        if IS_CAUSAL:
            d = tl.arange(0, BLOCK_N)[:, None] - tl.arange(0, BLOCK_M)[None, :]
            qkT = qkT * qk_scale + tl.where(d <= start_m - start_n, 0.0, float("-inf"))
            pT = tl.math.exp2(qkT - lse[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, do.T)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    dk_desc.store([start_n, 0], (dk * (qk_scale * 0.6931471805599453)).to(DK.dtype.element_ty))
    dv_desc.store([start_n, 0], dv.to(DV.dtype.element_ty))


@triton.jit
def bwd_dq_ws(Q, K, V, DO, DQ, LSE, DELTA, stride_b, stride_n, stride_h, seqlen, nheads, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
              IS_CAUSAL: tl.constexpr, LSE_DESC: tl.constexpr, KT: tl.constexpr = False):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    base = off_b * stride_b + off_h * stride_h
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_M, HEAD_DIM])
    do_desc = tl.make_tensor_descriptor(DO + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_M, HEAD_DIM])
    dq_desc = tl.make_tensor_descriptor(DQ + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
    row = (off_b * nheads + off_h) * seqlen
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if LSE_DESC:
        lse = tl.make_tensor_descriptor(LSE + row, shape=[seqlen], strides=[1], block_shape=[BLOCK_M]).load([start_m])
        delta = tl.make_tensor_descriptor(DELTA + row, shape=[seqlen], strides=[1], block_shape=[BLOCK_M]).load([start_m])
    else:
        lse = tl.load(LSE + row + offs_m, mask=offs_m < seqlen, other=float("inf"))
        delta = tl.load(DELTA + row + offs_m, mask=offs_m < seqlen, other=0.0)
    q = q_desc.load([start_m, 0])
    do = do_desc.load([start_m, 0])
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, seqlen) if IS_CAUSAL else seqlen
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True, num_stages=STAGES):
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        qk = tl.dot(q, k.T)
        if IS_CAUSAL:
            d = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :]
            qk = qk * qk_scale + tl.where(d >= start_n - start_m, 0.0, float("-inf"))
            p = tl.math.exp2(qk - lse[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
        dp = tl.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        if KT:
            k2 = k_desc.load([start_n, 0])
            dq = tl.dot(ds.to(k.dtype), k2, dq)
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq)
    dq_desc.store([start_m, 0], (dq * (qk_scale * 0.6931471805599453)).to(DQ.dtype.element_ty))


@triton.jit
def bwd_onepass_ws(Q, K, V, DO, DK, DV, DQACC, LSE, DELTA, stride_b, stride_n, stride_h, seqlen, nheads, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, WS: tl.constexpr = True):
    """One pass: per key block, loop over query tiles; dK/dV in registers, dQ += dS K into an fp32
    (B, H, N, D) buffer by TMA reduce-add. LSE in log2 units."""
    pid_n = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    base = off_b * stride_b + off_h * stride_h
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_M, HEAD_DIM])
    do_desc = tl.make_tensor_descriptor(DO + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
    dk_desc = tl.make_tensor_descriptor(DK + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
    dv_desc = tl.make_tensor_descriptor(DV + base, shape=[seqlen, HEAD_DIM], strides=[stride_n, 1], block_shape=[BLOCK_N, HEAD_DIM])
    row = (off_b * nheads + off_h) * seqlen
    dq_desc = tl.make_tensor_descriptor(DQACC + row * HEAD_DIM, shape=[seqlen, HEAD_DIM], strides=[HEAD_DIM, 1],
                                        block_shape=[BLOCK_M, HEAD_DIM])
    k = k_desc.load([start_n, 0])
    v = v_desc.load([start_n, 0])
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = start_n // BLOCK_M * BLOCK_M if IS_CAUSAL else 0
    for start_m in tl.range(lo, seqlen, BLOCK_M, warp_specialize=WS, num_stages=STAGES):
        q = q_desc.load([start_m, 0])
        do = do_desc.load([start_m, 0])
        rows = tl.arange(0, BLOCK_M)
        lse = tl.load(LSE + row + start_m + rows)
        delta = tl.load(DELTA + row + start_m + rows)
        qkT = tl.dot(k, q.T)
        if IS_CAUSAL:
            d = tl.arange(0, BLOCK_N)[:, None] - tl.arange(0, BLOCK_M)[None, :]
            qkT = qkT * qk_scale + tl.where(d <= start_m - start_n, 0.0, float("-inf"))
            pT = tl.math.exp2(qkT - lse[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, do.T)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk)
        dq = tl.dot(dsT.T, k)
        dq_desc.atomic_add([start_m, 0], dq)
    dk_desc.store([start_n, 0], (dk * (qk_scale * 0.6931471805599453)).to(DK.dtype.element_ty))
    dv_desc.store([start_n, 0], dv.to(DV.dtype.element_ty))
