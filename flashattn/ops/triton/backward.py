"""FlashAttention backward in Triton: recompute P from Q, K and lse, tile by tile, never storing it.

No atomics, so the gradients are bit-identical run to run:
    _bwd_preprocess   delta = rowsum(dO * O) - dlse                 one program per (query block, head, batch)
    _bwd              two kinds of program, in one grid or in two launches (TileConfig.one_launch):
      _bwd_dkdv       dK_j, dV_j for one key block, looping over the query blocks of every query head
                      in its GQA group (so the group sum happens in registers)
      _bwd_dq         dQ_i for one query block, looping over key blocks as the forward does
This costs 7 matrix products per tile against 5 for a one-pass backward that adds dS K into an fp32
dQ with atomics; on the H100 with plain `tl` that one-pass kernel measured slower (342 against 384
TFLOP/s at head dim 128, 4k; benchmarks/results/h100-sweep-onepass-bwd-2026-11-22.json), so the
deterministic layout is also the fast one here.

Glossary (flashattn/ops/reference.py has the same steps in PyTorch):
    qkT, pT      scores and probabilities transposed, keys on rows           [BLOCK_N, BLOCK_M]
    p            P_ij = exp2(qk * qk_scale - lse * log2(e))                  [BLOCK_M, BLOCK_N]
    dp, ds       dP = dO V^T, dS = P * (dP - delta)                          [BLOCK_M, BLOCK_N]
    lse          the forward's log-sum-exp (natural log); +inf for padding rows and rows that see no
                 key, which makes their p exactly 0
    qk_scale     softmax_scale * log2(e)
"""
import torch
import triton
import triton.language as tl

from flashattn.ops.triton.common import (
    LOG2E, key_block_bounds, load_tile, query_block_bounds, store_tile, strides, tile_mask,
)
from flashattn.ops.triton import configs
from flashattn.ops.triton.configs import dot_precision

PREPROCESS_ROWS = 64
from flashattn.ops.triton.forward import block_d


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA,
                    stride_ob, stride_om, stride_oh,
                    stride_dob, stride_dom, stride_doh,
                    seqlen_q, nheads,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    HAS_DLSE: tl.constexpr):
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                  offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                   + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                    # [BLOCK_M]
    row = (off_b * nheads + off_h) * seqlen_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qm, stride_dom,
                    offs_n, offs_d, lo, hi, seqlen_q, seqlen_k, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add the query rows [lo, hi) of one head to dK_j, dV_j. MASK: diagonal or tail rows."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(Q + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, seqlen_q, offs_d,
                      HEAD_DIM, BLOCK_D, MASK)                                     # [BLOCK_M, BLOCK_D]
        do = load_tile(DO + offs_m[:, None] * stride_dom + offs_d[None, :], offs_m, seqlen_q, offs_d,
                       HEAD_DIM, BLOCK_D, MASK)
        if MASK:
            lse = tl.load(LSE + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
            delta = tl.load(DELTA + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)                # [BLOCK_N, BLOCK_M]
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :] * LOG2E)
        if MASK:
            pT = tl.where(tl.trans(tile_mask(offs_m, offs_n, seqlen_q, seqlen_k, IS_CAUSAL)), pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)        # [BLOCK_N, BLOCK_D]
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)               # [BLOCK_N, BLOCK_M]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)         # [BLOCK_N, BLOCK_D]
    return dk, dv


@triton.jit
def _bwd_dkdv(pid, off_hk, off_b, Q, K, V, DO, LSE, DELTA, DK, DV,
              stride_qb, stride_qm, stride_qh,
              stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh,
              stride_dob, stride_dom, stride_doh,
              stride_dkb, stride_dkn, stride_dkh,
              stride_dvb, stride_dvn, stride_dvh,
              seqlen_q, seqlen_k, nheads, group_size, softmax_scale, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK_j, dV_j for the key block `pid` of key/value head off_hk of batch off_b (both int64)."""
    start_n = pid * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                  offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)             # [BLOCK_N, BLOCK_D]
    v = load_tile(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                  offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi = query_block_bounds(start_n, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    for g in range(group_size):
        off_h = off_hk * group_size + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        row = (off_b * nheads + off_h) * seqlen_q
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qm,
                                 stride_dom, offs_n, offs_d, lo, full_lo, seqlen_q, seqlen_k, qk_scale,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, True, IS_CAUSAL, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qm,
                                 stride_dom, offs_n, offs_d, full_lo, full_hi, seqlen_q, seqlen_k,
                                 qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False, IS_CAUSAL, DOT_PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qm,
                                 stride_dom, offs_n, offs_d, tl.maximum(full_lo, full_hi), seqlen_q,
                                 seqlen_q, seqlen_k, qk_scale,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, True, IS_CAUSAL, DOT_PRECISION)
    dk_ptrs = DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    store_tile(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), offs_n, seqlen_k, offs_d, HEAD_DIM)
    store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, seqlen_k, offs_d, HEAD_DIM)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                  lo, hi, seqlen_q, seqlen_k, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add the key tiles [lo, hi) to dQ_i. MASK: tiles that straddle the diagonal or the end."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_tile(K + cols[:, None] * stride_kn + offs_d[None, :], cols, seqlen_k, offs_d, HEAD_DIM,
                      BLOCK_D, MASK)                                               # [BLOCK_N, BLOCK_D]
        v = load_tile(V + cols[:, None] * stride_vn + offs_d[None, :], cols, seqlen_k, offs_d, HEAD_DIM,
                      BLOCK_D, MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)                 # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            p = tl.where(tile_mask(offs_m, cols, seqlen_q, seqlen_k, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)                # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)          # [BLOCK_M, BLOCK_D]
    return dq


@triton.jit
def _bwd_dq(pid, num_blocks, off_h, off_b, Q, K, V, DO, LSE, DELTA, DQ,
            stride_qb, stride_qm, stride_qh,
            stride_kb, stride_kn, stride_kh,
            stride_vb, stride_vn, stride_vh,
            stride_dob, stride_dom, stride_doh,
            stride_dqb, stride_dqm, stride_dqh,
            seqlen_q, seqlen_k, nheads, group_size, softmax_scale, qk_scale,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ_i for the query block `pid` (of num_blocks) of query head off_h of batch off_b (int64)."""
    pid_m = pid
    if IS_CAUSAL:
        # The last query blocks visit the most keys: start them first.
        pid_m = num_blocks - 1 - pid_m
    start_m = pid_m * BLOCK_M
    off_hk = off_h // group_size
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                  offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)             # [BLOCK_M, BLOCK_D]
    do = load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                   + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    row = (off_b * nheads + off_h) * seqlen_q + offs_m
    lse = tl.load(LSE + row, mask=offs_m < seqlen_q, other=float("inf")) * LOG2E  # [BLOCK_M]
    delta = tl.load(DELTA + row, mask=offs_m < seqlen_q, other=0.0)
    K += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_hi, hi = key_block_bounds(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, offs_m, offs_n,
                       offs_d, 0, full_hi, seqlen_q, seqlen_k, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL, DOT_PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, offs_m, offs_n,
                       offs_d, full_hi, hi, seqlen_q, seqlen_k, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, DOT_PRECISION)
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    store_tile(dq_ptrs, (dq * softmax_scale).to(DQ.dtype.element_ty), offs_m, seqlen_q, offs_d, HEAD_DIM)


@triton.jit
def _bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
         stride_qb, stride_qm, stride_qh,
         stride_kb, stride_kn, stride_kh,
         stride_vb, stride_vn, stride_vh,
         stride_dob, stride_dom, stride_doh,
         stride_dqb, stride_dqm, stride_dqh,
         stride_dkb, stride_dkn, stride_dkh,
         stride_dvb, stride_dvn, stride_dvh,
         seqlen_q, seqlen_k, nheads, nheads_k, group_size, softmax_scale, qk_scale,
         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
         PART: tl.constexpr):
    """PART 0: one grid for both halves, programs [0, n_kv) compute dK/dV and the rest dQ; PART 1:
    only dK/dV; PART 2: only dQ.

    Sharing one grid lets the dQ programs fill the SMs while the longest dK/dV programs finish,
    instead of two launches that each end on a partly idle GPU; two launches compile each half
    alone, with fewer registers. Which wins depends on the shape (configs.py's tables choose). The dQ
    half swaps the tile roles: it owns BLOCK_N query rows and steps over BLOCK_M keys, so both
    halves keep the same tile areas.
    """
    # The GPU starts programs axis-0-fastest: every block of one head runs before the next head's,
    # sharing that head's tensors in L2. (Orders that start the heaviest causal blocks of several
    # heads first measured no faster on the H100 and slower at head dim 64.)
    pid = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    n_kv = 0 if PART == 2 else tl.cdiv(seqlen_k, BLOCK_N)
    is_kv = PART == 1 or (PART == 0 and pid < n_kv)
    idx = pid if is_kv else pid - n_kv
    if is_kv:
        if off_h < nheads_k:
            _bwd_dkdv(idx, off_h, off_b, Q, K, V, DO, LSE, DELTA, DK, DV,
                      stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                      stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                      stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                      seqlen_q, seqlen_k, nheads, group_size, softmax_scale, qk_scale,
                      HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, DOT_PRECISION)
    else:
        _bwd_dq(idx, tl.cdiv(seqlen_q, BLOCK_N), off_h, off_b, Q, K, V, DO, LSE, DELTA, DQ,
                stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                stride_dqb, stride_dqm, stride_dqh,
                seqlen_q, seqlen_k, nheads, group_size, softmax_scale, qk_scale,
                HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_M, IS_CAUSAL, DOT_PRECISION)


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, softmax_scale: float, causal: bool, dlse: torch.Tensor | None = None,
             deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. Shapes as in forward(); lse (B, H, Sq) float32 contiguous.

    Returns dq, dk, dv contiguous, in the inputs' dtypes. The kernels use no atomics, so the result
    is bit-identical run to run whatever `deterministic` says (kept for the callers' signature).
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group_size = nheads // nheads_k
    bd = block_d(head_dim)
    precision = dot_precision(q.dtype)
    qk_scale = softmax_scale * LOG2E.value

    delta = torch.empty_like(lse)
    _bwd_preprocess[(triton.cdiv(seqlen_q, PREPROCESS_ROWS), nheads, batch)](
        out, dout, dlse if dlse is not None else lse, delta,
        *strides(out), *strides(dout), seqlen_q, nheads,
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=PREPROCESS_ROWS, HAS_DLSE=dlse is not None,
    )

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)

    def launch(cfg):
        # One grid spans the query heads; with GQA its dK/dV programs of heads >= nheads_k have no work.
        n_kv, n_q = triton.cdiv(seqlen_k, cfg.block_n), triton.cdiv(seqlen_q, cfg.block_n)
        launches = [(0, n_kv + n_q, nheads)] if cfg.one_launch else [(1, n_kv, nheads_k), (2, n_q, nheads)]
        for part, programs, heads in launches:
            _bwd[(programs, heads, batch)](
                q, k, v, dout, lse, delta, dq, dk, dv,
                *strides(q), *strides(k), *strides(v), *strides(dout), *strides(dq), *strides(dk),
                *strides(dv), seqlen_q, seqlen_k, nheads, nheads_k, group_size, softmax_scale, qk_scale,
                HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IS_CAUSAL=causal,
                DOT_PRECISION=precision, PART=part, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )

    configs.run("bwd", head_dim, q.dtype, causal, max(seqlen_q, seqlen_k), q.device, launch)
    return dq, dk, dv
