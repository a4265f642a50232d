"""FlashAttention forward for Hopper in Gluon: FlashAttention-3's ping-pong schedule.

forward._attn_fwd_ws leaves the schedule to Triton's automatic warp specialization, which runs each
consumer warp group's exponentials and its matrix products one after the other. Here the schedule is
written out, as FlashAttention-3 does it:
  - a producer warp loads Q once and K_j, V_j into rings of STAGES slots by TMA. K and V have
    barriers of their own: K_j's slot is free once every consumer's S_j is computed, V_j's only
    after P_j V_j, a step later; K_{j+1} is loaded before V_j, so that neither waits for the other;
  - two consumer warp groups of ROWS query rows each (three at head dim 64: CONSUMERS). Step j
    issues S_j = Q K_j^T and then O += P_{j-1} V_{j-1} and runs the softmax of block j while the
    second product is still in the tensor cores (within a warp group);
  - the warp groups take turns to issue their products (mbarriers `turn`, round robin), so that one's
    exponentials run while another's products occupy the tensor cores (between warp groups).

A tile is BLOCK_M = CONSUMERS * ROWS query rows of one head, in the order of _tile (query block fastest;
with causal the last query block of a head first, as it visits the most keys). The grid is one
program per tile, or persistent (one per SM, configs' ping_pong_persistent): program p starts with
tile p and then takes the first tile no program has taken yet (an atomic counter), so that tiles
start in order as with the hardware's scheduler and the long causal ones spread over the SMs; the
producer loads the next tile's Q while the consumers finish the last P V and store O, and the
descriptors are made once a program. Glossary (the names of forward.py):
    qk        S_j = Q K_j^T of one warp group's rows, unscaled           [ROWS, BLOCK_N]
    p         exp2(qk * qk_scale - m_new)                                  [ROWS, BLOCK_N]
    m_i, l_i  running row max (base 2, scaled) and row sum                 [ROWS]
    alpha     exp2(m_old - m_new): rescales acc before P_j V_j is added    [ROWS]
    acc       the unnormalised output                                      [ROWS, HEAD_DIM]
    limit     per row, the number of leading keys it sees: seqlen_k, or with causal
              row + offset + 1 (offset = seqlen_k - seqlen_q, bottom-right aligned)
    n_full    key blocks every row of the tile sees whole; the later ones are masked by `limit`
    it, tc, turns   K / V blocks, tiles and turns a partition has gone through: ring slots and phases
Rows past seqlen_q and keys past seqlen_k are read as zeros (4-D descriptors over (B, S, H, D) bound
each sequence); a row that sees no key gets O = 0 and LSE = +inf, as in forward.py.

VARLEN (packed sequences, common.py): the tiles of every sequence as long as the longest (batch: the
sequences; max_seqlen_q: the longest), always persistent (their lengths vary, and a program's
producer loads the next tile while its consumers finish the last); a tile whose query block lies
past its sequence is passed over (_claim). The descriptors span the packed tensors, (1, total, H, D),
and a tile's loads start at its sequence's first query and key rows; the producer hands each tile
over with its sequence's first query row and lengths (_hand_over, next_tile). The last query block
of a sequence overhangs into the next sequence's rows (their O rows are never stored), and so does
its last key block: its scores are masked, and the consumers zero the overhang of V (_clear_rows),
so that nothing of one sequence reaches another's output; past the last sequence TMA reads zeros.

Only plain attention (causal or not, GQA, any lengths, a positive softmax scale) at head dims 64,
128 and 256 in fp16/bf16 on sm_90; choice.kernel_for sends every other call to the other kernels.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

from flashattn.ops.triton import configs, plan
from flashattn.ops.triton.common import LN2, LOG2E, cdiv, packed_sequence, strides
from flashattn.ops.triton.launch import Launcher

DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128, 256)
ROWS = 64                                   # query rows per consumer warp group
# Consumer warp groups per head dim: at 64 a step's products are short beside its exponentials, and a
# third warp group keeps the tensor cores busy while two run their softmax (FlashAttention-3's 192-row
# tiles); each then has 160 registers (CONSUMER_REGS), against 240 with two.
CONSUMERS = {64: 3, 128: 2, 256: 2}
BLOCK_M = {head_dim: n * ROWS for head_dim, n in CONSUMERS.items()}
# Keys per block: at head dim 256 the accumulator alone takes 128 registers a thread, and S of
# 64 x 128 would take 64 more.
BLOCK_N = {64: 128, 128: 128, 256: 64}
# K and V ring slots per (head dim, causal), the fastest that fit (benchmarks/TUNING.md,
# § ping-pong-forward); 128 x 3 takes 225 KB of shared memory, 256 x 3 would not fit.
STAGES = {(64, False): 3, (64, True): 3, (128, False): 3, (128, True): 2, (256, False): 2, (256, True): 2}
NUM_WARPS = 4                               # each partition's warp group; the producer adds one warp
CONSUMER_REGS = {2: 240, 3: 160}
PRODUCER_REGS = gl.constexpr(24)


@gluon.jit
def _tile(t, n_m, nheads, group_size, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
          IS_CAUSAL: gl.constexpr):
    """Tile t's first query row, head, kv head and batch, its number of key blocks and of those
    that every row sees whole. Tiles run query block fastest (the programs at work at once share
    their heads' K and V in L2), the last query block of a head first with causal (it visits the
    most keys)."""
    m_idx = t % n_m
    off_h = (t // n_m) % nheads
    off_b = t // (n_m * nheads)
    if IS_CAUSAL:
        m_idx = n_m - 1 - m_idx
    start_m = m_idx * BLOCK_M
    offset = seqlen_k - seqlen_q
    if IS_CAUSAL:
        hi = gl.maximum(gl.minimum(start_m + BLOCK_M + offset, seqlen_k), 0)
        n_full = gl.maximum(gl.minimum(start_m + offset + 1, seqlen_k), 0) // BLOCK_N
    else:
        hi = seqlen_k
        n_full = seqlen_k // BLOCK_N
    return start_m, off_h, off_h // group_size, off_b, gl.cdiv(hi, BLOCK_N), n_full


@gluon.jit
def _claim(t, COUNTER, CU_SEQLENS_Q, CU_SEQLENS_K, n_m, nheads, group_size, n_tiles, BLOCK_M: gl.constexpr,
           BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """VARLEN: tile t, or if its query block lies past its sequence, the next tile taken from COUNTER
    that does not (one fetch per tile passed over, as per tile worked); t >= n_tiles when none is
    left."""
    searching = t < n_tiles
    while searching:
        seq_q = packed_sequence(CU_SEQLENS_Q, CU_SEQLENS_K, t // (n_m * nheads))[2]
        searching = _tile(t, n_m, nheads, group_size, seq_q, 0, BLOCK_M, BLOCK_N, IS_CAUSAL)[0] >= seq_q
        if searching:
            t = _fetch(COUNTER, n_tiles)
            searching = t < n_tiles
    return t


@gluon.jit
def _fetch(COUNTER, n_tiles):
    """The next untaken tile of the persistent grid. Fetches count from 0 to n_tiles - 1 over the
    launch (one a tile); the last one resets COUNTER for the next launch on this stream."""
    fetched = gl.atomic_add(COUNTER, 1)
    if fetched == n_tiles - 1:
        gl.atomic_xchg(COUNTER, 0)
    return gl.num_programs(0) + fetched


@gluon.jit
def _hand_over(next_tile, tc, t, q_start, seq_q, seq_k):
    """VARLEN: the consumers' tc-th tile t and its sequence's first query row and lengths,
    into slot tc % 2 of `next_tile` (they read it once its Q has arrived, or q_bar's arrival past the
    last tile, and again for the epilogue: the slot is rewritten only after their next tile's S)."""
    slots = gl.arange(0, 8, layout=gl.BlockedLayout([1], [32], [1], [0]))
    info = gl.where(slots == 0, t, gl.where(slots == 1, q_start, gl.where(slots == 2, seq_q, seq_k)))
    next_tile.index(tc & 1).store(info)


@gluon.jit
def _taken(next_tile, tc, field: gl.constexpr):
    """Field `field` of _hand_over's slot for the consumers' tc-th tile: 0 t, 1 q_start, 2 seq_q,
    3 seq_k."""
    whole: gl.constexpr = gl.BlockedLayout([8], [32], [4], [0])        # every thread reads the slot
    info = next_tile.index(tc & 1).load(whole)
    return gl.sum(gl.where(gl.arange(0, 8, layout=whole) == field, info, 0), axis=0)


@gluon.jit
def _producer(Q, K, V, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, next_tile,
              COUNTER, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
              stride_vh, batch, nheads, group_size, seqlen_q, seqlen_k, n_m, n_tiles, CU_SEQLENS_Q, CU_SEQLENS_K,
              HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, PERSISTENT: gl.constexpr, VARLEN: gl.constexpr):
    """The load warp, over the program's tiles: the consumers' parts of Q once every consumer is done
    with the previous tile's, then K_{j+1} and V_j into ring slots once every consumer has released
    them. One descriptor per tensor bounds every (batch, head) (rows past a sequence read as 0).
    Persistent: after the first tile (the program's own index) it takes the next from COUNTER and
    hands its index to the consumers in `next_tile`, with the next Q (an index past the last tile,
    with an arrival of its own, ends the consumers' loop).
    VARLEN: the descriptors span the packed rows, and a tile's loads start at its sequence's first
    query and key rows (the last Q or K/V block of a sequence overhangs into the next sequence's rows,
    which the consumers mask: see _clear_rows); every tile, the first included, is handed over with
    its sequence's first query row and lengths (next_tile)."""
    dtype: gl.constexpr = Q.dtype.element_ty
    BLOCK_M: gl.constexpr = CONSUMERS * ROWS
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, ROWS, 1, HEAD_DIM], dtype)
    k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, BLOCK_N, 1, HEAD_DIM], dtype)
    nheads_k = nheads // group_size
    if VARLEN:
        batch = 1
    q_desc = tma.make_tensor_descriptor(Q, shape=[batch, seqlen_q, nheads, HEAD_DIM],
                                        strides=[stride_qb, stride_qm, stride_qh, 1],
                                        block_shape=[1, ROWS, 1, HEAD_DIM], layout=q_layout)
    k_desc = tma.make_tensor_descriptor(K, shape=[batch, seqlen_k, nheads_k, HEAD_DIM],
                                        strides=[stride_kb, stride_kn, stride_kh, 1],
                                        block_shape=[1, BLOCK_N, 1, HEAD_DIM], layout=k_layout)
    v_desc = tma.make_tensor_descriptor(V, shape=[batch, seqlen_k, nheads_k, HEAD_DIM],
                                        strides=[stride_vb, stride_vn, stride_vh, 1],
                                        block_shape=[1, BLOCK_N, 1, HEAD_DIM], layout=k_layout)
    it = 0              # K / V blocks loaded so far: ring slot and phase
    tc = 0              # tiles so far: Q's phase
    t = gl.program_id(0)
    if VARLEN:
        t = _claim(t, COUNTER, CU_SEQLENS_Q, CU_SEQLENS_K, n_m, nheads, group_size, n_tiles, BLOCK_M, BLOCK_N,
                   IS_CAUSAL)
    while t < n_tiles:
        q_start = t * 0                     # the tile's sequence (VARLEN): first rows, lengths
        k_start = q_start
        seq_q = seqlen_q
        seq_k = seqlen_k
        if VARLEN:
            q_start, k_start, seq_q, seq_k = packed_sequence(CU_SEQLENS_Q, CU_SEQLENS_K, t // (n_m * nheads))
            q_start = q_start.to(gl.int32)          # TMA coordinates (rows of a tensor, < 2^31)
            k_start = k_start.to(gl.int32)
        start_m, off_h, off_hk, off_b, n_blocks, n_full = _tile(t, n_m, nheads, group_size, seq_q, seq_k,
                                                                BLOCK_M, BLOCK_N, IS_CAUSAL)
        if VARLEN:
            off_b = 0
        mbarrier.wait(q_empty, (tc & 1) ^ 1)
        if VARLEN:
            _hand_over(next_tile, tc, t, q_start, seq_q, seq_k)
        mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
        for part in gl.static_range(CONSUMERS):
            tma.async_copy_global_to_shared(q_desc, [off_b, q_start + start_m + part * ROWS, off_h, 0], q_bar,
                                            q_smem.index(part)._reinterpret(dtype, [1, ROWS, 1, HEAD_DIM], q_layout))
        if n_blocks > 0:
            _load_block(k_desc, k_smem, k_ready, k_empty, it, k_start, off_b, off_hk, k_layout, BLOCK_N, HEAD_DIM,
                        STAGES)
        for j in range(n_blocks):
            if j + 1 < n_blocks:
                _load_block(k_desc, k_smem, k_ready, k_empty, it + j + 1, k_start + (j + 1) * BLOCK_N, off_b, off_hk,
                            k_layout, BLOCK_N, HEAD_DIM, STAGES)
            _load_block(v_desc, v_smem, v_ready, v_empty, it + j, k_start + j * BLOCK_N, off_b, off_hk, k_layout,
                        BLOCK_N, HEAD_DIM, STAGES)
        it += n_blocks
        tc += 1
        if VARLEN:
            t = _claim(_fetch(COUNTER, n_tiles), COUNTER, CU_SEQLENS_Q, CU_SEQLENS_K, n_m, nheads, group_size, n_tiles,
                       BLOCK_M, BLOCK_N, IS_CAUSAL)
        elif PERSISTENT:
            t = _fetch(COUNTER, n_tiles)
            # Every consumer has read the previous index once they all release its Q.
            mbarrier.wait(q_empty, (tc & 1) ^ 1)
            next_tile.store(gl.full([1], t, gl.int32, layout=gl.BlockedLayout([1], [32], [1], [0])))
            if t >= n_tiles:
                mbarrier.arrive(q_bar, count=1)
        else:
            t += gl.num_programs(0)
    if VARLEN:
        mbarrier.wait(q_empty, (tc & 1) ^ 1)
        _hand_over(next_tile, tc, t, 0, 0, 0)
        mbarrier.arrive(q_bar, count=1)


@gluon.jit
def _load_block(desc, smem, ready, empty, c, row, off_b, off_hk, layout: gl.constexpr, BLOCK_N: gl.constexpr,
                HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
    """The key block from `row` of (off_b, off_hk) of K or V, the program's c-th, into ring slot
    c % STAGES once every consumer has released the slot."""
    s = c % STAGES
    mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(s), desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [off_b, row, off_hk, 0], ready.index(s),
                                    smem.index(s)._reinterpret(smem.dtype, [1, BLOCK_N, 1, HEAD_DIM], layout))


@gluon.jit
def _my_turn(turn, t, WG: gl.constexpr):
    """Wait for this warp group's t-th turn to issue products (warp group 0 goes first; each hands
    the turn on to the next, round robin, by arriving on its barrier: _pass_turn)."""
    if WG == 0:
        mbarrier.wait(turn.index(0), (t & 1) ^ 1)
    else:
        mbarrier.wait(turn.index(WG), t & 1)


@gluon.jit
def _pass_turn(turn, WG: gl.constexpr, CONSUMERS: gl.constexpr):
    mbarrier.arrive(turn.index((WG + 1) % CONSUMERS), count=1)


@gluon.jit
def _softmax(qk, m_i, l_i, qk_scale, limit, cols, start_n, MASKED: gl.constexpr):
    """P of one block, the new running max and sum, and alpha. Unmasked, every row has a finite max,
    and qk_scale > 0 lets the max be taken before scaling (one fused multiply-add per score)."""
    if MASKED:
        seen = gl.expand_dims(cols, 0) < gl.expand_dims(limit - start_n, 1)
        qk = gl.where(seen, qk * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, axis=1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)     # a row that has seen no key yet
        p = gl.exp2(qk - gl.expand_dims(m_use, 1))
    else:
        m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
        m_use = m_new
        p = gl.exp2(qk * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _clear_rows(v, valid, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Rows `valid`... of the V block v (shared memory) set to 0. A sequence's last block overhangs
    into the next sequence's rows: P is 0 there, but 0 * inf or NaN is NaN, and one sequence's values
    must not reach another's output. Every consumer warp group clears the block before its P V, each
    writing only zeros over the overhang, so none can disturb another's product."""
    CHUNK: gl.constexpr = 8                       # rows a step: the 128-byte swizzle's period
    COLS: gl.constexpr = HEAD_DIM // 8            # threads along a row, 8 values (16 bytes) each
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // COLS, COLS], [4, 1], [1, 0])
    rows = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
    for i in gl.static_range(BLOCK_N // CHUNK):
        if (i + 1) * CHUNK > valid:
            part = v.slice(i * CHUNK, CHUNK)
            x = part.load(layout)                                                   # [CHUNK, HEAD_DIM]
            part.store(gl.where(gl.expand_dims(rows + i * CHUNK < valid, 1), x, gl.zeros_like(x)))
    fence_async_shared()


@gluon.jit
def _consumer(O, LSE, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn, next_tile,
              stride_ob, stride_om, stride_oh, nheads, group_size, seqlen_q, seqlen_k, n_m, n_tiles, qk_scale,
              lse_rows, WG: gl.constexpr, HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, CONSUMERS: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, PERSISTENT: gl.constexpr,
              VARLEN: gl.constexpr):
    """One consumer warp group, over the program's tiles: rows start_m + WG * ROWS ... of O and the LSE.
    VARLEN: O and the LSE start at the first row of each tile's sequence (handed over by the producer),
    and the LSE rows are lse_rows (total_q) apart from one head to the next."""
    dtype: gl.constexpr = O.dtype.element_ty
    BLOCK_M: gl.constexpr = CONSUMERS * ROWS
    # Which P a step carries into the next: with 240 registers the 32-bit P, converted to 16 bits
    # while the next S is computed; with 160 (three warp groups) the 16-bit P, converted once P V
    # of the step before is done with its registers (else the step spills).
    P16_CARRIED: gl.constexpr = CONSUMERS > 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    # P as the register A operand of P V: the same registers as S's accumulator (16-bit, k_width 2).
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    q = q_smem.index(WG)                                                        # [ROWS, HEAD_DIM]
    rows = gl.arange(0, ROWS, layout=row_layout)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    o_rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    it = 0              # K / V blocks consumed so far: ring slot and phase
    tc = 0              # tiles so far: Q's phase
    turns = 0           # turns taken so far (every other warp group takes as many)
    t = gl.program_id(0)
    if VARLEN:
        mbarrier.wait(q_bar, 0)
        t = _taken(next_tile, 0, 0)
    while t < n_tiles:
        # The tile's sequence (VARLEN: read from shared memory where needed, not kept in registers
        # across the loop, which holds all the warp group can).
        seq_q = seqlen_q
        seq_k = seqlen_k
        if VARLEN:
            seq_q = _taken(next_tile, tc, 2)
            seq_k = _taken(next_tile, tc, 3)
        start_m, off_h, off_hk, off_b, n_blocks, n_full = _tile(t, n_m, nheads, group_size, seq_q, seq_k,
                                                                BLOCK_M, BLOCK_N, IS_CAUSAL)
        if VARLEN:
            off_b = 0
        row0 = start_m + WG * ROWS
        if IS_CAUSAL:
            limit = gl.minimum(rows + (row0 + seq_k - seq_q + 1), seq_k)           # [ROWS]
        else:
            limit = gl.full([ROWS], seq_k, gl.int32, layout=row_layout)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
        l_i = gl.zeros([ROWS], gl.float32, layout=row_layout)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        mbarrier.wait(q_bar, tc & 1)
        if n_blocks > 0:
            # Block 0: S_0 alone.
            s = it % STAGES
            mbarrier.wait(k_ready.index(s), (it // STAGES) & 1)
            _my_turn(turn, turns, WG)
            qk = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            _pass_turn(turn, WG, CONSUMERS)
            qk = warpgroup_mma_wait(0, deps=(qk,))
            mbarrier.arrive(k_empty.index(s), count=1)
            if n_full > 0:
                p, m_i, l_i, alpha = _softmax(qk, m_i, l_i, qk_scale, limit, cols, 0, False)
            else:
                p, m_i, l_i, alpha = _softmax(qk, m_i, l_i, qk_scale, limit, cols, 0, True)
            if P16_CARRIED:
                p_op = gl.convert_layout(p.to(dtype), p_layout)                 # [ROWS, BLOCK_N]
            for j in range(1, n_blocks):
                c = it + j
                s = c % STAGES
                prev = (c - 1) % STAGES
                mbarrier.wait(k_ready.index(s), (c // STAGES) & 1)
                _my_turn(turn, turns + j, WG)
                qk = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                if not P16_CARRIED:
                    p_op = gl.convert_layout(p.to(dtype), p_layout)             # [ROWS, BLOCK_N]
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
                mbarrier.wait(v_ready.index(prev), ((c - 1) // STAGES) & 1)
                acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                _pass_turn(turn, WG, CONSUMERS)
                # The softmax of block j while P_{j-1} V_{j-1} is in the tensor cores.
                qk = warpgroup_mma_wait(1, deps=(qk,))
                mbarrier.arrive(k_empty.index(s), count=1)
                if j < n_full:
                    p, m_i, l_i, alpha = _softmax(qk, m_i, l_i, qk_scale, limit, cols, j * BLOCK_N, False)
                else:
                    p, m_i, l_i, alpha = _softmax(qk, m_i, l_i, qk_scale, limit, cols, j * BLOCK_N, True)
                acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
                mbarrier.arrive(v_empty.index(prev), count=1)
                if P16_CARRIED:
                    p_op = gl.convert_layout(p.to(dtype), p_layout)
            # Every S of the tile is computed: the next tile's Q may load while the last P V runs.
            mbarrier.arrive(q_empty, count=1)
            c = it + n_blocks - 1
            last = c % STAGES
            if VARLEN:
                valid = seq_k - (n_blocks - 1) * BLOCK_N
                if valid < BLOCK_N:
                    mbarrier.wait(v_ready.index(last), (c // STAGES) & 1)
                    _clear_rows(v_smem.index(last), valid, BLOCK_N, HEAD_DIM)
            _my_turn(turn, turns + n_blocks, WG)
            if not P16_CARRIED:
                p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            mbarrier.wait(v_ready.index(last), (c // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
            _pass_turn(turn, WG, CONSUMERS)
            acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
            mbarrier.arrive(v_empty.index(last), count=1)
            turns += n_blocks + 1
        else:
            mbarrier.arrive(q_empty, count=1)

        seen = l_i != 0.0                       # l == 0: no key; a NaN l reaches O and the LSE
        l_safe = gl.where(seen, l_i, 1.0)
        acc = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout)), 1)
        lse = gl.where(seen, (m_i + gl.log2(l_safe)) * LN2, float("inf"))        # [ROWS]
        q_start = 0
        if VARLEN:
            q_start = _taken(next_tile, tc, 1)
            seq_q = _taken(next_tile, tc, 2)
        o_ptrs = (O + off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh
                  + (q_start + row0).to(gl.int64) * stride_om
                  + gl.expand_dims(o_rows * stride_om, 1) + gl.expand_dims(o_cols, 0))   # [ROWS, HEAD_DIM]
        gl.store(o_ptrs, acc.to(dtype), mask=gl.expand_dims(o_rows < seq_q - row0, 1))
        if VARLEN:
            lse_ptrs = LSE + off_h.to(gl.int64) * lse_rows + (q_start + row0) + rows
        else:
            lse_ptrs = LSE + (off_b.to(gl.int64) * nheads + off_h) * seqlen_q + row0 + rows
        gl.store(lse_ptrs, lse, mask=rows < seq_q - row0)
        it += n_blocks
        tc += 1
        if VARLEN:
            mbarrier.wait(q_bar, tc & 1)
            t = _taken(next_tile, tc, 0)
        elif PERSISTENT:
            mbarrier.wait(q_bar, tc & 1)
            t = gl.max(next_tile.load(gl.BlockedLayout([1], [32], [4], [0])), axis=0)
        else:
            t += gl.num_programs(0)


@gluon.jit
def _attn_fwd_sm90(Q, K, V, O, LSE, COUNTER,
                   stride_qb, stride_qm, stride_qh,
                   stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh,
                   stride_ob, stride_om, stride_oh,
                   batch, seqlen_q, seqlen_k, nheads, group_size, qk_scale,
                   HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, PERSISTENT: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
                   # Packed sequences (the module docstring): None, and unused, without VARLEN.
                   CU_SEQLENS_Q=None, CU_SEQLENS_K=None, max_seqlen_q=None, VARLEN: gl.constexpr = False):
    """O and the LSE, BLOCK_M = CONSUMERS * ROWS query rows of one head a tile: one program per tile,
    or PERSISTENT: one per SM, program p taking tile p and then the next untaken one (COUNTER, an int32
    that is 0 at launch and again at the end). The first consumer warp group is the kernel's own warps
    (num_warps=4), the other consumers and the producer warp are workers (CONSUMER_REGS registers a
    thread for each consumer, PRODUCER_REGS for the producer)."""
    gl.static_assert(num_warps == 4, "each consumer is one warp group")
    dtype: gl.constexpr = Q.dtype.element_ty
    n_m = gl.cdiv(max_seqlen_q if VARLEN else seqlen_q, CONSUMERS * ROWS)
    n_tiles = n_m * nheads * batch
    lse_rows = 0                    # unused without VARLEN
    if VARLEN:
        lse_rows = seqlen_q
    gl.static_assert(PERSISTENT or not VARLEN, "packed sequences run persistent")

    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, ROWS, HEAD_DIM],
                                       gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype))
    k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    # The next tile's index (persistent), with its sequence's offsets and lengths (VARLEN, _hand_over).
    if VARLEN:
        next_tile = gl.allocate_shared_memory(gl.int32, [2, 8], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    else:
        next_tile = gl.allocate_shared_memory(gl.int32, [1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    mbarrier.init(q_bar, count=1)
    mbarrier.init(q_empty, count=CONSUMERS)             # free once every consumer is done with it
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()

    # (Gluon keeps constexprs only in argument tuples written out in the call: each entry is spelled out.)
    if CONSUMERS == 3:
        gl.warp_specialize([
            (_consumer, (O, LSE, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn,
                         next_tile, stride_ob, stride_om, stride_oh, nheads, group_size, seqlen_q, seqlen_k, n_m,
                         n_tiles, qk_scale, lse_rows, 0, HEAD_DIM, ROWS, CONSUMERS, BLOCK_N, STAGES, IS_CAUSAL,
                         PERSISTENT, VARLEN)),
            (_consumer, (O, LSE, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn,
                         next_tile, stride_ob, stride_om, stride_oh, nheads, group_size, seqlen_q, seqlen_k, n_m,
                         n_tiles, qk_scale, lse_rows, 1, HEAD_DIM, ROWS, CONSUMERS, BLOCK_N, STAGES, IS_CAUSAL,
                         PERSISTENT, VARLEN)),
            (_consumer, (O, LSE, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn,
                         next_tile, stride_ob, stride_om, stride_oh, nheads, group_size, seqlen_q, seqlen_k, n_m,
                         n_tiles, qk_scale, lse_rows, 2, HEAD_DIM, ROWS, CONSUMERS, BLOCK_N, STAGES, IS_CAUSAL,
                         PERSISTENT, VARLEN)),
            (_producer, (Q, K, V, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty,
                         next_tile, COUNTER, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                         stride_vb, stride_vn, stride_vh, batch, nheads, group_size, seqlen_q, seqlen_k, n_m, n_tiles,
                         CU_SEQLENS_Q, CU_SEQLENS_K, HEAD_DIM, ROWS, CONSUMERS, BLOCK_N, STAGES, IS_CAUSAL,
                         PERSISTENT, VARLEN)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (O, LSE, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn,
                         next_tile, stride_ob, stride_om, stride_oh, nheads, group_size, seqlen_q, seqlen_k, n_m,
                         n_tiles, qk_scale, lse_rows, 0, HEAD_DIM, ROWS, CONSUMERS, BLOCK_N, STAGES, IS_CAUSAL,
                         PERSISTENT, VARLEN)),
            (_consumer, (O, LSE, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty, turn,
                         next_tile, stride_ob, stride_om, stride_oh, nheads, group_size, seqlen_q, seqlen_k, n_m,
                         n_tiles, qk_scale, lse_rows, 1, HEAD_DIM, ROWS, CONSUMERS, BLOCK_N, STAGES, IS_CAUSAL,
                         PERSISTENT, VARLEN)),
            (_producer, (Q, K, V, q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty,
                         next_tile, COUNTER, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                         stride_vb, stride_vn, stride_vh, batch, nheads, group_size, seqlen_q, seqlen_k, n_m, n_tiles,
                         CU_SEQLENS_Q, CU_SEQLENS_K, HEAD_DIM, ROWS, CONSUMERS, BLOCK_N, STAGES, IS_CAUSAL,
                         PERSISTENT, VARLEN)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


_launch_fwd_sm90 = Launcher(_attn_fwd_sm90, scratch=True)


def build_constexprs(head_dim: int, causal: bool) -> dict:
    """The kernel's constexprs for a head dim, causal or not (also what tests/ops/sm90_compile.py
    compiles)."""
    consumers = CONSUMERS[head_dim]
    return dict(HEAD_DIM=head_dim, ROWS=ROWS, CONSUMERS=consumers, BLOCK_N=BLOCK_N[head_dim],
                STAGES=STAGES[head_dim, causal], IS_CAUSAL=causal, CONSUMER_REGS=CONSUMER_REGS[consumers])


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
            cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
            max_seqlen_q: int = 0, max_seqlen_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """O (B, Sq, H, D) and lse (B, H, Sq) float32 of a call that choice.kernel_for gives this kernel;
    with cu_seqlens_q/k, of packed sequences (q (1, total_q, H, D), flashattn/ops/variant.py)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    o = plan.empty(q.shape, q.dtype, q.device)
    lse = plan.empty((batch, nheads, seqlen_q), torch.float32, q.device)
    varlen = {}
    rows, seqlen = seqlen_q, max(seqlen_q, seqlen_k)
    if cu_seqlens_q is not None:
        varlen = dict(CU_SEQLENS_Q=cu_seqlens_q, CU_SEQLENS_K=cu_seqlens_k, max_seqlen_q=max_seqlen_q, VARLEN=True)
        batch, rows, seqlen = cu_seqlens_q.numel() - 1, max_seqlen_q, max(max_seqlen_q, max_seqlen_k)
    n_tiles = cdiv(rows, BLOCK_M[head_dim]) * nheads * batch
    # Packed sequences always run persistent (the module docstring; benchmarks/TUNING.md, varlen-forward).
    persistent = cu_seqlens_q is not None or configs.ping_pong_persistent(head_dim, causal, seqlen, q.device)
    grid = min(n_tiles, configs.sm_resources(q.device)[0]) if persistent else n_tiles
    counter = _tile_counter(q.device) if persistent else lse
    # Packed tensors keep their own batch strides: each sequence is their one batch entry.
    _launch_fwd_sm90((grid, 1, 1), q, k, v, o, lse, counter,
                     *strides(q), *strides(k), *strides(v), *strides(o),
                     batch, seqlen_q, seqlen_k, nheads, nheads // nheads_k, softmax_scale * LOG2E.value,
                     **build_constexprs(head_dim, causal), PERSISTENT=persistent, num_warps=NUM_WARPS, num_stages=1,
                     **varlen)
    return o, lse


tile_counters: dict[tuple[int, int], torch.Tensor] = {}


def _tile_counter(device: torch.device) -> torch.Tensor:
    """The persistent grid's tile counter: an int32 that is 0 between launches (the launch's last fetch
    resets it), so one is kept per (device, stream) (launches on two streams may overlap) and no call
    pays a fill launch. While a CUDA graph is captured a fresh one: the graph owns its memory."""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, dtype=torch.int32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    counter = tile_counters.get(key)
    if counter is None:
        counter = tile_counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter
