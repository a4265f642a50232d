"""FlashAttention forward in Triton: one program per (query block, head, batch).

Glossary (same names as flashattn/ops/reference.py, which this kernel mirrors step by step):
    q            the program's query tile Q_i                                  [BLOCK_M, BLOCK_D]
    k, v         one key/value tile K_j, V_j                                  [BLOCK_N, BLOCK_D]
    qk           scores S_ij in base-2 units: (q k^T) * softmax_scale * log2(e)  [BLOCK_M, BLOCK_N]
                 (with softcap, ALiBi or a bias: common.scores, every option applied)
    p            P~_ij = exp2(qk - m_new)                                      [BLOCK_M, BLOCK_N]
    keep         Z_ij, the dropout keep mask of the tile, regenerated from the seed
    m_i, l_i     running row max (base 2) and running row sum (of P before dropout)  [BLOCK_M]
    alpha        exp2(m_old - m_new), rescales acc and l_i                     [BLOCK_M]
    acc          running unnormalised output, fp32                             [BLOCK_M, BLOCK_D]
    lse          natural-log log-sum-exp per row; +inf for a row that sees no key
BLOCK_D is HEAD_DIM rounded up to a power of two (>= 16); the extra columns are loaded as 0.
The options (window, softcap, ALiBi, bias or mask, dropout, block mask) are constexpr flags, off by
default, documented in common.py; with all of them off this is the plain kernel, unchanged.

Two kernels: `_attn_fwd`, every option, any GPU; and `_attn_fwd_ws`, the plain forward for Hopper
(TMA loads and Triton's automatic warp specialization: a producer warp group, two consumer warp
groups). forward_sm90.py holds a third, in Gluon. choice.kernel_for decides which one runs a call.
"""
import torch
import triton
import triton.language as tl

from flashattn.ops.triton.common import (
    LN2, LOG2E, alibi_slope_log2, block_d, cdiv, dropout_keep, key_tiles, listed_walk, load_tile,
    options as common_options, packed_sequence, scores, sparse_tile_start, store_tile, strides, tile_mask,
    wide,
)
from flashattn.ops.triton import choice, configs, decode, forward_sm90, plan
from flashattn.ops.triton.launch import Launcher
from flashattn.ops.triton.configs import dot_precision
from flashattn.ops.variant import PLAIN, Variant, from_causal


@triton.jit
def _program_block(group_size, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """This program's query block start, query head, key/value head and batch (the last three int64)
    from the grid (query blocks, heads, batch)."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    if IS_CAUSAL:
        # The last query blocks have the most keys to visit: launch them first.
        pid_m = tl.num_programs(0) - 1 - pid_m
    return pid_m * BLOCK_M, off_h.to(tl.int64), (off_h // group_size).to(tl.int64), off_b


@triton.jit
def _normalize(acc, l_i, m_i):
    """O = acc / l and the natural-log LSE; a row that saw no key gets O = 0 and LSE = +inf.
    "Saw no key" is l == 0 exactly: a NaN l (a NaN or inf in the inputs) gives NaN in O and the LSE,
    never the +inf that would zero its P in the backward (reference.py: NaN and inf are never hidden)."""
    seen = l_i != 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc / l_safe[:, None]
    return acc, tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))


@triton.jit
def _online_softmax(qk, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr):
    """The online-softmax step of one tile: qk is q k^T, or when MASKED already scaled with -inf at
    the keys a row may not see. Returns p, the new running max, l_i and acc rescaled to it."""
    if MASKED:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has only seen masked keys keeps m = -inf: subtract 0 so that no NaN appears.
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        qk = qk - m_new_safe[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_new_safe = m_new
        qk = qk * qk_scale - m_new[:, None]
    p = tl.math.exp2(qk)                                                        # [BLOCK_M, BLOCK_N]
    alpha = tl.math.exp2(m_i - m_new_safe)                                      # [BLOCK_M]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_n, offs_d,
               lo, hi, seqlen_q, seqlen_k, qk_scale,
               softcap_scale, softcap_log2, slope_log2, window_left, window_right,
               Bias, stride_biasq, stride_biask, seed_lo, seed_hi, dropout_p, bh, KV_IDX,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
               HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               BIAS_KIND: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_SPARSE: tl.constexpr,
               SPARSE_BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Online softmax over the key tiles [lo, hi). MASK: tiles that straddle the diagonal, the window's
    edges or the end. BLOCK_SPARSE: [lo, hi) are positions in the walk over the listed blocks."""
    ROW_T: tl.constexpr = tl.int64 if WIDE else tl.int32          # row offsets' type (common.py, WIDE)
    for it in range(lo, hi, 1 if BLOCK_SPARSE else BLOCK_N):
        if BLOCK_SPARSE:
            start_n = sparse_tile_start(KV_IDX, it, SPARSE_BLOCK, BLOCK_N)
        else:
            start_n = it
        cols = start_n + offs_n
        k = load_tile(K + cols[:, None].to(ROW_T) * stride_kn + offs_d[None, :], cols, seqlen_k, offs_d, HEAD_DIM,
                      BLOCK_D, MASK)                                            # [BLOCK_N, BLOCK_D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)              # [BLOCK_M, BLOCK_N]
        if SOFTCAP or HAS_ALIBI or BIAS_KIND != 0 or (MASK and HAS_WINDOW):
            # A bias of -inf or a bool mask can empty a row in any tile: masked handling always.
            qk, _ = scores(qk, offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, qk_scale, softcap_scale,
                           softcap_log2, slope_log2, window_left, window_right, Bias, stride_biasq,
                           stride_biask, MASK, IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_ALIBI, BIAS_KIND)
        elif MASK:
            qk = tl.where(tile_mask(offs_m, cols, seqlen_q, seqlen_k, IS_CAUSAL), qk * qk_scale,
                          float("-inf"))
        p, m_new, l_i, acc = _online_softmax(qk, m_i, l_i, acc, qk_scale,           # P before dropout in l_i
                                             MASK or SOFTCAP or HAS_ALIBI or BIAS_KIND != 0)
        v = load_tile(V + cols[:, None].to(ROW_T) * stride_vn + offs_d[None, :], cols, seqlen_k, offs_d, HEAD_DIM,
                      BLOCK_D, MASK)                                            # [BLOCK_N, BLOCK_D]
        if DROPOUT:
            # P * Z; the 1 / (1 - p) is applied to O once, at the end.
            p = tl.where(dropout_keep(seed_lo, seed_hi, dropout_p, offs_m, start_n, bh, BLOCK_N), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["window_left", "window_right", "seed_lo", "seed_hi"])
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qm, stride_qh,
              stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh,
              stride_ob, stride_om, stride_oh,
              seqlen_q, seqlen_k, nheads, group_size, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
              # The options (common.py): None or 0, and unused, while their flag is off.
              Bias=None, stride_biasb=0, stride_biash=0, stride_biasq=0, stride_biask=0,
              Alibi=None, stride_alibib=0, stride_alibih=0,
              softcap_scale=0.0, softcap_log2=0.0, window_left=0, window_right=0,
              seed_lo=0, seed_hi=0, dropout_p=0.0,
              KV_NUM=None, KV_IDX=None, Q_NUM=None, Q_IDX=None, sparse_stride_b=0, sparse_stride_h=0,
              HAS_WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
              HAS_ALIBI: tl.constexpr = False, BIAS_KIND: tl.constexpr = 0,
              DROPOUT: tl.constexpr = False, BLOCK_SPARSE: tl.constexpr = False,
              SPARSE_BLOCK: tl.constexpr = 0,
              CU_SEQLENS_Q=None, CU_SEQLENS_K=None, VARLEN: tl.constexpr = False, WIDE: tl.constexpr = False):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_D >= 16)
    start_m, off_h, off_hk, off_b = _program_block(group_size, BLOCK_M, IS_CAUSAL)
    if VARLEN:
        # Sequence off_b of the packed batch (common.py, VARLEN); the LSE is (H, total_q).
        lse_row = off_h * seqlen_q
        q_start, k_start, seqlen_q, seqlen_k = packed_sequence(CU_SEQLENS_Q, CU_SEQLENS_K, off_b)
        lse_row += q_start
        Q += q_start * stride_qm
        O += q_start * stride_om
        K += k_start * stride_kn
        V += k_start * stride_vn

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ROW_T: tl.constexpr = tl.int64 if WIDE else tl.int32          # row offsets' type (common.py, WIDE)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None].to(ROW_T) * stride_qm + offs_d[None, :]
    K += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh

    q = load_tile(q_ptrs, offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True)    # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # This program's (batch, head) of each option (with every flag off this is the plain kernel: the
    # option arguments are unused and the band's stages reduce to key_block_bounds').
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
    # The band's left edge (without a window every stage starts at key 0), the unmasked middle, the
    # diagonal / right edge / end.
    for stage in tl.static_range(0 if HAS_WINDOW else 1, 3):
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                                   (lo, full_lo, full_hi)[stage], (full_lo, full_hi, hi)[stage],
                                   seqlen_q, seqlen_k, qk_scale, softcap_scale, softcap_log2, slope_log2,
                                   window_left, window_right, Bias, stride_biasq, stride_biask, seed_lo,
                                   seed_hi, dropout_p, bh, KV_IDX, HEAD_DIM, BLOCK_D, BLOCK_N, stage != 1,
                                   IS_CAUSAL, DOT_PRECISION, HAS_WINDOW, SOFTCAP, HAS_ALIBI, BIAS_KIND,
                                   DROPOUT, BLOCK_SPARSE, SPARSE_BLOCK, WIDE)

    acc, lse = _normalize(acc, l_i, m_i)
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(ROW_T) * stride_om + offs_d[None, :]
    store_tile(o_ptrs, acc.to(O.dtype.element_ty), offs_m, seqlen_q, offs_d, HEAD_DIM)
    if VARLEN:
        lse_ptrs = LSE + lse_row + offs_m
    else:
        lse_ptrs = LSE + (off_b * nheads + off_h) * seqlen_q + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)


@triton.jit
def _fwd_ws_step(acc, l_i, m_i, q, k_desc, v_desc, start_m, start_n, offset, seqlen_k, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 MASK_TAIL: tl.constexpr):
    """One key tile of the warp-specialized forward: _fwd_inner's plain step. The loop cannot branch
    (warp specialization needs a straight body), so with causal or a ragged end every tile is masked."""
    k = k_desc.load([start_n, 0])                                               # [BLOCK_N, BLOCK_D]
    qk = tl.dot(q, k.T)                                                         # [BLOCK_M, BLOCK_N]
    if IS_CAUSAL or MASK_TAIL:
        # Only tile-local aranges against scalars: Triton 3.6's split of the rows between the two
        # consumer warp groups offsets the second group's `start_m + tl.arange(...)` twice (the same
        # fault as at the LSE store below: a mask on those indices gave wrong results).
        if IS_CAUSAL:
            diag = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :]   # i - j, tile-local
            # -inf replaces a masked score: added, it would leave a NaN score (a NaN key this row may
            # not see) NaN instead of masking it.
            qk = tl.where(diag >= start_n - start_m - offset, qk * qk_scale, float("-inf"))
        else:
            in_bounds = start_n + tl.arange(0, BLOCK_N) < seqlen_k                      # [BLOCK_N]
            qk = qk * qk_scale + tl.where(in_bounds, 0.0, float("-inf"))[None, :]
    p, m_new, l_i, acc = _online_softmax(qk, m_i, l_i, acc, qk_scale, IS_CAUSAL or MASK_TAIL)
    v = v_desc.load([start_n, 0])                                               # [BLOCK_N, BLOCK_D]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_ws(Q, K, V, O, LSE,
                 stride_qb, stride_qm, stride_qh,
                 stride_kb, stride_kn, stride_kh,
                 stride_vb, stride_vn, stride_vh,
                 stride_ob, stride_om, stride_oh,
                 seqlen_q, seqlen_k, nheads, group_size, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_TAIL: tl.constexpr,
                 CU_SEQLENS_Q=None, CU_SEQLENS_K=None, VARLEN: tl.constexpr = False):
    """The plain forward for Hopper: tiles come by TMA (one descriptor per (batch, head) bounds every
    load, so no tile reads past its head's rows), and Triton's automatic warp specialization splits
    the program into a producer warp group that issues the loads and two consumer warp groups of
    BLOCK_M / 2 rows each (num_warps=4 is what it needs). Same inputs and results as _attn_fwd,
    VARLEN included: its descriptors start at the sequence's first rows and end at its last, so TMA
    clips every load at the sequence's end (and MASK_TAIL masks the keys past it)."""
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    start_m, off_h, off_hk, off_b = _program_block(group_size, BLOCK_M, IS_CAUSAL)
    if VARLEN:
        # Sequence off_b of the packed batch (common.py, VARLEN); the LSE is (H, total_q).
        lse_row = off_h * seqlen_q
        q_start, k_start, seqlen_q, seqlen_k = packed_sequence(CU_SEQLENS_Q, CU_SEQLENS_K, off_b)
        lse_row += q_start
        Q += q_start * stride_qm
        O += q_start * stride_om
        K += k_start * stride_kn
        V += k_start * stride_vn
    # A block past its sequence (VARLEN) does nothing; not by an early return, which Triton 3.6's
    # warp specialization of the loop below cannot compile (a branch out of the kernel's body).
    if not VARLEN or start_m < seqlen_q:
        q_desc = tl.make_tensor_descriptor(Q + off_b * stride_qb + off_h * stride_qh, shape=[seqlen_q, HEAD_DIM],
                                           strides=[stride_qm, 1], block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(K + off_b * stride_kb + off_hk * stride_kh, shape=[seqlen_k, HEAD_DIM],
                                           strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(V + off_b * stride_vb + off_hk * stride_vh, shape=[seqlen_k, HEAD_DIM],
                                           strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_D])

        q = q_desc.load([start_m, 0])                                           # [BLOCK_M, BLOCK_D]
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        offset = seqlen_k - seqlen_q
        hi = tl.minimum(start_m + BLOCK_M + offset, seqlen_k) if IS_CAUSAL else seqlen_k
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fwd_ws_step(acc, l_i, m_i, q, k_desc, v_desc, start_m, start_n, offset, seqlen_k,
                                         qk_scale, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_TAIL)

        acc, lse = _normalize(acc, l_i, m_i)
        # O and the LSE by pointers (a TMA store of O would stage it in shared memory: at head dim 256
        # the 128 x 64 tiles then no longer fit). start_m goes into the scalar bases, not into the rows'
        # indices: Triton 3.6's split of the rows between the two consumer warp groups adds the second
        # group's row offset to both start_m and the arange of `start_m + tl.arange(...)`, which stored
        # its rows BLOCK_M / 2 too far (seen in the TTGIR).
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        o_ptrs = (O + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_om
                  + rows[:, None] * stride_om + cols[None, :])                      # [BLOCK_M, BLOCK_D]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty),
                 mask=(rows[:, None] < seqlen_q - start_m) & (cols[None, :] < HEAD_DIM))
        if VARLEN:
            lse_ptrs = LSE + lse_row + start_m + rows
        else:
            lse_ptrs = LSE + (off_b * nheads + off_h) * seqlen_q + start_m + rows
        tl.store(lse_ptrs, lse, mask=rows < seqlen_q - start_m)


_launch_fwd = Launcher(_attn_fwd)
_launch_fwd_ws = Launcher(_attn_fwd_ws, scratch=True)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
            variant: Variant | bool = PLAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. q (B, Sq, H, D), k/v (B, Sk, Hk, D), last dim contiguous; `variant` holds
    the options (flashattn/ops/variant.py; a bool means plain causal or not). choice.kernel_for says
    which kernel runs it.

    Returns O (B, Sq, H, D) contiguous in q's dtype and lse (B, H, Sq) float32.
    """
    if isinstance(variant, bool):
        variant = from_causal(variant)
    if variant.is_plain and not variant.tile_size:
        # A repeated signature replays its launches (plan.py).
        return plan.run(plan.signature((q, k, v), softmax_scale, variant.causal), (q, k, v),
                        lambda: _forward(q, k, v, softmax_scale, variant), _lasting)
    return _forward(q, k, v, softmax_scale, variant)


def _lasting() -> tuple[torch.Tensor, ...]:
    return tuple(forward_sm90.tile_counters.values())


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, variant: Variant,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = choice.kernel_for("fwd", q, k, v, variant, softmax_scale)
    if kernel == choice.SPLIT_KV:
        return decode.forward(q, k, v, softmax_scale, variant)
    if kernel == choice.PING_PONG:
        return forward_sm90.forward(q, k, v, softmax_scale, variant.causal, variant.cu_seqlens_q,
                                    variant.cu_seqlens_k, variant.max_seqlen_q, variant.max_seqlen_k)
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    o = plan.empty(q.shape, q.dtype, q.device)
    lse = plan.empty((batch, nheads, seqlen_q), torch.float32, q.device)
    packed = variant.varlen
    args = (q, k, v, o, lse, *strides(q, packed), *strides(k, packed), *strides(v, packed), *strides(o, packed),
            seqlen_q, seqlen_k, nheads, nheads // nheads_k, softmax_scale * LOG2E.value)
    # Packed sequences: a grid over the sequences, as long as the longest (seqlen_q/k: the totals).
    rows, batch = (variant.max_seqlen_q, variant.cu_seqlens_q.numel() - 1) if packed else (seqlen_q, batch)
    seqlen = max(variant.max_seqlen_q, variant.max_seqlen_k) if packed else max(seqlen_q, seqlen_k)

    if kernel == choice.WARP_SPECIALIZED:
        # Packed sequences end anywhere: every tile's keys are checked against the sequence's end.
        varlen = dict(CU_SEQLENS_Q=variant.cu_seqlens_q, CU_SEQLENS_K=variant.cu_seqlens_k,
                      VARLEN=True) if packed else {}

        def launch_ws(cfg):
            _launch_fwd_ws((cdiv(rows, cfg.block_m), nheads, batch), *args,
                           HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=cfg.block_m,
                           BLOCK_N=cfg.block_n, IS_CAUSAL=variant.causal,
                           MASK_TAIL=not variant.causal and (packed or seqlen_k % cfg.block_n != 0),
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages, **varlen)

        configs.run("fwd_ws", head_dim, q.dtype, variant.causal, seqlen, q.device, launch_ws)
        return o, lse

    opts = common_options(variant, q, k, softmax_scale)
    # Offsets within a sequence that may pass 2^31: tiles from 64-bit bases (common.py, WIDE).
    wide_kw = dict(WIDE=True) if wide(seqlen, q, k, v, o) else {}

    def launch(cfg):
        cfg = opts.tiles(cfg)
        _launch_fwd((cdiv(rows, cfg.block_m), nheads, batch), *args,
            HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            IS_CAUSAL=variant.causal, DOT_PRECISION=dot_precision(q.dtype), **opts.kwargs, **wide_kw,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    configs.run("fwd", head_dim, q.dtype, variant.causal, seqlen, q.device, launch, extra=opts.extra,
                tile_size=variant.tile_size)
    return o, lse
