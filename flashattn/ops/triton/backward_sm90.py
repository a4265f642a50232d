"""FlashAttention backward for Hopper in Gluon (Triton's explicit-layout dialect): one pass, 5 products.

The portable backward (backward.py) recomputes P twice, once for dK/dV and once for dQ: 7 matrix
products per tile. This kernel computes P once per tile and adds dQ's share into an fp32 buffer, as
FlashAttention-2/3 do, so it costs 5 products: by TMA reduce-adds, whose order varies run to run; or,
with DETERMINISTIC (deterministic=True), by a writer warp of its own (gl.warp_specialize) that makes
the same adds in key-block order, handed on by a semaphore per (batch, head, query block), which is
bit-reproducible. Gluon gives what automatic pipelining in `tl` does not: the products are issued asynchronously (warpgroup_mma) and waited on one
at a time, so the exponentials of P run while dP's product is still in the tensor cores, and the loads
of the next tiles come by TMA into a ring of STAGES buffers, each with its mbarrier.

One program (8 compute warps: two warp groups, each owning half of the rows of dK and dV, or at head
dim 256 half of their columns, and computing S and dP for its BLOCK_N / 2 keys, or with 128-row steps
(head dim 64) for its 64 of the rows and all the keys; with DETERMINISTIC, one more warp that writes dQ)
per (key block, kv head, batch), looping over the query heads of its GQA group and over their query
blocks:
    qk  = Q_i K^T                     [BLOCK_M, BLOCK_N]   (each warp group: its half: _row_split)
    dp  = dO_i V^T                    [BLOCK_M, BLOCK_N]
    p   = exp2(qk * qk_scale - lse_i * log2(e))   (0 at masked or padding queries)
    dV += p^T dO_i                    [BLOCK_N, HEAD_DIM]  (p^T through shared memory)
    ds  = p * (dp - delta_i)
    dK += ds^T Q_i                    [BLOCK_N, HEAD_DIM]  (times softmax_scale at the end)
    dQ_i  = dS K      (dS from shared memory, or with S split by rows from registers)
                      -> added into DQ_ACC (fp32, (B, H, Sq, HEAD_DIM)), scaled and cast to dQ by
                         _dq_convert afterwards
Glossary: lse is the forward's natural-log log-sum-exp (+inf for rows that see no key, and loaded as
+inf past seqlen_q, which makes their pT exactly 0); delta = rowsum(dO * O) - dlse (backward.py's
preprocess), both read one step ahead (their global loads' latency would otherwise stall the
exponentials); offset = seqlen_k - seqlen_q (query i sees key j <= i + offset when causal); `it` counts
the tiles of Q_i / dO_i a program has loaded, which gives each tile its ring slot and mbarrier phase.

VARLEN (packed sequences, common.py): the grid's batch axis runs over the sequences, its key blocks
over the longest; a program whose key block lies past its sequence exits at once. The others move Q,
dO, K, V, dK and dV to the sequence's first rows and make the descriptors end at its last (TMA clips
the loads and the reduce-adds into DQ_ACC at the sequence's end); seqlen_q and seqlen_k arrive as the
totals (lse, delta and DQ_ACC have (H, total_q) rows) and become the sequence's lengths.

Only the plain attention (causal or not, GQA, any lengths, packed sequences) at head dims 64, 128 and
256 in fp16/bf16 on sm_90; choice.kernel_for sends every other call to the portable kernels. Head dim
256 runs 64-key blocks, dQ_i in two head-dim halves and one dO_i slot (SPLIT_DQ, below).
"""
import torch
import triton
import triton.language as tl
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon.language._core import _unwrap_if_constexpr, builtin
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

from flashattn.ops.triton.common import LOG2E, cdiv, packed_sequence, strides
from flashattn.ops.triton import plan
from flashattn.ops.triton.launch import Launcher

DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128, 256)
# Query rows per step, per head dim: at head dim 64 a 64-row step is too little matrix work for the
# exponentials and barriers around it, and 128 rows still fit (229 KB of shared memory; benchmarks/
# TUNING.md, § one-pass-backward).
BLOCK_M = {64: 128, 128: 64, 256: 64}
# Keys per program: two warp groups of 64 keys each at head dims 64 and 128. At 256, dK and dV of 128
# keys would take 256 fp32 registers a thread: 64 keys, dK and dV split between the warp groups by
# head dim (128 registers a thread for both).
BLOCK_N = {64: 128, 128: 128, 256: 64}
# Q_i (and dO_i) tiles in flight. At head dim 256 a Q_i / dO_i pair is 64 KB and two pairs do not fit
# beside K, V and the whole fp32 dQ tile, so (SPLIT_DQ) dQ_i goes out in two head-dim halves through one
# 32 KB buffer and dO_i has a single slot, reloaded as soon as dV's product is done with it: two Q_i
# stages fit (221 KB in all). The deterministic build's writer partition adds whole dQ_i tiles: at 256
# it keeps the whole tile and one Q_i / dO_i pair, loaded once the step before is done with its own.
STAGES = {64: 2, 128: 2, 256: 2}
SPLIT_DQ = {64: False, 128: False, 256: True}
DETERMINISTIC_STAGES = {64: 2, 128: 2, 256: 1}
DQ_STAGES = 1       # dQ_i tiles handed to the writer partition (one fits in shared memory at head dim 128)
# The deterministic writer reads the next query block's semaphore while its add completes, so that a
# hand-on costs the longer of the two rather than both: faster at head dim 256 (one Q_i / dO_i stage,
# the hand-on on the critical path), slower at 64 and 128 (§ one-pass-backward).
POLL_AHEAD = {64: False, 128: False, 256: True}
NUM_WARPS = 8       # the compute partition's; the writer partition adds one warp
WRITER_REGS = gl.constexpr(24)


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """TMA reduce-add of the shared-memory tile `src` into the tensor at `coord` (cp.reduce.async.bulk;
    complete it with tma.store_wait). Gluon in Triton 3.6 builds the op but exposes no function for it."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _load_q_do(q_desc, do_desc, q_smem, do_smem, bars, it, start_m, STAGES: gl.constexpr,
               WITH_DO: gl.constexpr = True):
    """Start the TMA loads of Q_i and dO_i (rows start_m...) into ring slot it % STAGES; of Q_i alone
    unless WITH_DO (SPLIT_DQ: dO_i has a slot of its own, _load_do)."""
    s = it % STAGES
    bar = bars.index(s)
    mbarrier.expect(bar, q_desc.block_type.nbytes + (do_desc.block_type.nbytes if WITH_DO else 0))
    tma.async_copy_global_to_shared(q_desc, [start_m, 0], bar, q_smem.index(s))
    if WITH_DO:
        tma.async_copy_global_to_shared(do_desc, [start_m, 0], bar, do_smem.index(s))


@gluon.jit
def _load_do(do_desc, do_smem, do_bar, start_m):
    """Start the TMA load of dO_i (rows start_m...) into its one slot (SPLIT_DQ)."""
    mbarrier.expect(do_bar, do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(do_desc, [start_m, 0], do_bar, do_smem.index(0))


@gluon.jit
def _query_block(lo, j, n_steps, BLOCK_M: gl.constexpr, REVERSE: gl.constexpr):
    """The first row of step j's query block. REVERSE walks them from the last: with the deterministic
    order, key block k then reaches each query block one step after key block k - 1 does, instead of
    waiting at its first (diagonal) block for key blocks 0..k-1 to get there."""
    if REVERSE:
        return lo + (n_steps - 1 - j) * BLOCK_M
    else:
        return lo + j * BLOCK_M


@gluon.jit
def _head_row(off_b, off_h, nheads, seqlen_q, total_q, q_start, VARLEN: gl.constexpr):
    """The first row of head off_h of batch entry (or, with VARLEN, sequence) off_b in lse, delta and
    DQ_ACC: (B, H, Sq) rows, or with VARLEN (H, total_q) ones."""
    if VARLEN:
        return off_h * total_q + q_start
    else:
        return (off_b * nheads + off_h) * seqlen_q


@gluon.jit
def _semaphores(SEM, off_b, off_h, nheads, seqlen_q, total_q, q_start, BLOCK_M: gl.constexpr, VARLEN: gl.constexpr):
    """The deterministic order's semaphore of query block 0 of (off_b, off_h); block i's is i further.
    SEM holds cdiv(Sq, BLOCK_M) per (batch, head); with VARLEN cdiv(total_q, BLOCK_M) + B per head,
    sequence b's from q_start // BLOCK_M + b on: never into the next sequence's, which start at
    (q_start + Sq) // BLOCK_M + b + 1 >= q_start // BLOCK_M + b + cdiv(Sq, BLOCK_M)."""
    if VARLEN:
        return SEM + off_h * (gl.cdiv(total_q, BLOCK_M) + gl.num_programs(2)) + q_start // BLOCK_M + off_b
    else:
        return SEM + (off_b * nheads + off_h) * gl.cdiv(seqlen_q, BLOCK_M)


@gluon.constexpr_function
def _column_split(cols, num_warps):
    """The layout of an accumulator of `cols` columns split between the two warp groups. For the
    [BLOCK_M, BLOCK_N] tiles S, dP, P, dS of 64-row steps (queries on rows) each warp group computes S
    and dP for its own half of the keys, whose P and dS columns are the rows of dV and dK it owns."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                     instr_shape=[16, cols // (num_warps // 4), 16])


@gluon.constexpr_function
def _splits_by_rows(rows, num_warps):
    """Whether _row_split splits a tile of `rows` rows by rows: 64 rows to each warp group."""
    return rows == 16 * num_warps


@gluon.constexpr_function
def _row_split(rows, cols, num_warps):
    """The layout of an accumulator [rows, cols] (dK, dV [BLOCK_N, HEAD_DIM]; S, dP [BLOCK_M, BLOCK_N];
    dQ_i [BLOCK_M, HEAD_DIM]) split between the warp groups by rows (64 each) when it has 128, else by
    columns (_column_split). By rows each warp group's product is one 64-row wgmma of all the columns:
    split by columns, a 128-row tile is two 64-row products a warp group, each reading its B operand
    from shared memory again, which at head dim 64 (shared memory the busiest pipe) costs time. With
    S split by rows a warp group's dS rows are its dQ_i rows, so dQ_i's A operand stays in registers."""
    if _splits_by_rows(rows, num_warps):
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, cols, 16])
    return _column_split(cols, num_warps)


@gluon.jit
def _lse_delta(LSE, DELTA, start_m, seqlen_q, live, BLOCK_M: gl.constexpr, layout: gl.constexpr):
    """lse * log2(e) and delta of query rows start_m...: +inf and 0 past seqlen_q, and everywhere unless
    `live` (a step past the last: nothing is read)."""
    rows = gl.arange(0, BLOCK_M, layout=layout)
    in_q = (rows < seqlen_q - start_m) & live
    lse_log2 = gl.load(LSE + start_m + rows, mask=in_q, other=float("inf")) * LOG2E
    delta = gl.load(DELTA + start_m + rows, mask=in_q, other=0.0)
    return lse_log2, delta


@gluon.jit
def _add_dq(dq, buffer, dq_desc, start_m, col):
    """Start the TMA reduce-add of dq (its rows start_m..., columns col...) into DQ_ACC through the
    shared-memory `buffer` (the caller waits for the buffer's last reduce before reusing it)."""
    buffer.store(dq)
    fence_async_shared()
    gl.thread_barrier()
    _tma_reduce_add(dq_desc, [start_m, col], buffer)


@gluon.jit
def _bwd_step(dk, dv, lse_log2, delta, k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, dq_smem, bars, do_bar,
              dq_full, dq_empty, q_desc, do_desc, dq_desc, LSE, DELTA, it, j, n_masked, n_steps, lo, start_n, offset,
              seqlen_q, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, DQ_STAGES: gl.constexpr, SPLIT_DQ: gl.constexpr, DQ_WRITER: gl.constexpr,
              IS_CAUSAL: gl.constexpr, num_warps: gl.constexpr):
    """One query block (step j: _query_block) of one query head: the five products; dQ_i is handed to
    the writer partition (DQ_WRITER, which also walks the blocks in reverse), or added by a TMA
    reduce-add at dq_desc, in two head-dim halves through one buffer with SPLIT_DQ (head dim 256, whose
    dO_i then has a slot of its own, reloaded for the next step once dV's product is done with it).
    With IS_CAUSAL the first n_masked blocks get the causal mask. With STAGES 1 the next step's Q and
    dO are loaded once this one is done with its own."""
    gl.static_assert(not (DQ_WRITER and SPLIT_DQ), "the writer partition adds whole dQ_i tiles")
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = _row_split(BLOCK_M, BLOCK_N, num_warps)
    DQ_COLS: gl.constexpr = HEAD_DIM // 2 if SPLIT_DQ else HEAD_DIM
    dq_layout: gl.constexpr = _row_split(BLOCK_M, DQ_COLS, num_warps)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    # S split by rows (128-row steps): a warp group's dS rows are its dQ_i rows.
    DS_IN_REGS: gl.constexpr = _splits_by_rows(BLOCK_M, num_warps) and not SPLIT_DQ
    start_m = _query_block(lo, j, n_steps, BLOCK_M, DQ_WRITER)
    s = it % STAGES
    q_tile = q_smem.index(s)                                                   # [BLOCK_M, HEAD_DIM]
    do_tile = do_smem.index(0 if SPLIT_DQ else s)                              # [BLOCK_M, HEAD_DIM]
    ds_tile = ds_smem.index(it % 2)                                            # [BLOCK_M, BLOCK_N]
    mbarrier.wait(bars.index(s), (it // STAGES) & 1)
    if SPLIT_DQ:
        mbarrier.wait(do_bar, it & 1)

    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    qk = warpgroup_mma(q_tile, k_smem.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dp = warpgroup_mma(do_tile, v_smem.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    rows = gl.arange(0, BLOCK_M, layout=row_layout)
    # The next step's lse and delta, loaded a step ahead: their global loads' latency then lands on no
    # product's critical path.
    next_lse_log2, next_delta = _lse_delta(LSE, DELTA, _query_block(lo, j + 1, n_steps, BLOCK_M, DQ_WRITER),
                                           seqlen_q, j + 1 < n_steps, BLOCK_M, row_layout)

    qk = warpgroup_mma_wait(1, deps=(qk,))
    p = gl.exp2(qk * qk_scale - gl.expand_dims(lse_log2, 1))                    # [BLOCK_M, BLOCK_N]
    if IS_CAUSAL and start_m < lo + n_masked * BLOCK_M:
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        seen = gl.expand_dims(cols, 0) <= gl.expand_dims(rows + (start_m + offset - start_n), 1)
        p = gl.where(seen, p, 0.0)
    # P^T and dS^T are the A operands of dV's and dK's products: through shared memory (registers
    # cannot be transposed), each warp group reading the columns of its keys (with S split by rows,
    # written by both warp groups: hence the CTA-wide barrier).
    p_smem.store(p.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    dv = warpgroup_mma(p_smem.permute((1, 0)), do_tile, dv, is_async=True)

    dp = warpgroup_mma_wait(1, deps=(dp,))
    ds = (p * (dp - gl.expand_dims(delta, 1))).to(dtype)                       # [BLOCK_M, BLOCK_N]
    if DS_IN_REGS:
        # Each warp group holds dS for the rows of dQ_i it computes: dQ_i's product takes it from
        # registers, and starts before dS goes to shared memory for dK's.
        ds_op = gl.convert_layout(ds, gl.DotOperandLayout(operand_index=0, parent=dq_layout, k_width=2))
        dq = warpgroup_mma(ds_op, k_smem, gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=dq_layout),
                           use_acc=False, is_async=True)
    # dS goes to shared memory for dK's product (and, with S split by keys, dQ_i's: dQ_i needs dS
    # over all BLOCK_N keys), part of which the other warp group computed; a ring of two, so that a
    # warp group one step ahead never overwrites what the other still reads.
    ds_tile.store(ds)
    fence_async_shared()
    if not DQ_WRITER:
        tma.store_wait(0)        # the previous step's reduce has read dq_smem
    gl.thread_barrier()
    # Past the barrier both warp groups have finished step it - 1, so its slot may be refilled.
    nxt = j + STAGES - 1
    if STAGES > 1 and nxt < n_steps:
        _load_q_do(q_desc, do_desc, q_smem, do_smem, bars, it + STAGES - 1,
                   _query_block(lo, nxt, n_steps, BLOCK_M, DQ_WRITER), STAGES, not SPLIT_DQ)
    if SPLIT_DQ:
        # dQ_i in two halves of the head dim through one half-size buffer, both products issued with
        # dK's; dO_i is free once both warp groups have waited for dV's product (the first half's
        # barrier), and the next one is loaded into its one slot while the step goes on.
        zero_h = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, layout=dq_layout)
        dq = warpgroup_mma(ds_tile, k_smem.slice(0, DQ_COLS, dim=1), zero_h, use_acc=False, is_async=True)
        dq_hi = warpgroup_mma(ds_tile, k_smem.slice(DQ_COLS, DQ_COLS, dim=1), zero_h, use_acc=False, is_async=True)
        dk = warpgroup_mma(ds_tile.permute((1, 0)), q_tile, dk, is_async=True)
        dq, dv = warpgroup_mma_wait(2, deps=(dq, dv))
        _add_dq(dq, dq_smem.index(0), dq_desc, start_m, 0)
        if j + 1 < n_steps:
            _load_do(do_desc, do_smem, do_bar, _query_block(lo, j + 1, n_steps, BLOCK_M, DQ_WRITER))
        dq_hi = warpgroup_mma_wait(1, deps=(dq_hi,))
        tma.store_wait(0)            # the first half's reduce has read dq_smem
        gl.thread_barrier()
        _add_dq(dq_hi, dq_smem.index(0), dq_desc, start_m, DQ_COLS)
    else:
        if not DS_IN_REGS:
            dq = warpgroup_mma(ds_tile, k_smem, gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=dq_layout),
                               use_acc=False, is_async=True)
        dk = warpgroup_mma(ds_tile.permute((1, 0)), q_tile, dk, is_async=True)
        dq, dv = warpgroup_mma_wait(1, deps=(dq, dv))
        if DQ_WRITER:
            # dQ_i goes to the writer partition through a ring of DQ_STAGES buffers, while dK's product runs.
            d = it % DQ_STAGES
            mbarrier.wait(dq_empty.index(d), ((it // DQ_STAGES) & 1) ^ 1)
            dq_smem.index(d).store(dq)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(dq_full.index(d), count=1)
        else:
            # dQ_i goes into the fp32 buffer by a TMA reduce-add, while dK's product runs: the tensor
            # memory accelerator does the adds in L2, asynchronously; the buffer is rewritten only after
            # the next step's store_wait.
            _add_dq(dq, dq_smem.index(0), dq_desc, start_m, 0)
    dk = warpgroup_mma_wait(0, deps=(dk,))
    if STAGES == 1:
        gl.thread_barrier()          # both warp groups are done with Q_i and dO_i: the slot is free
        if j + 1 < n_steps:
            _load_q_do(q_desc, do_desc, q_smem, do_smem, bars, it + 1,
                       _query_block(lo, j + 1, n_steps, BLOCK_M, DQ_WRITER), STAGES)
    return dk, dv, next_lse_log2, next_delta


@builtin
def _ptx(statement, _semantic=None):
    """One PTX statement for which Gluon 3.6 has no function. (An asm statement with no result does
    not lower in Triton 3.6: it gets a dummy one.)"""
    _semantic.builder.create_inline_asm(f"{_unwrap_if_constexpr(statement)}\n\tmov.u32 $0, 0;", "=r", [],
                                        [gl.int32.to_ir(_semantic.builder)], False, 1)


@gluon.jit
def _dq_writer(dq_smem, dq_full, dq_empty, DQ_ACC, SEM, pid_n, off_b, off_hk, nheads, group_size, seqlen_q,
               total_q, q_start, lo, n_steps, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
               DQ_STAGES: gl.constexpr, POLL_AHEAD: gl.constexpr, VARLEN: gl.constexpr):
    """The writer partition of the deterministic kernel (one warp): adds each dQ_i the compute warps
    hand over into DQ_ACC by a TMA reduce-add, in a fixed order: the key blocks that reach query block
    i (always 0..N_i) add in that order; key block pid_n waits until the block's semaphore says pid_n,
    adds, waits until its add is complete in memory and hands on to pid_n + 1."""
    dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], gl.float32)
    it = 0
    for g in range(group_size):
        off_h = off_hk * group_size + g
        row = _head_row(off_b, off_h, nheads, seqlen_q, total_q, q_start, VARLEN)
        dq_desc = tma.make_tensor_descriptor(DQ_ACC + row * HEAD_DIM, shape=[seqlen_q, HEAD_DIM],
                                             strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM],
                                             layout=dq_layout)
        sem_h = _semaphores(SEM, off_b, off_h, nheads, seqlen_q, total_q, q_start, BLOCK_M, VARLEN)
        turn = pid_n - 1                # no read of step 0's semaphore yet
        for j in range(n_steps):
            start_m = _query_block(lo, j, n_steps, BLOCK_M, True)
            d = it % DQ_STAGES
            mbarrier.wait(dq_full.index(d), (it // DQ_STAGES) & 1)
            sem = sem_h + start_m // BLOCK_M
            while turn != pid_n:
                turn = gl.atomic_add(sem, 0, sem="acquire")
            _ptx("fence.proxy.async.global;")         # the TMA add comes after the acquire
            _tma_reduce_add(dq_desc, [start_m, 0], dq_smem.index(d))
            tma.store_wait(0)
            mbarrier.arrive(dq_empty.index(d), count=1)
            # With POLL_AHEAD the next block's semaphore is read while this add completes: a hand-on
            # then costs the add's completion or the read's round trip, whichever is longer, not both.
            turn = pid_n - 1
            if POLL_AHEAD:
                if j + 1 < n_steps:
                    turn = gl.atomic_add(sem_h + _query_block(lo, j + 1, n_steps, BLOCK_M, True) // BLOCK_M, 0,
                                         sem="acquire")
            # Complete in global memory (store_wait only waits until shared memory is read), and
            # ordered before the release.
            _ptx("cp.async.bulk.wait_group 0;\n\tfence.proxy.async.global;")
            gl.atomic_xchg(sem, pid_n + 1, sem="release")
            it += 1


@gluon.jit
def _bwd_compute(Q, K, V, DO, LSE, DELTA, DQ_ACC, DK, DV, k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, dq_smem,
                 kv_bar, bars, do_bar, dq_full, dq_empty,
                 stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                 stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                 stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                 pid_n, off_b, off_hk, seqlen_q, seqlen_k, nheads, group_size, softmax_scale, qk_scale,
                 lo, n_masked, n_steps, offset, total_q, q_start,
                 HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 DQ_STAGES: gl.constexpr, SPLIT_DQ: gl.constexpr, DQ_WRITER: gl.constexpr, IS_CAUSAL: gl.constexpr,
                 VARLEN: gl.constexpr, num_warps: gl.constexpr):
    """The compute warps (num_warps, the kernel's): load K_j, V_j, then Q_i, dO_i of every step by TMA,
    run the steps and store dK_j, dV_j."""
    gl.static_assert(num_warps == 8, "two warp groups, one per half of the key block")
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_layout: gl.constexpr = _row_split(BLOCK_N, HEAD_DIM, num_warps)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    DQ_COLS: gl.constexpr = HEAD_DIM // 2 if SPLIT_DQ else HEAD_DIM
    dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, DQ_COLS], gl.float32)
    start_n = pid_n * BLOCK_N
    k_desc = tma.make_tensor_descriptor(K + off_b * stride_kb + off_hk * stride_kh, shape=[seqlen_k, HEAD_DIM],
                                        strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=k_layout)
    v_desc = tma.make_tensor_descriptor(V + off_b * stride_vb + off_hk * stride_vh, shape=[seqlen_k, HEAD_DIM],
                                        strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=k_layout)
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [start_n, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [start_n, 0], kv_bar, v_smem)

    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=kv_layout)
    it = 0
    mbarrier.wait(kv_bar, 0)
    for g in range(group_size):
        off_h = off_hk * group_size + g
        q_desc = tma.make_tensor_descriptor(Q + off_b * stride_qb + off_h * stride_qh, shape=[seqlen_q, HEAD_DIM],
                                            strides=[stride_qm, 1], block_shape=[BLOCK_M, HEAD_DIM],
                                            layout=q_layout)
        do_desc = tma.make_tensor_descriptor(DO + off_b * stride_dob + off_h * stride_doh,
                                             shape=[seqlen_q, HEAD_DIM], strides=[stride_dom, 1],
                                             block_shape=[BLOCK_M, HEAD_DIM], layout=q_layout)
        row = _head_row(off_b, off_h, nheads, seqlen_q, total_q, q_start, VARLEN)
        dq_desc = q_desc  # unused with DQ_WRITER
        if not DQ_WRITER:
            dq_desc = tma.make_tensor_descriptor(DQ_ACC + row * HEAD_DIM, shape=[seqlen_q, HEAD_DIM],
                                                 strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, DQ_COLS],
                                                 layout=dq_layout)
        # Every warp group is done with the previous head's tiles before their slots are refilled.
        gl.thread_barrier()
        for p in gl.static_range(max(STAGES - 1, 1)):    # with STAGES 1 each step loads the next
            if p < n_steps:
                _load_q_do(q_desc, do_desc, q_smem, do_smem, bars, it + p,
                           _query_block(lo, p, n_steps, BLOCK_M, DQ_WRITER), STAGES, not SPLIT_DQ)
        if SPLIT_DQ and n_steps > 0:
            _load_do(do_desc, do_smem, do_bar, _query_block(lo, 0, n_steps, BLOCK_M, DQ_WRITER))
        # Step 0's lse and delta; each step loads the next one's (_bwd_step).
        lse_log2, delta = _lse_delta(LSE + row, DELTA + row, _query_block(lo, 0, n_steps, BLOCK_M, DQ_WRITER),
                                     seqlen_q, n_steps > 0, BLOCK_M,
                                     gl.SliceLayout(1, _row_split(BLOCK_M, BLOCK_N, num_warps)))
        for j in range(0, n_steps):
            dk, dv, lse_log2, delta = _bwd_step(
                dk, dv, lse_log2, delta, k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, dq_smem, bars, do_bar,
                dq_full, dq_empty, q_desc, do_desc, dq_desc, LSE + row, DELTA + row, it, j, n_masked, n_steps, lo,
                start_n, offset, seqlen_q, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, DQ_STAGES, SPLIT_DQ,
                DQ_WRITER, IS_CAUSAL, num_warps)
            it += 1

    if not DQ_WRITER:
        tma.store_wait(0)

    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, kv_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
    in_k = gl.expand_dims(rows < seqlen_k - start_n, 1)
    dk_ptrs = (DK + off_b * stride_dkb + off_hk * stride_dkh + start_n.to(gl.int64) * stride_dkn
               + gl.expand_dims(rows * stride_dkn, 1) + gl.expand_dims(cols, 0))
    gl.store(dk_ptrs, (dk * softmax_scale).to(dtype), mask=in_k)
    dv_ptrs = (DV + off_b * stride_dvb + off_hk * stride_dvh + start_n.to(gl.int64) * stride_dvn
               + gl.expand_dims(rows * stride_dvn, 1) + gl.expand_dims(cols, 0))
    gl.store(dv_ptrs, dv.to(dtype), mask=in_k)


@gluon.jit
def _attn_bwd_sm90(Q, K, V, DO, LSE, DELTA, DQ_ACC, SEM, DK, DV,
                   stride_qb, stride_qm, stride_qh,
                   stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh,
                   stride_dob, stride_dom, stride_doh,
                   stride_dkb, stride_dkn, stride_dkh,
                   stride_dvb, stride_dvn, stride_dvh,
                   seqlen_q, seqlen_k, nheads, group_size, softmax_scale, qk_scale,
                   HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   IS_CAUSAL: gl.constexpr, STAGES: gl.constexpr, DQ_STAGES: gl.constexpr,
                   SPLIT_DQ: gl.constexpr, DETERMINISTIC: gl.constexpr, POLL_AHEAD: gl.constexpr,
                   num_warps: gl.constexpr,
                   # Packed sequences (the module docstring): None, and unused, without VARLEN.
                   CU_SEQLENS_Q=None, CU_SEQLENS_K=None, VARLEN: gl.constexpr = False):
    """dK, dV of one key block of one kv head, and dQ's share of every query head of its group: 8
    compute warps (num_warps=8) and, with DETERMINISTIC, a dQ writer warp. With DETERMINISTIC the grid
    is (kv heads, key blocks, batch), so that the programs running at once are spread over heads
    rather than queued on one head's semaphores; else (key blocks, kv heads, batch)."""
    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
    DQ_COLS: gl.constexpr = HEAD_DIM // 2 if SPLIT_DQ else HEAD_DIM
    dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, DQ_COLS], gl.float32)
    if DETERMINISTIC:
        pid_n = gl.program_id(1)
        off_hk = gl.program_id(0).to(gl.int64)
    else:
        pid_n = gl.program_id(0)
        off_hk = gl.program_id(1).to(gl.int64)
    off_b = gl.program_id(2).to(gl.int64)
    start_n = pid_n * BLOCK_N
    total_q = 0                     # both unused without VARLEN
    q_start = 0
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

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
    do_smem = gl.allocate_shared_memory(dtype, [1 if SPLIT_DQ else STAGES, BLOCK_M, HEAD_DIM], q_layout)
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], p_layout)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N], p_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [DQ_STAGES, BLOCK_M, DQ_COLS], dq_layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())     # SPLIT_DQ's dO slot
    dq_full = gl.allocate_shared_memory(gl.int64, [DQ_STAGES, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [DQ_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    mbarrier.init(do_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(DQ_STAGES):
        mbarrier.init(dq_full.index(i), count=1)
        mbarrier.init(dq_empty.index(i), count=1)
    fence_async_shared()

    # Query rows [lo, full_lo) see part of the key block (causal diagonal), rows [full_lo, seqlen_q) all.
    offset = seqlen_k - seqlen_q
    if IS_CAUSAL:
        lo = gl.minimum(gl.maximum(start_n - offset, 0), seqlen_q) // BLOCK_M * BLOCK_M
        full_lo = gl.minimum(gl.cdiv(gl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M,
                             seqlen_q)
        full_lo = gl.maximum(full_lo, lo)
    else:
        lo = 0
        full_lo = 0
    n_masked = gl.cdiv(full_lo - lo, BLOCK_M)
    n_steps = gl.cdiv(seqlen_q - lo, BLOCK_M)

    if DETERMINISTIC:
        # The ordered adds wait on other programs: a writer warp of their own keeps that off the
        # compute warps (which then have 240 registers instead of 255: the plain kernel is faster
        # without it).
        gl.warp_specialize([
            (_bwd_compute, (Q, K, V, DO, LSE, DELTA, DQ_ACC, DK, DV, k_smem, v_smem, q_smem, do_smem, p_smem,
                            ds_smem, dq_smem, kv_bar, bars, do_bar, dq_full, dq_empty,
                            stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                            stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                            stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                            pid_n, off_b, off_hk, seqlen_q, seqlen_k, nheads, group_size, softmax_scale,
                            qk_scale, lo, n_masked, n_steps, offset, total_q, q_start, HEAD_DIM, BLOCK_M,
                            BLOCK_N, STAGES, DQ_STAGES, False, True, IS_CAUSAL, VARLEN, num_warps)),
            (_dq_writer, (dq_smem, dq_full, dq_empty, DQ_ACC, SEM, pid_n, off_b, off_hk, nheads, group_size,
                          seqlen_q, total_q, q_start, lo, n_steps, BLOCK_M, HEAD_DIM, DQ_STAGES, POLL_AHEAD,
                          VARLEN)),
        ], [1], [WRITER_REGS])
    else:
        # The same arguments as above, spelled out: a tuple unpacked into a call (`*args`) loses
        # its constexprs in Triton 3.6, which gl.warp_specialize keeps.
        _bwd_compute(Q, K, V, DO, LSE, DELTA, DQ_ACC, DK, DV, k_smem, v_smem, q_smem, do_smem, p_smem,
                     ds_smem, dq_smem, kv_bar, bars, do_bar, dq_full, dq_empty,
                     stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                     stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                     stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                     pid_n, off_b, off_hk, seqlen_q, seqlen_k, nheads, group_size, softmax_scale,
                     qk_scale, lo, n_masked, n_steps, offset, total_q, q_start, HEAD_DIM, BLOCK_M, BLOCK_N,
                     STAGES, DQ_STAGES, SPLIT_DQ, False, IS_CAUSAL, VARLEN, num_warps)


_launch_bwd_sm90 = Launcher(_attn_bwd_sm90, scratch=True)


@triton.jit
def _dq_convert(DQ_ACC, DQ, stride_dqb, stride_dqm, stride_dqh, seqlen_q, nheads, softmax_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """dQ = softmax_scale * DQ_ACC in dQ's dtype and layout, one program per (query block, head, batch)."""
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    tile_rows = tl.arange(0, BLOCK_M)
    rows = start_m + tile_rows
    cols = tl.arange(0, HEAD_DIM)
    acc = tl.load(DQ_ACC + ((off_b * nheads + off_h) * seqlen_q + rows[:, None]) * HEAD_DIM + cols[None, :],
                  mask=rows[:, None] < seqlen_q)
    # The block's first row as a 64-bit base (dQ may pass 2^31 elements), its rows' offsets 32-bit.
    dq_ptrs = (DQ + off_b * stride_dqb + off_h * stride_dqh + start_m.to(tl.int64) * stride_dqm
               + tile_rows[:, None] * stride_dqm + cols[None, :])
    tl.store(dq_ptrs, (acc * softmax_scale).to(DQ.dtype.element_ty), mask=rows[:, None] < seqlen_q)


_launch_dq_convert = Launcher(_dq_convert)
CONVERT_ROWS = 64


def dq_buffer(q: torch.Tensor) -> torch.Tensor:
    """The fp32 dQ accumulator, (B, H, Sq, head dim), uninitialised (backward.py's preprocess zeroes it)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    return plan.empty((batch, nheads, seqlen_q, head_dim), torch.float32, q.device)


def build_constexprs(head_dim: int, deterministic: bool) -> dict:
    """The kernel's tile constexprs for a head dim and build (also what tests compile for sm_90)."""
    return dict(HEAD_DIM=head_dim, BLOCK_M=BLOCK_M[head_dim], BLOCK_N=BLOCK_N[head_dim],
                STAGES=(DETERMINISTIC_STAGES if deterministic else STAGES)[head_dim], DQ_STAGES=DQ_STAGES,
                SPLIT_DQ=SPLIT_DQ[head_dim] and not deterministic, DETERMINISTIC=deterministic,
                POLL_AHEAD=POLL_AHEAD[head_dim] and deterministic)


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
             delta: torch.Tensor, dq_acc: torch.Tensor, softmax_scale: float, causal: bool,
             deterministic: bool = False, cu_seqlens_q: torch.Tensor | None = None,
             cu_seqlens_k: torch.Tensor | None = None, max_seqlen_k: int = 0,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of a call that choice.kernel_for gives this kernel, from lse and the preprocess's
    delta (both (B, H, Sq) fp32), with dq_acc (dq_buffer) zeroed. `deterministic` orders the adds into
    dq_acc (bit-identical results run to run) by a semaphore per (batch, head, query block). With
    cu_seqlens_q/k, of packed sequences (q (1, total_q, H, D), flashattn/ops/variant.py; max_seqlen_k
    the longest key sequence)."""
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    build = build_constexprs(head_dim, deterministic)
    block_m, block_n = build["BLOCK_M"], build["BLOCK_N"]
    packed = cu_seqlens_q is not None
    n_seq, n_kv, varlen = batch, cdiv(seqlen_k, block_n), {}
    sem_shape = (batch, nheads, cdiv(seqlen_q, block_m))
    if packed:
        n_seq, n_kv = cu_seqlens_q.numel() - 1, cdiv(max_seqlen_k, block_n)
        varlen = dict(CU_SEQLENS_Q=cu_seqlens_q, CU_SEQLENS_K=cu_seqlens_k, VARLEN=True)
        sem_shape = (nheads, cdiv(seqlen_q, block_m) + n_seq)            # _semaphores
    sem = torch.zeros(sem_shape, dtype=torch.int32, device=q.device) if deterministic else dq_acc
    dk = plan.empty(k.shape, k.dtype, k.device)
    dv = plan.empty(v.shape, v.dtype, v.device)
    _launch_bwd_sm90((nheads_k, n_kv, n_seq) if deterministic else (n_kv, nheads_k, n_seq),
                     q, k, v, dout, lse, delta, dq_acc, sem, dk, dv,
                     *strides(q, packed), *strides(k, packed), *strides(v, packed), *strides(dout, packed),
                     *strides(dk, packed), *strides(dv, packed),
                     seqlen_q, seqlen_k, nheads, nheads // nheads_k, softmax_scale, softmax_scale * LOG2E.value,
                     IS_CAUSAL=causal, num_warps=NUM_WARPS, num_stages=1, **build, **varlen)
    # dq_acc has dq's rows (packed: all sequences in the one batch entry): converted as one dense tensor.
    dq = plan.empty(q.shape, q.dtype, q.device)
    _launch_dq_convert((cdiv(seqlen_q, CONVERT_ROWS), nheads, batch), dq_acc, dq, *strides(dq),
                       seqlen_q, nheads, softmax_scale, HEAD_DIM=head_dim, BLOCK_M=CONVERT_ROWS,
                       num_warps=4, num_stages=1)
    return dq, dk, dv
