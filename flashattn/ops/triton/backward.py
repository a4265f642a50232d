"""FlashAttention backward in Triton: recompute P from Q, K and lse, tile by tile, never storing it.

Plain fp16/bf16 calls at head dims 64 and 128 on Hopper may run the one-pass Gluon kernel
(backward_sm90.py; choice.kernel_for decides); every other call runs the portable kernels here, which
use no atomics (but for a broadcast bias's gradient), so their gradients are bit-identical run to run:
    _bwd_preprocess   delta = rowsum(dO * O) - dlse                 one program per (query block, head, batch)
                      (and zeros for backward_sm90's dQ buffer when that kernel takes the call)
    _bwd              the programs below, in one grid or in separate launches (configs.BackwardConfig):
      _bwd_dkdv       dK_j, dV_j for one key block, looping over the query blocks of every query head
                      in its GQA group (so the group sum happens in registers); or only dV_j, or only
                      dK_j (DKDV = 1 or 2), when dK has programs of its own (BackwardConfig.dk)
      _bwd_dq         dQ_i for one query block, looping over key blocks as the forward does
This costs 7 matrix products per tile against 5 for a one-pass backward that adds dS K into an fp32
dQ; written in plain `tl` that one-pass kernel was slower than these (benchmarks/TUNING.md,
§ not-kept): it takes the explicit asynchrony of backward_sm90's Gluon to win.

Glossary (flashattn/ops/reference.py has the same steps in PyTorch):
    qkT, pT      scores and probabilities transposed, keys on rows           [BLOCK_N, BLOCK_M]
    p            P_ij = exp2(qk * qk_scale - lse * log2(e))                  [BLOCK_M, BLOCK_N]
    dp, ds       dP = dO V^T, dS = P * (dP - delta)                          [BLOCK_M, BLOCK_N]
                 (with dropout dP is masked by Z and scaled by 1 / (1 - p); with softcap dS is
                 multiplied by 1 - T^2 after it has given the bias's gradient)
    lse          the forward's log-sum-exp (natural log); +inf for padding rows and rows that see no
                 key, which makes their p exactly 0
    qk_scale     softmax_scale * log2(e)
    db           the bias gradient summed over the rows of one head, when the bias broadcasts over
                 rows (DBIAS_ROWS False)                                     [BLOCK_N]
The options are the forward's constexpr flags (common.py), plus for the bias gradient:
    DBIAS        0: none; 1: each dK/dV program stores its dS into DBias (a buffer with the batch and
                 head dims in full, summed over the bias's broadcast dims by torch afterwards: no
                 atomics, deterministic); 2: atomic adds into a buffer shaped like the bias (faster,
                 less memory, not bitwise reproducible; never used with deterministic=True)
    DBIAS_ROWS   the bias has a row per query (else the dK/dV program sums dS over all its rows)
    DBIAS_COLS   the bias has a column per key (else dS is summed over the columns of the program's
                 key block, one value per key block, summed by torch afterwards)
With every flag off the kernels are the plain ones, unchanged.
"""
from dataclasses import replace

import torch
import triton
import triton.language as tl

from flashattn.ops.triton.common import (
    LOG2E, alibi_slope_log2, block_d, cdiv, dropout_keep, key_tiles, listed_walk, load_tile,
    options as common_options, packed_sequence, query_tiles, scores, sparse_tile_start, store_tile, strides,
    tile_mask, wide,
)
from flashattn.ops.triton import backward_sm90, choice, configs, plan
from flashattn.ops.triton.launch import Launcher
from flashattn.ops.triton.configs import dot_precision
from flashattn.ops.variant import PLAIN, Variant, from_causal

PREPROCESS_ROWS = 64


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA, DQ_ACC,
                    stride_ob, stride_om, stride_oh,
                    stride_dob, stride_dom, stride_doh,
                    seqlen_q, nheads,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    HAS_DLSE: tl.constexpr, ZERO_DQ: tl.constexpr = False, WIDE: tl.constexpr = False):
    ROW_T: tl.constexpr = tl.int64 if WIDE else tl.int32          # row offsets' type (common.py, WIDE)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(ROW_T) * stride_om + offs_d[None, :],
                  offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None].to(ROW_T) * stride_dom
                   + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                    # [BLOCK_M]
    row = (off_b * nheads + off_h) * seqlen_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < seqlen_q)
    if ZERO_DQ:
        # The one-pass backward's fp32 dQ buffer, (B, H, Sq, HEAD_DIM): zeroed here, not by a launch of its own.
        tl.store(DQ_ACC + row[:, None] * HEAD_DIM + offs_d[None, :], tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
                 mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _bwd_dkdv_inner(dk, dv, db, k, v, Q, DO, LSE, DELTA, stride_qm, stride_dom,
                    offs_n, offs_d, lo, hi, seqlen_q, seqlen_k, qk_scale,
                    softcap_scale, softcap_log2, slope_log2, window_left, window_right,
                    Bias, stride_biasq, stride_biask, seed_lo, seed_hi, dropout_p, bh, Q_IDX,
                    DB, stride_dbq, stride_dbk,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_SPARSE: tl.constexpr,
                    SPARSE_BLOCK: tl.constexpr, DBIAS: tl.constexpr, DBIAS_ROWS: tl.constexpr,
                    DBIAS_COLS: tl.constexpr, DKDV: tl.constexpr, WIDE: tl.constexpr):
    """Add the query rows [lo, hi) of one head to dK_j, dV_j (and its bias gradient). MASK: diagonal,
    window edges or tail rows. BLOCK_SPARSE: [lo, hi) are positions in the walk over the listed
    query blocks. DKDV: 3 both, 1 only dV, 2 only dK (and the bias gradient)."""
    ROW_T: tl.constexpr = tl.int64 if WIDE else tl.int32          # row offsets' type (common.py, WIDE)
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    if DROPOUT:
        first_n = tl.min(offs_n, axis=0)                        # the program's first key
    for it in range(lo, hi, 1 if BLOCK_SPARSE else BLOCK_M):
        if BLOCK_SPARSE:
            start_m = sparse_tile_start(Q_IDX, it, SPARSE_BLOCK, BLOCK_M)
        else:
            start_m = it
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(Q + offs_m[:, None].to(ROW_T) * stride_qm + offs_d[None, :], offs_m, seqlen_q, offs_d,
                      HEAD_DIM, BLOCK_D, MASK)                                     # [BLOCK_M, BLOCK_D]
        do = load_tile(DO + offs_m[:, None].to(ROW_T) * stride_dom + offs_d[None, :], offs_m, seqlen_q, offs_d,
                       HEAD_DIM, BLOCK_D, MASK)
        if MASK:
            lse = tl.load(LSE + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
            delta = tl.load(DELTA + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            lse = tl.load(LSE + offs_m)
            delta = tl.load(DELTA + offs_m)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)                # [BLOCK_N, BLOCK_M]
        if SOFTCAP or HAS_ALIBI or BIAS_KIND != 0 or (MASK and HAS_WINDOW):
            sT, tT = scores(qkT, offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, qk_scale,
                            softcap_scale, softcap_log2, slope_log2, window_left, window_right, Bias,
                            stride_biasq, stride_biask, MASK, IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_ALIBI,
                            BIAS_KIND)
            pT = tl.math.exp2(sT - lse[None, :] * LOG2E)
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :] * LOG2E)
            if MASK:
                pT = tl.where(tl.trans(tile_mask(offs_m, offs_n, seqlen_q, seqlen_k, IS_CAUSAL)), pT, 0.0)
        if DROPOUT:
            keepT = dropout_keep(seed_lo, seed_hi, dropout_p, offs_m, first_n, bh, BLOCK_N, KEYS_FIRST=True)
        if DKDV & 1:
            if DROPOUT:
                # (P * Z)^T dO; the 1 / (1 - p) is applied to dV once, at the end.
                dv = tl.dot(tl.where(keepT, pT, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            else:
                dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)    # [BLOCK_N, BLOCK_D]
        if DKDV & 2:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)           # [BLOCK_N, BLOCK_M]
            if DROPOUT:
                dpT = tl.where(keepT, dpT * (1.0 / (1.0 - dropout_p)), 0.0)
            dsT = pT * (dpT - delta[None, :])
            if DBIAS != 0:
                # dS is the gradient of the scores after softcap, hence of the bias.
                if DBIAS_ROWS:
                    if DBIAS_COLS:
                        db_ptrs = DB + offs_m[None, :].to(tl.int64) * stride_dbq + offs_n[:, None] * stride_dbk
                        db_mask = (offs_m[None, :] < seqlen_q) & (offs_n[:, None] < seqlen_k)
                        db_tile = dsT
                    else:
                        db_ptrs = DB + offs_m.to(tl.int64) * stride_dbq
                        db_mask = offs_m < seqlen_q
                        db_tile = tl.sum(tl.where(offs_n[:, None] < seqlen_k, dsT, 0.0), 0)
                    if DBIAS == 1:
                        tl.store(db_ptrs, db_tile, mask=db_mask)
                    else:
                        tl.atomic_add(db_ptrs, db_tile, mask=db_mask)
                else:
                    db += tl.sum(dsT, 1)
            if SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)                  # d softcap * tanh(x / softcap) / dx
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)     # [BLOCK_N, BLOCK_D]
    return dk, dv, db


@triton.jit
def _bwd_dkdv(pid, off_hk, off_b, Q, K, V, DO, LSE, DELTA, DK, DV,
              stride_qb, stride_qm, stride_qh,
              stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh,
              stride_dob, stride_dom, stride_doh,
              stride_dkb, stride_dkn, stride_dkh,
              stride_dvb, stride_dvn, stride_dvh,
              seqlen_q, seqlen_k, nheads, group_size, softmax_scale, qk_scale,
              Bias, stride_biasb, stride_biash, stride_biasq, stride_biask,
              Alibi, stride_alibib, stride_alibih,
              softcap_scale, softcap_log2, window_left, window_right, seed_lo, seed_hi, dropout_p,
              Q_NUM, Q_IDX, sparse_stride_b, sparse_stride_h,
              DBias, stride_dbb, stride_dbh, stride_dbq, stride_dbk,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
              HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
              BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_SPARSE: tl.constexpr,
              SPARSE_BLOCK: tl.constexpr, DBIAS: tl.constexpr, DBIAS_ROWS: tl.constexpr,
              DBIAS_COLS: tl.constexpr, DKDV: tl.constexpr, CU_SEQLENS_Q, CU_SEQLENS_K, VARLEN: tl.constexpr,
              WIDE: tl.constexpr):
    """dK_j, dV_j (DKDV 3; 1: only dV_j, 2: only dK_j) for the key block `pid` of key/value head off_hk
    of batch off_b (both int64; with VARLEN, of packed sequence off_b)."""
    ROW_T: tl.constexpr = tl.int64 if WIDE else tl.int32          # row offsets' type (common.py, WIDE)
    start_n = pid * BLOCK_N
    if VARLEN:
        total_q = seqlen_q
        q_start, k_start, seqlen_q, seqlen_k = packed_sequence(CU_SEQLENS_Q, CU_SEQLENS_K, off_b)
        if start_n >= seqlen_k:
            return
        Q += q_start * stride_qm
        DO += q_start * stride_dom
        K += k_start * stride_kn
        V += k_start * stride_vn
        DK += k_start * stride_dkn
        DV += k_start * stride_dvn
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None].to(ROW_T) * stride_kn + offs_d[None, :],
                  offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)             # [BLOCK_N, BLOCK_D]
    v = load_tile(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None].to(ROW_T) * stride_vn + offs_d[None, :],
                  offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = query_tiles(start_n, seqlen_q, seqlen_k, window_left, window_right,
                                           BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    for g in range(group_size):
        off_h = off_hk * group_size + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        if VARLEN:
            row = off_h * total_q + q_start              # the LSE and delta are (H, total_q)
        else:
            row = (off_b * nheads + off_h) * seqlen_q
        # This head's slice of each option.
        slope_log2 = alibi_slope_log2(Alibi, off_b, off_h, stride_alibib, stride_alibih, HAS_ALIBI)
        bias_h = Bias
        if BIAS_KIND != 0:
            bias_h = Bias + off_b * stride_biasb + off_h * stride_biash
        bh = (off_b * nheads + off_h).to(tl.int32)
        q_lo, q_full_lo, q_full_hi, q_hi = lo, full_lo, full_hi, hi
        q_idx = Q_IDX
        if BLOCK_SPARSE:
            # The query blocks listed for this key block; the stages become positions in their walk.
            q_idx, q_lo, q_full_lo, q_full_hi, q_hi = listed_walk(Q_NUM, Q_IDX, off_b, off_h, sparse_stride_b,
                                                                  sparse_stride_h, start_n, seqlen_k, seqlen_q,
                                                                  lo, full_lo, full_hi, hi, SPARSE_BLOCK, BLOCK_M)
        db_h = DBias
        db = 0.0
        if DBIAS != 0:
            db_h = DBias + off_b * stride_dbb + off_h * stride_dbh
            if not DBIAS_COLS:
                db_h += pid * stride_dbk                  # one column per key block
            if not DBIAS_ROWS:
                db = tl.zeros([BLOCK_N], dtype=tl.float32)
        # The fully visible query tiles first, then the diagonal / band's edge, then the far edge and
        # the tail (benchmarks/TUNING.md, § backward-tiles: the masked stage first ran slower).
        for stage in tl.static_range(3):
            dk, dv, db = _bwd_dkdv_inner(
                dk, dv, db, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qm, stride_dom, offs_n,
                offs_d, (q_full_lo, q_lo, tl.maximum(q_full_lo, q_full_hi))[stage],
                (q_full_hi, q_full_lo, q_hi)[stage], seqlen_q, seqlen_k, qk_scale, softcap_scale, softcap_log2,
                slope_log2, window_left, window_right, bias_h, stride_biasq, stride_biask, seed_lo, seed_hi,
                dropout_p, bh, q_idx, db_h, stride_dbq, stride_dbk,
                HEAD_DIM, BLOCK_D, BLOCK_M, stage != 0, IS_CAUSAL, DOT_PRECISION, HAS_WINDOW, SOFTCAP, HAS_ALIBI,
                BIAS_KIND, DROPOUT, BLOCK_SPARSE, SPARSE_BLOCK, DBIAS, DBIAS_ROWS, DBIAS_COLS, DKDV, WIDE)
        if DBIAS != 0 and not DBIAS_ROWS:
            # The sum over this head's rows (padding keys excluded).
            if DBIAS_COLS:
                db_ptrs = db_h + offs_n * stride_dbk
                db_mask = offs_n < seqlen_k
                if DBIAS == 1:
                    tl.store(db_ptrs, db, mask=db_mask)
                else:
                    tl.atomic_add(db_ptrs, db, mask=db_mask)
            else:
                db_sum = tl.sum(tl.where(offs_n < seqlen_k, db, 0.0), 0)
                if DBIAS == 1:
                    tl.store(db_h, db_sum)
                else:
                    tl.atomic_add(db_h, db_sum)
    if DROPOUT:
        dv = dv * (1.0 / (1.0 - dropout_p))
    dk_ptrs = DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None].to(ROW_T) * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None].to(ROW_T) * stride_dvn + offs_d[None, :]
    if DKDV & 2:
        store_tile(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), offs_n, seqlen_k, offs_d, HEAD_DIM)
    if DKDV & 1:
        store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, seqlen_k, offs_d, HEAD_DIM)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                  lo, hi, seqlen_q, seqlen_k, qk_scale,
                  softcap_scale, softcap_log2, slope_log2, window_left, window_right,
                  Bias, stride_biasq, stride_biask, seed_lo, seed_hi, dropout_p, bh, KV_IDX,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_SPARSE: tl.constexpr,
                  SPARSE_BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Add the key tiles [lo, hi) to dQ_i. MASK: tiles that straddle the diagonal, the window's edges
    or the end. BLOCK_SPARSE: [lo, hi) are positions in the walk over the listed key blocks."""
    ROW_T: tl.constexpr = tl.int64 if WIDE else tl.int32          # row offsets' type (common.py, WIDE)
    for it in range(lo, hi, 1 if BLOCK_SPARSE else BLOCK_N):
        if BLOCK_SPARSE:
            start_n = sparse_tile_start(KV_IDX, it, SPARSE_BLOCK, BLOCK_N)
        else:
            start_n = it
        cols = start_n + offs_n
        k = load_tile(K + cols[:, None].to(ROW_T) * stride_kn + offs_d[None, :], cols, seqlen_k, offs_d, HEAD_DIM,
                      BLOCK_D, MASK)                                               # [BLOCK_N, BLOCK_D]
        v = load_tile(V + cols[:, None].to(ROW_T) * stride_vn + offs_d[None, :], cols, seqlen_k, offs_d, HEAD_DIM,
                      BLOCK_D, MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)                 # [BLOCK_M, BLOCK_N]
        if SOFTCAP or HAS_ALIBI or BIAS_KIND != 0 or (MASK and HAS_WINDOW):
            s, t = scores(qk, offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, qk_scale, softcap_scale,
                          softcap_log2, slope_log2, window_left, window_right, Bias, stride_biasq,
                          stride_biask, MASK, IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_ALIBI, BIAS_KIND)
            p = tl.math.exp2(s - lse[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
            if MASK:
                p = tl.where(tile_mask(offs_m, cols, seqlen_q, seqlen_k, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)                # [BLOCK_M, BLOCK_N]
        if DROPOUT:
            keep = dropout_keep(seed_lo, seed_hi, dropout_p, offs_m, start_n, bh, BLOCK_N)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)                          # d softcap * tanh(x / softcap) / dx
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
            Bias, stride_biasb, stride_biash, stride_biasq, stride_biask,
            Alibi, stride_alibib, stride_alibih,
            softcap_scale, softcap_log2, window_left, window_right, seed_lo, seed_hi, dropout_p,
            KV_NUM, KV_IDX, sparse_stride_b, sparse_stride_h,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
            HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
            BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_SPARSE: tl.constexpr,
            SPARSE_BLOCK: tl.constexpr, CU_SEQLENS_Q, CU_SEQLENS_K, VARLEN: tl.constexpr,
            WIDE: tl.constexpr):
    """dQ_i for the query block `pid` (of num_blocks) of query head off_h of batch off_b (int64; with
    VARLEN, of packed sequence off_b)."""
    ROW_T: tl.constexpr = tl.int64 if WIDE else tl.int32          # row offsets' type (common.py, WIDE)
    pid_m = pid
    if IS_CAUSAL:
        # The last query blocks visit the most keys: start them first.
        pid_m = num_blocks - 1 - pid_m
    start_m = pid_m * BLOCK_M
    if VARLEN:
        total_q = seqlen_q
        q_start, k_start, seqlen_q, seqlen_k = packed_sequence(CU_SEQLENS_Q, CU_SEQLENS_K, off_b)
        if start_m >= seqlen_q:
            return
        Q += q_start * stride_qm
        DO += q_start * stride_dom
        DQ += q_start * stride_dqm
        K += k_start * stride_kn
        V += k_start * stride_vn
    off_hk = off_h // group_size
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None].to(ROW_T) * stride_qm + offs_d[None, :],
                  offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)             # [BLOCK_M, BLOCK_D]
    do = load_tile(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None].to(ROW_T) * stride_dom
                   + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)
    if VARLEN:
        row = off_h * total_q + q_start + offs_m
    else:
        row = (off_b * nheads + off_h) * seqlen_q + offs_m
    lse = tl.load(LSE + row, mask=offs_m < seqlen_q, other=float("inf")) * LOG2E  # [BLOCK_M]
    delta = tl.load(DELTA + row, mask=offs_m < seqlen_q, other=0.0)
    K += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # This program's (batch, head) of each option, as in the forward (plain with every flag off).
    slope_log2 = alibi_slope_log2(Alibi, off_b, off_h, stride_alibib, stride_alibih, HAS_ALIBI)
    if BIAS_KIND != 0:
        Bias += off_b * stride_biasb + off_h * stride_biash
    bh = (off_b * nheads + off_h).to(tl.int32)
    lo, full_lo, full_hi, hi = key_tiles(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                         BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    if BLOCK_SPARSE:
        KV_IDX, lo, full_lo, full_hi, hi = listed_walk(KV_NUM, KV_IDX, off_b, off_h, sparse_stride_b,
                                                       sparse_stride_h, start_m, seqlen_q, seqlen_k, lo,
                                                       full_lo, full_hi, hi, SPARSE_BLOCK, BLOCK_N)
    # The band's left edge (only with a window), the unmasked middle, the diagonal / right edge / end.
    for stage in tl.static_range(0 if HAS_WINDOW else 1, 3):
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                           (lo, full_lo, full_hi)[stage], (full_lo, full_hi, hi)[stage], seqlen_q, seqlen_k,
                           qk_scale, softcap_scale, softcap_log2, slope_log2, window_left, window_right,
                           Bias, stride_biasq, stride_biask, seed_lo, seed_hi, dropout_p, bh, KV_IDX,
                           HEAD_DIM, BLOCK_D, BLOCK_N, stage != 1, IS_CAUSAL, DOT_PRECISION, HAS_WINDOW,
                           SOFTCAP, HAS_ALIBI, BIAS_KIND, DROPOUT, BLOCK_SPARSE, SPARSE_BLOCK, WIDE)
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None].to(ROW_T) * stride_dqm + offs_d[None, :]
    store_tile(dq_ptrs, (dq * softmax_scale).to(DQ.dtype.element_ty), offs_m, seqlen_q, offs_d, HEAD_DIM)


@triton.jit(do_not_specialize=["window_left", "window_right", "seed_lo", "seed_hi"])
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
         PART: tl.constexpr,
         # The options (common.py) and the bias gradient: None or 0, and unused, while their flag is off.
         Bias=None, stride_biasb=0, stride_biash=0, stride_biasq=0, stride_biask=0,
         Alibi=None, stride_alibib=0, stride_alibih=0,
         softcap_scale=0.0, softcap_log2=0.0, window_left=0, window_right=0,
         seed_lo=0, seed_hi=0, dropout_p=0.0,
         KV_NUM=None, KV_IDX=None, Q_NUM=None, Q_IDX=None, sparse_stride_b=0, sparse_stride_h=0,
         DBias=None, stride_dbb=0, stride_dbh=0, stride_dbq=0, stride_dbk=0,
         HAS_WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
         HAS_ALIBI: tl.constexpr = False, BIAS_KIND: tl.constexpr = 0,
         DROPOUT: tl.constexpr = False, BLOCK_SPARSE: tl.constexpr = False,
         SPARSE_BLOCK: tl.constexpr = 0, DBIAS: tl.constexpr = 0, DBIAS_ROWS: tl.constexpr = False,
         DBIAS_COLS: tl.constexpr = False,
         # The program shapes (configs.BackwardConfig): the dQ programs own DQ_ROWS query rows and step
         # over DQ_STEP keys (0: BLOCK_N and BLOCK_M, the dK/dV tiles swapped); DKDV: what the dK/dV
         # programs compute, 3 both, 1 only dV, 2 only dK.
         DQ_ROWS: tl.constexpr = 0, DQ_STEP: tl.constexpr = 0, DKDV: tl.constexpr = 3,
         # Packed sequences (common.py, VARLEN): the grid spans the longest of them.
         CU_SEQLENS_Q=None, CU_SEQLENS_K=None, max_seqlen_q=0, max_seqlen_k=0, VARLEN: tl.constexpr = False,
         # Offsets within a sequence that may pass 2^31 (common.py).
         WIDE: tl.constexpr = False):
    """PART 0: one grid for both halves, programs [0, n_kv) compute dK/dV and the rest dQ; PART 1:
    only dK/dV; PART 2: only dQ.

    Sharing one grid lets the dQ programs fill the SMs while the longest dK/dV programs finish,
    instead of two launches that each end on a partly idle GPU; two launches compile each half
    alone, with fewer registers. Which wins depends on the shape (configs.py's tables choose). The dQ
    half swaps the tile roles: it owns BLOCK_N query rows and steps over BLOCK_M keys, so both
    halves keep the same tile areas.
    """
    # The GPU starts programs axis-0-fastest: every block of one head runs before the next head's,
    # sharing that head's tensors in L2 (orders that start the heaviest causal blocks of several
    # heads first were no faster: benchmarks/TUNING.md, § not-kept).
    pid = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    n_kv = 0 if PART == 2 else tl.cdiv(max_seqlen_k if VARLEN else seqlen_k, BLOCK_N)
    is_kv = PART == 1 or (PART == 0 and pid < n_kv)
    idx = pid if is_kv else pid - n_kv
    if is_kv:
        if off_h < nheads_k:
            _bwd_dkdv(idx, off_h, off_b, Q, K, V, DO, LSE, DELTA, DK, DV,
                      stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                      stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                      stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                      seqlen_q, seqlen_k, nheads, group_size, softmax_scale, qk_scale,
                      Bias, stride_biasb, stride_biash, stride_biasq, stride_biask,
                      Alibi, stride_alibib, stride_alibih, softcap_scale, softcap_log2,
                      window_left, window_right, seed_lo, seed_hi, dropout_p,
                      Q_NUM, Q_IDX, sparse_stride_b, sparse_stride_h,
                      DBias, stride_dbb, stride_dbh, stride_dbq, stride_dbk,
                      HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, DOT_PRECISION,
                      HAS_WINDOW, SOFTCAP, HAS_ALIBI, BIAS_KIND, DROPOUT, BLOCK_SPARSE, SPARSE_BLOCK,
                      DBIAS, DBIAS_ROWS, DBIAS_COLS, DKDV, CU_SEQLENS_Q, CU_SEQLENS_K, VARLEN, WIDE)
    else:
        _bwd_dq(idx, tl.cdiv(max_seqlen_q if VARLEN else seqlen_q, DQ_ROWS if DQ_ROWS else BLOCK_N), off_h, off_b,
                Q, K, V, DO, LSE,
                DELTA, DQ,
                stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                stride_dqb, stride_dqm, stride_dqh,
                seqlen_q, seqlen_k, nheads, group_size, softmax_scale, qk_scale,
                Bias, stride_biasb, stride_biash, stride_biasq, stride_biask,
                Alibi, stride_alibib, stride_alibih, softcap_scale, softcap_log2,
                window_left, window_right, seed_lo, seed_hi, dropout_p,
                KV_NUM, KV_IDX, sparse_stride_b, sparse_stride_h,
                HEAD_DIM, BLOCK_D, DQ_ROWS if DQ_ROWS else BLOCK_N, DQ_STEP if DQ_STEP else BLOCK_M, IS_CAUSAL,
                DOT_PRECISION, HAS_WINDOW, SOFTCAP, HAS_ALIBI, BIAS_KIND, DROPOUT, BLOCK_SPARSE, SPARSE_BLOCK,
                CU_SEQLENS_Q, CU_SEQLENS_K, VARLEN, WIDE)


_launch_preprocess = Launcher(_bwd_preprocess)
_launch_bwd = Launcher(_bwd)


def _bias_grad_buffer(bias: torch.Tensor, batch: int, nheads: int, seqlen_q: int, seqlen_k: int,
                      n_key_blocks: int, deterministic: bool, device) -> tuple[torch.Tensor, dict]:
    """The fp32 buffer the dK/dV programs write dS into, and the kernel arguments for it.

    Its dims: batch and heads in full (each program stores its own entries; deterministic), or, when
    the bias broadcasts over batch or heads and determinism is not asked for, the bias's own sizes
    with stride 0 (atomic adds); rows: seqlen_q, or 1 when the bias broadcasts over rows (each
    program sums them); columns: seqlen_k, or one per key block when the bias broadcasts over keys."""
    bb, bh, bq, bk = bias.shape
    rows, cols = bq == seqlen_q, bk == seqlen_k
    atomic = not deterministic and (bb < batch or bh < nheads)
    shape = (bb if atomic else batch, bh if atomic else nheads, seqlen_q if rows else 1,
             seqlen_k if cols else n_key_blocks)
    buf = torch.zeros(shape, dtype=torch.float32, device=device)
    db_strides = tuple(0 if n == 1 else s for n, s in zip(buf.shape, buf.stride()))
    kwargs = dict(DBias=buf, stride_dbb=db_strides[0], stride_dbh=db_strides[1], stride_dbq=db_strides[2],
                  stride_dbk=db_strides[3], DBIAS=2 if atomic else 1, DBIAS_ROWS=rows, DBIAS_COLS=cols)
    return buf, kwargs


def _reduce_bias_grad(buf: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The buffer summed over the bias's broadcast dims (in torch's fixed order), in the bias's dtype."""
    dims = [d for d in range(4) if bias.shape[d] == 1 and buf.shape[d] != 1]
    if dims:
        buf = buf.sum(dim=dims, keepdim=True)
    return buf.to(bias.dtype)


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, softmax_scale: float, variant: Variant | bool = PLAIN,
             dlse: torch.Tensor | None = None, bias_grad: bool = False,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward. Shapes as in forward(); lse (B, H, Sq) float32 contiguous; `variant` holds
    the options (a bool means plain causal or not).

    Returns dq, dk, dv contiguous, in the inputs' dtypes, and dbias (variant.bias's shape and dtype;
    None unless `bias_grad`). Without a bias gradient the kernels use no atomics, so the result is
    bit-identical run to run; with one, atomics are used only when the bias broadcasts over batch
    or heads and variant.deterministic is False.
    """
    if isinstance(variant, bool):
        variant = from_causal(variant)
    if variant.is_plain and not variant.tile_size and dlse is None and not bias_grad:
        # A repeated signature replays its launches (plan.py): dq, dk, dv, and no bias gradient.
        # deterministic is in the key: it chooses the one-pass kernel's build.
        inputs = (dout, q, k, v, out, lse)
        return (*plan.run(plan.signature(inputs, softmax_scale, variant.causal, variant.deterministic), inputs,
                          lambda: _backward(dout, q, k, v, out, lse, softmax_scale, variant)[:3], _no_lasting), None)
    return _backward(dout, q, k, v, out, lse, softmax_scale, variant, dlse, bias_grad)


def _no_lasting() -> tuple:
    return ()


def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, softmax_scale: float, variant: Variant, dlse: torch.Tensor | None = None,
              bias_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group_size = nheads // nheads_k
    bd = block_d(head_dim)
    precision = dot_precision(q.dtype)
    qk_scale = softmax_scale * LOG2E.value
    opts = common_options(variant, q, k, softmax_scale)
    extra = opts.extra + ("+dbias" if bias_grad else "")

    one_pass = choice.kernel_for("bwd", q, k, v, variant, softmax_scale, dout, bias_grad) == choice.ONE_PASS
    dq_acc = backward_sm90.dq_buffer(q) if one_pass else None
    delta = plan.empty(lse.shape, lse.dtype, lse.device)            # lse is contiguous
    # Offsets within a sequence that may pass 2^31: tiles from 64-bit bases (common.py, WIDE).
    _launch_preprocess((cdiv(seqlen_q, PREPROCESS_ROWS), nheads, batch),
        out, dout, dlse if dlse is not None else lse, delta, dq_acc,
        *strides(out), *strides(dout), seqlen_q, nheads,
        HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=PREPROCESS_ROWS, HAS_DLSE=dlse is not None, ZERO_DQ=one_pass,
        **(dict(WIDE=True) if wide(seqlen_q, out, dout) else {}), num_warps=4, num_stages=3,
    )
    if one_pass:
        return (*backward_sm90.backward(dout, q, k, v, lse, delta, dq_acc, softmax_scale, variant.causal,
                                        variant.deterministic, variant.cu_seqlens_q, variant.cu_seqlens_k,
                                        variant.max_seqlen_k), None)

    dq = plan.empty(q.shape, q.dtype, q.device)
    dk = plan.empty(k.shape, k.dtype, k.device)
    dv = plan.empty(v.shape, v.dtype, v.device)
    dbias = []
    packed = variant.varlen
    args = (q, k, v, dout, lse, delta, dq, dk, dv,
            *strides(q, packed), *strides(k, packed), *strides(v, packed), *strides(dout, packed),
            *strides(dq, packed), *strides(dk, packed), *strides(dv, packed),
            seqlen_q, seqlen_k, nheads, nheads_k, group_size, softmax_scale, qk_scale)
    # Packed sequences: a grid over the sequences, as long as the longest (seqlen_q/k: the totals).
    rows_q, rows_k, n_seq = seqlen_q, seqlen_k, batch
    if packed:
        rows_q, rows_k, n_seq = variant.max_seqlen_q, variant.max_seqlen_k, variant.cu_seqlens_q.numel() - 1
        opts = replace(opts, kwargs=dict(opts.kwargs, max_seqlen_q=rows_q, max_seqlen_k=rows_k))
    if wide(max(rows_q, rows_k), q, k, v, dout, dq, dk, dv):
        opts = replace(opts, kwargs=dict(opts.kwargs, WIDE=True))

    def launch(cfg: configs.BackwardConfig):
        kv, qc = opts.tiles(cfg.kv), opts.tiles(cfg.q)
        dkc = opts.tiles(cfg.dk) if cfg.dk is not None else None
        n_kv, n_q = cdiv(rows_k, kv.block_n), cdiv(rows_q, qc.block_m)
        kwargs = dict(opts.kwargs, DQ_ROWS=qc.block_m, DQ_STEP=qc.block_n)
        # The programs that compute dS (the dK ones) also give the bias gradient.
        ds_tiles = dkc or kv
        ds_kwargs = {}
        if bias_grad:
            buf, ds_kwargs = _bias_grad_buffer(variant.bias, batch, nheads, seqlen_q, seqlen_k,
                                               cdiv(seqlen_k, ds_tiles.block_n), variant.deterministic,
                                               q.device)
            dbias[:] = [buf]
        # (part, programs, heads, tiles, extra kwargs); one grid spans the query heads, and with GQA its
        # dK/dV programs of heads >= nheads_k have no work.
        if cfg.one_launch:
            launches = [(0, n_kv + n_q, nheads, kv, ds_kwargs)]
        else:
            launches = [(1, n_kv, nheads_k, kv, dict(DKDV=1) if dkc else ds_kwargs)]
            if dkc is not None:
                launches.append((1, cdiv(rows_k, dkc.block_n), nheads_k, dkc, dict(DKDV=2, **ds_kwargs)))
            launches.append((2, n_q, nheads, qc, {}))
        for part, programs, heads, tiles, more in launches:
            _launch_bwd((programs, heads, n_seq), *args,
                HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=kv.block_m if part == 2 else tiles.block_m,
                BLOCK_N=kv.block_n if part == 2 else tiles.block_n, IS_CAUSAL=variant.causal,
                DOT_PRECISION=precision, PART=part, **kwargs, **more,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            )

    configs.run("bwd", head_dim, q.dtype, variant.causal, max(rows_q, rows_k), q.device, launch, extra=extra,
                tile_size=variant.tile_size)
    return dq, dk, dv, (_reduce_bias_grad(dbias[0], variant.bias) if bias_grad else None)
