import triton
import triton.language as tl


@triton.jit
def _step(acc, l_i, m_i, q, k_desc, v_desc, start_m, start_n, seqlen, qk_scale, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, TAIL: tl.constexpr, MASKMODE: tl.constexpr):
    k = k_desc.load([start_n, 0])
    qk = tl.dot(q, k.T)
    if IS_CAUSAL:
        if MASKMODE == 0:
            rows = start_m + tl.arange(0, BLOCK_M)
            cols = start_n + tl.arange(0, BLOCK_N)
            qk = tl.where(rows[:, None] >= cols[None, :], qk * qk_scale, float("-inf"))
        else:
            d = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :]
            qk = qk * qk_scale + tl.where(d >= start_n - start_m, 0.0, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_new[:, None]
    elif TAIL:
        cols = start_n + tl.arange(0, BLOCK_N)
        qk = qk * qk_scale + tl.where(cols < seqlen, 0.0, float("-inf"))[None, :]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_new[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_new[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = v_desc.load([start_n, 0])
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def fwd_ws(Q, K, V, O, LSE, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
           stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh, seqlen, nheads, qk_scale,
           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
           STAGES: tl.constexpr, TAIL: tl.constexpr = False, MASKMODE: tl.constexpr = 0,
           REVERSE: tl.constexpr = True):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    if IS_CAUSAL and REVERSE:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    q_desc = tl.make_tensor_descriptor(Q + off_b * stride_qb + off_h * stride_qh, shape=[seqlen, HEAD_DIM],
                                       strides=[stride_qm, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + off_b * stride_kb + off_h * stride_kh, shape=[seqlen, HEAD_DIM],
                                       strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + off_b * stride_vb + off_h * stride_vh, shape=[seqlen, HEAD_DIM],
                                       strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(O + off_b * stride_ob + off_h * stride_oh, shape=[seqlen, HEAD_DIM],
                                       strides=[stride_om, 1], block_shape=[BLOCK_M, HEAD_DIM])
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, seqlen) if IS_CAUSAL else seqlen
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True, num_stages=STAGES):
        acc, l_i, m_i = _step(acc, l_i, m_i, q, k_desc, v_desc, start_m, start_n, seqlen, qk_scale, BLOCK_M,
                              BLOCK_N, IS_CAUSAL, TAIL, MASKMODE)
    acc = acc / l_i[:, None]
    o_desc.store([start_m, 0], acc.to(O.dtype.element_ty))
    tl.store(LSE + (off_b * nheads + off_h) * seqlen + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
             mask=offs_m < seqlen)
