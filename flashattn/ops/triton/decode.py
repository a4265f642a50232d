"""Short queries against long keys (flash-decoding): split-KV attention, its combine, and the KV-cache
append with rotary embeddings.

A decode step is memory-bound: every byte of K and V is read once per step, and the queries are one
to a few hundred rows. Two things make that read fast. The query heads of one KV head share each
K/V tile (GQA packing: the rows of a tile are (query index, head of the group) pairs), so K/V are
read once per KV head, not once per query head. And the keys are split across programs (num_splits
per (batch, KV head, row block)), each writing a partial result that `_combine` merges by its
log-sum-exp, so that a batch of one still fills the GPU.

Glossary (the names of forward.py and common.py; reference.py's kv_cache_forward mirrors this):
    GROUP        query heads per KV head, G
    r            a tile row; r = i * G + g is query index i, head off_hk * G + g         [BLOCK_M]
    pos          a key's position in its sequence: 0 is the first valid key (after leftpad) [BLOCK_N]
    seqlen_k     the keys of the program's sequence: cache_seqlens[b] + seqlen_new - leftpad[b] with a
                 cache, else the dense k's length
    row          where key `pos` lives: contiguous, row leftpad[b] + pos of the cache's batch entry
                 cache_batch_idx[b] (or b); paged (PAGE_SIZE > 0), row (leftpad[b] + pos) % PAGE_SIZE
                 of page block_table[b, (leftpad[b] + pos) // PAGE_SIZE]
    split        the program's share of the key tiles [lo, hi) that its rows may see: tiles_per_split
                 consecutive tiles, so splits never overlap and a split past hi is empty
    m_i, l_i     running row max (base 2) and row sum; acc the unnormalised output, fp32
    O_part, lse_part   a split's normalised output and its log-sum-exp in base 2 (-inf: no key seen)

Every tile is masked (bounds, causal, window in one expression, common.scores): the loop is bound by
memory, not by the few integer operations of the mask. Offsets that can pass 2^31 elements (the
cache's batch entries and pages, the rows of a long cache) are int64; in-tile offsets are int32.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from flashattn.ops.triton.common import LN2, LOG2E, block_d, cdiv, options as common_options, scores
from flashattn.ops.triton.common import wide as wide_offsets
from flashattn.ops.triton import configs
from flashattn.ops.triton.configs import TileConfig, dot_precision
from flashattn.ops.triton.launch import Launcher
from flashattn.ops.variant import KVCache, Variant

MAX_SPLITS = 128
SATURATING_PER_SM = 1.8    # programs per SM that reach the memory bandwidth (num_splits_for)
FILLED_PER_SM = 0.9        # programs per SM from which a contiguous cache is read unsplit (plan)
CROWDED_PER_SM = 4         # programs per SM beyond which the wide tiles' three resident programs win (plan)
STARTUP_TILES = 1          # a program's start, in key tiles' read time (num_splits_for)


@triton.jit
def _dependent_start(PDL: tl.constexpr):
    """The first statement of the split and combine kernels. With PDL (Hopper) the kernel may have
    been launched with programmatic dependent launch, before the kernel ahead of it on the stream
    ended: it waits until that kernel has finished and its writes are visible (without such a launch
    the wait returns at once), and then lets the next kernel's programs be scheduled as soon as its
    own last ones start (they too wait here first). The combine's launch thus overlaps the split's
    end, and the split's the previous kernel's."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _key_rows(pos, valid, leftpad, cache_b, BLOCK_TABLE, stride_btb, stride_cb, stride_cn,
              PAGE_SIZE: tl.constexpr, TILE_IN_PAGE: tl.constexpr, POOL_32: tl.constexpr):
    """Element offsets (int64) of the rows holding keys `pos` (one tile: consecutive, the first valid)
    of one sequence, from the cache's base (plus the head's offset, added by the caller); the block
    table is read only where `valid`, or once with TILE_IN_PAGE (pages are whole multiples of the
    tile, which starts at a multiple of its size, with no leftpad, so one page holds it; and offsets
    within a page are below 2^31). A paged tile's gathered rows cost address arithmetic between its
    products and its next loads (and registers): 64-bit only where an offset needs it.
    POOL_32: every offset into the pool fits 32 bits (pool32)."""
    if TILE_IN_PAGE:
        # One page holds the whole tile: one table entry (its first key's), rows as in a contiguous cache,
        # their offsets in the page 32-bit.
        slot = pos + leftpad
        page = tl.load(BLOCK_TABLE + cache_b * stride_btb + tl.min(slot, 0) // PAGE_SIZE).to(tl.int64)
        return page * stride_cb + ((slot % PAGE_SIZE) * stride_cn).to(tl.int64)
    if PAGE_SIZE > 0 and POOL_32:
        slot = pos + leftpad
        page = tl.load(BLOCK_TABLE + cache_b * stride_btb + slot // PAGE_SIZE, mask=valid, other=0)
        return (page * stride_cb + (slot % PAGE_SIZE) * stride_cn).to(tl.int64)
    slot = pos.to(tl.int64) + leftpad
    if PAGE_SIZE > 0:
        page = tl.load(BLOCK_TABLE + cache_b * stride_btb + slot // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        return page * stride_cb + (slot % PAGE_SIZE) * stride_cn
    return cache_b * stride_cb + slot * stride_cn


@triton.jit
def _split_kv_fwd(Q, K, V, O, LSE, O_PART, LSE_PART,
                  stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                  stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh,
                  seqlen_q, seqlen_k, nheads, qk_scale, num_splits,
                  SEQLENS, seqlen_new, LEFTPAD, BATCH_IDX, BLOCK_TABLE, stride_btb,
                  softcap_scale=0.0, softcap_log2=0.0, Alibi=None, stride_alibib=0, stride_alibih=0,
                  window_left=0, window_right=0,
                  GROUP: tl.constexpr = 1, HEAD_DIM: tl.constexpr = 128, BLOCK_D: tl.constexpr = 128,
                  BLOCK_M: tl.constexpr = 16, BLOCK_N: tl.constexpr = 64, IS_CAUSAL: tl.constexpr = False,
                  SPLIT: tl.constexpr = False, HAS_SEQLENS: tl.constexpr = False,
                  HAS_LEFTPAD: tl.constexpr = False, HAS_BATCH_IDX: tl.constexpr = False,
                  PAGE_SIZE: tl.constexpr = 0, HAS_WINDOW: tl.constexpr = False,
                  SOFTCAP: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False,
                  DOT_PRECISION: tl.constexpr = "ieee", PDL: tl.constexpr = False,
                  TILE_IN_PAGE: tl.constexpr = False, POOL_32: tl.constexpr = False):
    """One program: the rows [pid_m * BLOCK_M, +BLOCK_M) of (query, head) pairs of one (batch, KV
    head) against one split of the keys. Grid (batch * KV heads, row blocks, splits): the product
    that grows with the batch on the axis of 2^31 - 1 programs (the others hold 65535)."""
    _dependent_start(PDL)
    pid_m = tl.program_id(1)
    off_b = (tl.program_id(0) // (nheads // GROUP)).to(tl.int64)
    off_hk = (tl.program_id(0) % (nheads // GROUP)).to(tl.int64)
    split = tl.program_id(2)

    if HAS_SEQLENS:
        seqlen_k = tl.load(SEQLENS + off_b) + seqlen_new
    leftpad = 0
    if HAS_LEFTPAD:
        leftpad = tl.load(LEFTPAD + off_b)
        seqlen_k = seqlen_k - leftpad
    cache_b = off_b
    if HAS_BATCH_IDX:
        cache_b = tl.load(BATCH_IDX + off_b).to(tl.int64)

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                 # [BLOCK_M]
    i = offs_r // GROUP                                              # query index of each row
    off_h = off_hk * GROUP + offs_r % GROUP                          # query head of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < seqlen_q * GROUP
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + off_b * stride_qb + (i * stride_qm + off_h * stride_qh)[:, None] + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)   # [BLOCK_M, BLOCK_D]
    slope_log2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope_log2 = tl.load(Alibi + off_b * stride_alibib + off_h * stride_alibih) * LOG2E

    # The keys any row of the block may see, [lo, hi), tile-aligned at lo; this split's share.
    offset = seqlen_k - seqlen_q
    i_first = (pid_m * BLOCK_M) // GROUP
    i_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, seqlen_q - 1)
    lo = 0
    hi = seqlen_k
    if HAS_WINDOW:
        lo = tl.maximum(i_first + offset - window_left, 0)
        hi = tl.minimum(i_last + offset + window_right + 1, seqlen_k)
    elif IS_CAUSAL:
        hi = tl.minimum(i_last + offset + 1, seqlen_k)
    lo = lo // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, lo)
    tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(hi, start + tiles_per_split * BLOCK_N)

    K += off_hk * stride_kh
    V += off_hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        pos = start_n + offs_n                                       # [BLOCK_N]
        valid = pos < seqlen_k
        key_ok = valid[:, None] & d_ok[None, :]
        k_rows = _key_rows(pos, valid, leftpad, cache_b, BLOCK_TABLE, stride_btb, stride_kb, stride_kn, PAGE_SIZE,
                           TILE_IN_PAGE, POOL_32)
        k = tl.load(K + k_rows[:, None] + offs_d[None, :], mask=key_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        s, _ = scores(qk, i[:, None], pos[None, :], seqlen_q, seqlen_k, qk_scale, softcap_scale, softcap_log2,
                      slope_log2[:, None], window_left, window_right, None, 0, 0,
                      True, IS_CAUSAL, HAS_WINDOW, SOFTCAP, HAS_ALIBI, 0)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])                        # P~_ij [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = _key_rows(pos, valid, leftpad, cache_b, BLOCK_TABLE, stride_btb, stride_vb, stride_vn, PAGE_SIZE,
                           TILE_IN_PAGE, POOL_32)
        v = tl.load(V + v_rows[:, None] + offs_d[None, :], mask=key_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # "Saw no key" is l == 0 exactly (a NaN l stays NaN: forward._normalize's rule).
    seen = l_i != 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    acc = acc / l_safe[:, None]
    mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        # O_part (splits, B, Sq, H, D) fp32 and lse_part (splits, B, H, Sq) in base 2.
        batch = tl.num_programs(0) // (nheads // GROUP)
        part = (split * batch + off_b) * seqlen_q
        tl.store(O_PART + ((part + i) * nheads + off_h)[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask)
        tl.store(LSE_PART + (part * nheads + off_h * seqlen_q + i),
                 tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf")), mask=row_ok)
    else:
        tl.store(O + off_b * stride_ob + (i * stride_om + off_h * stride_oh)[:, None] + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=mask)
        tl.store(LSE + (off_b * nheads + off_h) * seqlen_q + i,
                 tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("inf")), mask=row_ok)


@triton.jit
def _combine(O_PART, LSE_PART, O, LSE, stride_ob, stride_om, stride_oh, batch, seqlen_q, nheads, num_splits,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr = False):
    """Merge the splits of one output row (b, i, h): O = sum_s w_s O_s / sum_s w_s with
    w_s = 2^(lse_s - max lse); lse = log(sum_s 2^lse_s). No split saw a key: O = 0, lse = +inf.
    CHUNK splits are read at once (one round trip to memory each, not one per split), merged
    online as the forward merges key tiles. Grid (batch * seqlen_q * nheads, 1, 1)."""
    _dependent_start(PDL)
    row = tl.program_id(0).to(tl.int64)                             # (b, i, h) flattened: any batch
    off_b = row // (seqlen_q * nheads)
    i = (row // nheads % seqlen_q).to(tl.int32)
    off_h = (row % nheads).to(tl.int32)
    offs_s = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    split_stride = batch * nheads * seqlen_q                       # rows of one split
    lse_row = (off_b * nheads + off_h) * seqlen_q + i
    o_row = ((off_b * seqlen_q + i) * nheads + off_h) * HEAD_DIM
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, CHUNK):
        split = s0 + offs_s
        lse_s = tl.load(LSE_PART + split * split_stride + lse_row, mask=split < num_splits,
                        other=float("-inf"))                       # [CHUNK]
        o_s = tl.load(O_PART + (split * split_stride * HEAD_DIM + o_row)[:, None] + offs_d[None, :],
                      mask=(split < num_splits)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(lse_s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse_s - m_safe)                           # [CHUNK]
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o_s, 0)            # [BLOCK_D]
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    seen = total != 0.0
    total_safe = tl.where(seen, total, 1.0)
    tl.store(O + off_b * stride_ob + i * stride_om + off_h * stride_oh + offs_d,
             (acc / total_safe).to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(LSE + lse_row, tl.where(seen, (m_safe + tl.math.log2(total_safe)) * LN2, float("inf")))


@triton.jit
def _rotate(X, offs_d, cos_row, sin_row, rotary_half, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """One row of X (a pointer to its first element) with its first 2 * rotary_half dims rotated at
    the position whose cos/sin rows are given, computed in fp32. Non-interleaved (GPT-NeoX) pairs d
    with d + rotary_half; interleaved (GPT-J) pairs 2c with 2c + 1."""
    d_ok = offs_d < HEAD_DIM
    x = tl.load(X + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    rot = offs_d < 2 * rotary_half
    if INTERLEAVED:
        c = offs_d // 2
        partner = offs_d ^ 1
        first = offs_d % 2 == 0
    else:
        c = tl.where(offs_d < rotary_half, offs_d, offs_d - rotary_half)
        partner = tl.where(offs_d < rotary_half, offs_d + rotary_half, offs_d - rotary_half)
        first = offs_d < rotary_half
    x2 = tl.load(X + partner, mask=rot, other=0.0).to(tl.float32)
    cos = tl.load(cos_row + c, mask=rot, other=1.0).to(tl.float32)
    sin = tl.load(sin_row + c, mask=rot, other=0.0).to(tl.float32)
    return tl.where(rot, x * cos + tl.where(first, -x2, x2) * sin, x)


@triton.jit
def _append_kv(KNEW, VNEW, K, V, Q, QROT, COS, SIN,
               stride_knb, stride_knm, stride_knh, stride_vnb, stride_vnm, stride_vnh,
               stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
               stride_qb, stride_qm, stride_qh, stride_rb, stride_rm, stride_rh,
               SEQLENS, seqlen_cached, LEFTPAD, BATCH_IDX, BLOCK_TABLE, stride_btb, seqlen_new, seqlen_q, nheads_k,
               group, rotary_half, stride_cos,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
               HAS_BATCH_IDX: tl.constexpr, PAGE_SIZE: tl.constexpr, ROTARY: tl.constexpr,
               INTERLEAVED: tl.constexpr, Q_ALL_POSITIONS: tl.constexpr):
    """Program (t, h, b): with t < seqlen_new and h < nheads_k, write new token t of KV head h into
    the cache at slot cache_seqlens[b] + t (k rotated at position cache_seqlens[b] - leftpad[b] + t);
    with ROTARY, t < seqlen_q and h < nheads_k * group, also write query (t, h) rotated into QROT at
    position cache_seqlens[b] - leftpad[b] (+ t when Q_ALL_POSITIONS: causal or windowed).
    Grid (max(seqlen_new, seqlen_q), nheads_k * group, batch)."""
    t = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    cached = seqlen_cached                                           # one length for every sequence
    if HAS_SEQLENS:
        cached = tl.load(SEQLENS + off_b)
    leftpad = 0
    if HAS_LEFTPAD:
        leftpad = tl.load(LEFTPAD + off_b)
    position = cached - leftpad                                      # the first new token's position
    if ROTARY:
        if t < seqlen_q:
            q_pos = position
            if Q_ALL_POSITIONS:
                q_pos += t
            q = _rotate(Q + off_b * stride_qb + t * stride_qm + off_h * stride_qh, offs_d,
                        COS + q_pos.to(tl.int64) * stride_cos, SIN + q_pos.to(tl.int64) * stride_cos,
                        rotary_half, HEAD_DIM, INTERLEAVED)
            tl.store(QROT + off_b * stride_rb + t * stride_rm + off_h * stride_rh + offs_d,
                     q.to(QROT.dtype.element_ty), mask=d_ok)
    if (t < seqlen_new) & (off_h < nheads_k):
        cache_b = off_b
        if HAS_BATCH_IDX:
            cache_b = tl.load(BATCH_IDX + off_b).to(tl.int64)
        slot = (cached + t).to(tl.int64)
        if PAGE_SIZE > 0:
            page = tl.load(BLOCK_TABLE + off_b * stride_btb + slot // PAGE_SIZE).to(tl.int64)
            k_row = page * stride_kb + (slot % PAGE_SIZE) * stride_kn
            v_row = page * stride_vb + (slot % PAGE_SIZE) * stride_vn
        else:
            k_row = cache_b * stride_kb + slot * stride_kn
            v_row = cache_b * stride_vb + slot * stride_vn
        k_src = KNEW + off_b * stride_knb + t * stride_knm + off_h * stride_knh
        if ROTARY:
            k_pos = (position + t).to(tl.int64)
            k = _rotate(k_src, offs_d, COS + k_pos * stride_cos, SIN + k_pos * stride_cos, rotary_half,
                        HEAD_DIM, INTERLEAVED)
        else:
            k = tl.load(k_src + offs_d, mask=d_ok)
        tl.store(K + k_row + off_h * stride_kh + offs_d, k.to(K.dtype.element_ty), mask=d_ok)
        v = tl.load(VNEW + off_b * stride_vnb + t * stride_vnm + off_h * stride_vnh + offs_d, mask=d_ok)
        tl.store(V + v_row + off_h * stride_vh + offs_d, v, mask=d_ok)


_launch_split = Launcher(_split_kv_fwd)
_launch_combine = Launcher(_combine)
_launch_append = Launcher(_append_kv)


def tiles(rows: int, head_dim: int, wide: bool = False, filled: bool = False) -> TileConfig:
    """Tile shape of the split kernel for `rows` = seqlen_q * G packed rows (benchmarks/TUNING.md,
    § split-kv): 16 rows at least (tl.dot's minimum), at most 64 (more rows share a K/V tile but the
    accumulator grows). Keys per tile and stages, up to head dim 128: 64 keys with two tiles in
    flight (3 stages: the next tile's loads are issued before the current tile's products), three
    when `filled` (the call runs unsplit: `plan`); `wide`: 128 keys, one tile in flight, and three
    programs an SM (paged caches, whose block-table read leaves the pipeliner one buffer at any stage
    count; and batches of many waves of programs). Beyond head dim 128: 32 keys, 2 stages."""
    block_m = min(64, max(16, 1 << (rows - 1).bit_length()))
    if head_dim > 128:
        return TileConfig(block_m, 32, num_warps=4, num_stages=2)
    if wide:
        return TileConfig(block_m, 128, num_warps=4, num_stages=2)
    return TileConfig(block_m, 64, num_warps=4, num_stages=4 if filled else 3)


def plan(batch: int, nheads_k: int, rows: int, capacity: int, head_dim: int, elem: int, paged: bool,
         num_splits: int, device: torch.device) -> tuple[TileConfig, int]:
    """The tiles and the split count of a split-KV call (num_splits=0: chosen here). `rows` =
    seqlen_q * G, `capacity` the keys a sequence may hold. A contiguous cache whose (batch, KV head,
    row block) programs number FILLED_PER_SM to CROWDED_PER_SM per SM runs unsplit with three tiles
    in flight; beyond that on the `wide` tiles; otherwise num_splits_for's model fills the GPU."""
    block_m = tiles(rows, head_dim).block_m
    programs = batch * nheads_k * cdiv(rows, block_m)
    sms, shared = _sm(device)
    crowded = programs > CROWDED_PER_SM * sms
    filled = (not paged and not crowded and head_dim <= 128 and num_splits in (0, 1)
              and programs >= FILLED_PER_SM * sms)
    t = tiles(rows, head_dim, paged or crowded, filled)
    if num_splits == 0:
        resident = max(1, min(4, shared // _shared_bytes(t, head_dim, elem)))
        num_splits = 1 if filled else num_splits_for(programs, cdiv(capacity, t.block_n), resident, device)
    return t, min(num_splits, max(1, cdiv(capacity, t.block_n)), MAX_SPLITS)


def _sm(device: torch.device) -> tuple[int, int]:
    """(SM count, shared memory bytes per SM) of a CUDA device (configs.sm_resources); the
    interpreter's stand-in is a few small SMs, so that the CPU tests split and combine."""
    if device.type != "cuda":
        return 8, 2 * 72 * 1024
    return configs.sm_resources(device)


def _pdl(device: torch.device) -> bool:
    """Whether the split and combine kernels are launched with programmatic dependent launch on
    `device`: a CUDA device of compute capability 9.0 or later (Hopper)."""
    if device.type != "cuda":
        return False
    return configs._capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


def _shared_bytes(t: TileConfig, head_dim: int, elem: int) -> int:
    """The split kernel's shared memory: num_stages - 1 K and V tiles in flight, and the q tile."""
    d = block_d(head_dim)
    return (t.num_stages - 1) * 2 * t.block_n * d * elem + t.block_m * d * elem + 2048


@functools.lru_cache(maxsize=4096)
def num_splits_for(programs: int, key_tiles: int, resident: int, device: torch.device) -> int:
    """Splits when num_splits=0: the count that minimises a model of the read time (benchmarks/
    TUNING.md, § split-kv). `programs` (batch x KV heads x row blocks) times the splits run in waves
    of at most `resident` per SM; each program reads ceil(key_tiles / splits) tiles and pays about
    one tile more to start. A wave's time is its bytes over the memory bandwidth, which takes about
    1.8 programs per SM to reach: a wave of fewer programs costs as much as one of that many. Only
    counts without an empty split are considered; fewer splits win ties (less to combine).
    `key_tiles` counts the tiles of the longest possible sequence (the cache's capacity: the lengths
    themselves are on the device). Contiguous and paged caches alike."""
    sms, _ = _sm(device)
    slots = sms * resident
    saturating = math.ceil(SATURATING_PER_SM * sms)

    def cost(splits: int) -> float:
        full, last = divmod(programs * splits, slots)
        programs_read = full * slots + (max(last, saturating) if last else 0)
        return (cdiv(key_tiles, splits) + STARTUP_TILES) * programs_read

    # ceil(key_tiles / tiles_per_split) for every tiles_per_split that needs at most MAX_SPLITS
    # splits: the counts with no empty split.
    tiles = max(key_tiles, 1)
    counts = {cdiv(tiles, per) for per in range(cdiv(tiles, MAX_SPLITS), tiles + 1)}
    return min(counts, key=lambda splits: (cost(splits), splits))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, variant: Variant,
            cache: KVCache | None = None, num_splits: int = 0,
            after_append: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """O (B, Sq, H, D) in q's dtype and lse (B, H, Sq) float32. Without `cache`, k and v are dense
    (B, Sk, Hk, D); with it they are the cache (contiguous (B_cache, S_cache, Hk, D) or paged
    (pages, page_size, Hk, D)) and `cache` says which keys each sequence has. Options: causal, window,
    softcap, ALiBi (choice.SPLIT_KV_FEATURES); num_splits=0 chooses the splits. `after_append`: the
    call follows `append`'s kernel on the stream (appends(...) was true)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    group = nheads // nheads_k
    page_size = cache.page_size if cache is not None else 0
    capacity = cache.capacity if cache is not None else k.shape[1]
    t, num_splits = plan(batch, nheads_k, seqlen_q * group, capacity, head_dim, q.element_size(), page_size > 0,
                         num_splits, q.device)
    m_blocks = cdiv(seqlen_q * group, t.block_m)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    split = num_splits > 1
    o_part = lse_part = None
    if split:
        o_part = torch.empty((num_splits, batch, seqlen_q, nheads, head_dim), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    # Softcap, ALiBi and the window as every kernel takes them (choice sends no other option here).
    kw = dict(common_options(variant, q, k, softmax_scale, seqlen_k=capacity).kwargs)
    per_sequence = cache is not None and isinstance(cache.seqlens, torch.Tensor)
    if cache is not None:
        kw.update(HAS_SEQLENS=per_sequence, HAS_LEFTPAD=cache.leftpad is not None,
                  HAS_BATCH_IDX=cache.batch_idx is not None, PAGE_SIZE=page_size)
    table = cache.block_table if cache is not None else None
    # Programmatic dependent launch on Hopper: the combine always; the split unless the append
    # kernel runs just before it (a split overlapping the append measured slower at long caches:
    # benchmarks/TUNING.md, § split-kv).
    chained = _pdl(q.device)
    overlap = chained and not after_append
    _launch_split(
        (batch * nheads_k, m_blocks, num_splits), q, k, v, o, lse, o_part, lse_part,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        # One length for every sequence is a launch argument (no tensor to fill, no load).
        seqlen_q, k.shape[1] if cache is None or per_sequence else cache.seqlens + cache.seqlen_new, nheads,
        softmax_scale * LOG2E.value, num_splits,
        cache.seqlens if per_sequence else None, cache.seqlen_new if cache is not None else 0,
        cache.leftpad if cache is not None else None, cache.batch_idx if cache is not None else None,
        table, table.stride(0) if table is not None else 0, **kw,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        IS_CAUSAL=variant.causal, SPLIT=split, DOT_PRECISION=dot_precision(q.dtype), PDL=chained,
        TILE_IN_PAGE=_tile_in_page(page_size, t.block_n, cache, k, v),
        POOL_32=pool32(page_size, k, v),
        num_warps=t.num_warps, num_stages=t.num_stages, launch_pdl=overlap)
    if split:
        _launch_combine((batch * seqlen_q * nheads, 1, 1), o_part, lse_part, o, lse, *o.stride()[:3], batch, seqlen_q,
                        nheads, num_splits, HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim),
                        CHUNK=min(32, max(2, 1 << (num_splits - 1).bit_length())), PDL=chained,
                        num_warps=4, num_stages=1, launch_pdl=chained)
    return o, lse


def _extent(x: torch.Tensor) -> int:
    """One past the largest element offset of x from its first element."""
    return 1 + sum((n - 1) * stride for n, stride in zip(x.shape, x.stride()))


def pool32(page_size: int, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The paged kernel's POOL_32 (_key_rows): whether every element offset into the pools fits 32
    bits (a pool of exactly 2^31 elements, largest offset 2^31 - 1, still does). Larger pools gather
    in 64 bits: a 32-bit row index times the row stride read no faster (benchmarks/TUNING.md,
    § split-kv)."""
    return page_size > 0 and max(_extent(k), _extent(v)) <= 2 ** 31


def _tile_in_page(page_size: int, block_n: int, cache: KVCache | None, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether every key tile lies in one page of a paged cache (the kernel's TILE_IN_PAGE): pages of
    whole tiles, no leftpad (tiles start at multiples of their size), and row offsets within a page
    that 32 bits hold (common.wide over the page's rows)."""
    return (page_size > 0 and page_size % block_n == 0 and cache.leftpad is None
            and not wide_offsets(page_size, k, v))


def appends(k: torch.Tensor | None, rotary_cos: torch.Tensor | None) -> bool:
    """Whether `append` launches its kernel: new keys to write, or a query to rotate."""
    return k is not None or rotary_cos is not None


def append(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None,
           v: torch.Tensor | None, cache: KVCache, rotary_cos: torch.Tensor | None,
           rotary_sin: torch.Tensor | None, rotary_interleaved: bool, q_all_positions: bool) -> torch.Tensor:
    """Write k, v (B, Sn, Hk, D) into the cache at cache.seqlens (k rotated when cos/sin are given)
    and return q, rotated into a new tensor when cos/sin are given (else q itself)."""
    rotary = rotary_cos is not None
    if not appends(k, rotary_cos):
        return q
    batch, seqlen_q, nheads, head_dim = q.shape
    nheads_k = k_cache.shape[2]
    seqlen_new = k.shape[1] if k is not None else 0
    q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device) if rotary else q
    table = cache.block_table
    per_sequence = isinstance(cache.seqlens, torch.Tensor)
    k_args = (k, v, *k.stride()[:3], *v.stride()[:3]) if k is not None else (None, None, 0, 0, 0, 0, 0, 0)
    _launch_append(
        (max(seqlen_new, seqlen_q if rotary else 0), nheads if rotary else nheads_k, batch),
        k_args[0], k_args[1], k_cache, v_cache, q, q_rot, rotary_cos, rotary_sin, *k_args[2:],
        *k_cache.stride()[:3], *v_cache.stride()[:3], *q.stride()[:3], *q_rot.stride()[:3],
        *((cache.seqlens, 0) if per_sequence else (None, cache.seqlens)), cache.leftpad, cache.batch_idx, table,
        table.stride(0) if table is not None else 0,
        seqlen_new, seqlen_q, nheads_k, nheads // nheads_k,
        rotary_cos.shape[1] if rotary else 0, rotary_cos.stride(0) if rotary else 0,
        HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), HAS_SEQLENS=per_sequence,
        HAS_LEFTPAD=cache.leftpad is not None, HAS_BATCH_IDX=cache.batch_idx is not None,
        PAGE_SIZE=cache.page_size, ROTARY=rotary,
        INTERLEAVED=rotary_interleaved, Q_ALL_POSITIONS=q_all_positions, num_warps=1, num_stages=1)
    return q_rot
