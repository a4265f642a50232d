"""Ring (context-parallel) attention over torch.distributed: exact attention of a sequence split over
the ranks of a process group.

Each rank holds its zigzag slice of Q, K and V (flashattn/distributed/layout.py; shard_sequence cuts
it). The K/V slices travel around the ring, rank r sending to r + 1 and receiving from r - 1, so at
step s rank r holds the K/V of rank r - s; at each step it attends its queries to the held keys in
the blocks layout.py plans, and merges the partial results by their log-sum-exp:

    lse = logsumexp_s(lse_s),   O = sum_s exp(lse_s - lse) O_s

(a block's row that sees no key has lse_s = +inf and O_s = 0: it is read as -inf, weight 0, and a row
that sees no key at all ends with O = 0 and lse = +inf, the dense convention). The backward walks the
ring again: each block's dispatch.backward with the merged O and lse (P = exp(S - lse), the global
probabilities, and delta = rowsum(dO * O) - dlse, the global delta) gives that block's exact share
of dQ, dK and dV, which add up; dQ stays on the rank, and each K/V slice's dK/dV accumulator travels
one step behind the K/V, arriving back at its owner after the last step.

Overlap: the next step's exchange is posted (isend/irecv, batched) before the current step's blocks
are computed, and waited on only after them. With NCCL the transfers run on the process group's own
CUDA streams, which wait for the current stream's work queued before the post (the K/V being sent),
not for the compute queued after it; Work.wait() then makes the current stream wait for the transfer.
With gloo the sends and receives run on its own threads. The dK/dV accumulator of step s travels
during step s + 1's compute (each step computes its share into a fresh buffer and adds the incoming
accumulator after).
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from flashattn.distributed import layout
from flashattn.interface import _autocast, _check_tensor, _is_int, _validate
from flashattn.ops import dispatch, philox
from flashattn.varlen import _check_cu_seqlens

Tensor = torch.Tensor
_KV_TAG, _DKV_TAG = 1, 2


def shard_sequence(x: Tensor, world_size: int, rank: int, dim: int = 1) -> Tensor:
    """Rank `rank`'s slice of `x` along `dim` (the sequence: dim 1 of (batch, seqlen, ...), dim 0 of
    a packed (total, ...) tensor) in the zigzag layout ring_attn_func expects: x cut into 2 *
    world_size chunks by torch.tensor_split, chunks rank and 2 * world_size - 1 - rank concatenated.
    A copy (torch.cat). Any length: the first length % (2 * world_size) chunks are one longer."""
    _check_tensor("x", x)
    if not (_is_int(world_size) and world_size >= 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not (_is_int(rank) and 0 <= rank < world_size):
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if not (_is_int(dim) and -x.dim() <= dim < x.dim()):
        raise ValueError(f"dim must index one of x's {x.dim()} dims, got {dim!r}")
    chunks = x.tensor_split(2 * world_size, dim=dim)
    return torch.cat([chunks[c] for c in layout.rank_chunks(world_size, rank)], dim=dim)


class _Ring:
    """The process group as a ring: rank, size, and the exchange with the neighbours."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size) if group is not None else (
            (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size) if group is not None else (
            (self.rank - 1) % self.size)

    def post(self, send: Tensor, recv: Tensor, tag: int) -> list:
        """Send `send` to the next rank and receive `recv` from the previous one, asynchronously."""
        ops = [dist.P2POp(dist.isend, send, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        return dist.batch_isend_irecv(ops)

    def source(self, step: int) -> int:
        """The rank whose K/V this rank holds at `step`."""
        return (self.rank - step) % self.size


class _Plan:
    """Everything both passes need besides the tensors: the ring, each step's blocks, the options."""

    def __init__(self, ring: _Ring, lengths: list[int], steps: list[list[layout.Block]], call, softcap: float,
                 dropout_p: float, deterministic: bool):
        self.ring, self.lengths, self.steps = ring, lengths, steps
        self.backend, self.softmax_scale = call.backend, call.softmax_scale
        self.softcap, self.dropout_p, self.deterministic = float(softcap), float(dropout_p), deterministic
        self.base_seed = int(philox.draw_seed().item()) if dropout_p > 0.0 else 0

    def seed(self, step: int, index: int) -> Tensor | None:
        """Block `index` of `step`'s dropout seed: a hash of the call's seed (drawn from torch's default
        generator), the rank, the step and the block, so every block of every rank draws its own keep
        mask and the backward regenerates it (see ring_attn_func: dropout)."""
        if self.dropout_p == 0.0:
            return None
        key = f"{self.base_seed}/{self.ring.rank}/{step}/{index}".encode()
        value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % philox.SEED_HIGH
        return torch.tensor(value, dtype=torch.int64)

    def variant(self, q: Tensor, block: layout.Block, step: int, index: int):
        return dispatch.make_variant(
            q.shape[0], q.shape[2], block.window_right == 0, block.window_left, block.window_right,
            self.softcap, None, self.dropout_p, self.seed(step, index), None, None, None, None, None, None, 0,
            self.deterministic, block.cu_seqlens, block.cu_seqlens, block.max_seqlen, block.max_seqlen)


def _kv_shape(kv: Tensor, length: int) -> tuple[int, ...]:
    return (2, kv.shape[1], length, *kv.shape[3:])


def _merge(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor, q0: int, q1: int) -> None:
    """Fold one block's (O, lse) for rows [q0, q1) into the running (acc, lse) (lse -inf: nothing yet)."""
    lse = lse.masked_fill(lse == float("inf"), float("-inf"))      # "no key" weighs nothing
    old = lse_acc[:, :, q0:q1]
    new = torch.logaddexp(old, lse)
    base = new.masked_fill(new == float("-inf"), 0.0)               # rows with nothing yet: both weights 0
    w_old = torch.exp(old - base).transpose(1, 2).unsqueeze(-1)     # (B, rows, H, 1)
    w_new = torch.exp(lse - base).transpose(1, 2).unsqueeze(-1)
    out_acc[:, q0:q1] = out_acc[:, q0:q1] * w_old + out.to(out_acc.dtype) * w_new
    lse_acc[:, :, q0:q1] = new


def ring_forward(q: Tensor, k: Tensor, v: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
    """O (B, S, H, D) in q's dtype and lse (B, H, S) of the rank's queries against the whole sequence."""
    ring = plan.ring
    acc_dtype = dispatch.lse_dtype(q.dtype)
    out_acc = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse_acc = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc_dtype, device=q.device)
    kv = torch.stack((k, v))
    for step, blocks in enumerate(plan.steps):
        pending = None
        if step + 1 < ring.size:
            incoming = kv.new_empty(_kv_shape(kv, plan.lengths[ring.source(step + 1)]))
            pending = ring.post(kv, incoming, _KV_TAG)
        for index, block in enumerate(blocks):
            out, lse = dispatch.forward(q[:, block.q0:block.q1], kv[0, :, block.k0:block.k1],
                                        kv[1, :, block.k0:block.k1], plan.softmax_scale,
                                        plan.variant(q, block, step, index), plan.backend)
            _merge(out_acc, lse_acc, out, lse, block.q0, block.q1)
        if pending is not None:
            for work in pending:
                work.wait()
            kv = incoming
    lse = lse_acc.masked_fill(lse_acc == float("-inf"), float("inf"))
    return out_acc.to(q.dtype), lse.to(dispatch.lse_dtype(q.dtype))


def ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
                  plan: _Plan) -> tuple[Tensor, Tensor, Tensor]:
    ring = plan.ring
    acc_dtype = dispatch.lse_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    kv = torch.stack((k, v))
    dkv, dkv_pending = None, None          # the held K/V's accumulator, and its exchange in flight
    for step, blocks in enumerate(plan.steps):
        kv_pending = None
        if step + 1 < ring.size:
            incoming = kv.new_empty(_kv_shape(kv, plan.lengths[ring.source(step + 1)]))
            kv_pending = ring.post(kv, incoming, _KV_TAG)
        part = torch.zeros(kv.shape, dtype=acc_dtype, device=q.device)
        for index, block in enumerate(blocks):
            rows, keys = slice(block.q0, block.q1), slice(block.k0, block.k1)
            dq_b, dk_b, dv_b, _ = dispatch.backward(
                dout[:, rows], q[:, rows], kv[0, :, keys], kv[1, :, keys], out[:, rows], lse[:, :, rows],
                None if dlse is None else dlse[:, :, rows], plan.softmax_scale,
                plan.variant(q, block, step, index), False, plan.backend)
            dq[:, rows] += dq_b
            part[0, :, keys] += dk_b
            part[1, :, keys] += dv_b
        if dkv_pending is not None:        # the shares of the ranks that held this K/V before
            for work in dkv_pending:
                work.wait()
            part += dkv
        # Pass the accumulator on with its K/V; after the last step it reaches the owner.
        if ring.size > 1:
            dkv = part.new_empty(_kv_shape(part, plan.lengths[ring.source(step + 1)]))
            dkv_pending = ring.post(part, dkv, _DKV_TAG)
        else:
            dkv = part
        if kv_pending is not None:
            for work in kv_pending:
                work.wait()
            kv = incoming
    for work in dkv_pending or ():
        work.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    """Saves Q, K, V, O and lse; the work is ring_forward / ring_backward."""

    @staticmethod
    def forward(ctx, q, k, v, plan):
        out, lse = ring_forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, dlse, ctx.plan)
        return dq, dk, dv, None


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _ring(group, ring_type: type = _Ring) -> _Ring:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring attention needs torch.distributed initialised: call "
                           "torch.distributed.init_process_group (NCCL on GPUs, gloo on CPUs) first, e.g. "
                           "under torchrun")
    return ring_type(group)


def _agree(ring: _Ring, q: Tensor, k: Tensor, fingerprint: tuple[int, ...] = ()) -> list[int]:
    """Exchange the local shapes (one all_gather of a few ints) and check that every rank calls with
    the same batch, heads, head dim, dtype (and packed sequences: `fingerprint`); return each rank's
    local length. Every rank sees the same table, so all of them raise together, none waits forever."""
    if dist.get_backend(ring.group) == "nccl" and q.device.type != "cuda":
        raise ValueError(f"the process group's backend is NCCL, which moves CUDA tensors, but q is on {q.device}: "
                         "move q, k, v to the rank's GPU, or use a gloo group for CPU tensors")
    mine = [q.shape[1], q.shape[0], q.shape[2], k.shape[2], q.shape[3], _DTYPES.index(q.dtype), *fingerprint]
    table = [torch.empty(len(mine), dtype=torch.int64, device=q.device) for _ in range(ring.size)]
    dist.all_gather(table, torch.tensor(mine, dtype=torch.int64, device=q.device), group=ring.group)
    rows = [t.tolist() for t in table]
    for r, row in enumerate(rows):
        if row[1:] != rows[0][1:]:
            raise ValueError(f"ranks 0 and {r} of the group call ring attention differently: (batch, nheads, "
                             f"nheads_k, headdim, dtype, packed sequences) = {tuple(rows[0][1:])} and "
                             f"{tuple(row[1:])}; every rank must pass its slice of the same call")
    lengths = [row[0] for row in rows]
    expected = layout.local_lengths(sum(lengths), ring.size)
    if lengths != expected:
        raise ValueError(f"the ranks hold {lengths} rows of the sequence, but the zigzag layout of "
                         f"{sum(lengths)} rows over {ring.size} ranks gives {expected}: cut each rank's slice "
                         "with flashattn.distributed.shard_sequence(x, world_size, rank)")
    return lengths


def _check_self_attention(q: Tensor, k: Tensor, dim: int) -> None:
    if q.shape[dim] != k.shape[dim]:
        raise ValueError(f"ring attention is self-attention over one sequence: q and k must hold the same "
                         f"positions, got {q.shape[dim]} query rows and {k.shape[dim]} key rows on this rank")


def ring_attn_func(q: Tensor, k: Tensor, v: Tensor, group=None, causal: bool = False,
                   softmax_scale: float | None = None, *, dropout_p: float = 0.0,
                   window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, deterministic: bool = False,
                   return_lse: bool = False):
    """Exact attention of a sequence split over the ranks of `group`: flash_attn_func on the whole
    sequence, each rank computing the rows of its slice.

    Every rank of the group calls it with its own slice, cut by shard_sequence(x, world_size, rank) from
    the full (batch, seqlen, ...) tensors (the zigzag layout: 2 * world_size chunks, rank r holding
    chunks r and 2 * world_size - 1 - r, so causal work is balanced). Positions are the global ones:
    causal and windows apply to the whole sequence as flash_attn_func applies them (seqlen_q =
    seqlen_k, so causal means key position <= query position).

    Args:
        q: (batch, local_seqlen, nheads, headdim); k, v: (batch, local_seqlen, nheads_k, headdim) (MQA/GQA
            as in flash_attn_func), this rank's slice of the sequence.
        group: the torch.distributed process group (None: the default group): NCCL with CUDA tensors, gloo
            with CPU tensors. One small all_gather per call checks that every rank agrees on the shapes.
        causal, softmax_scale, window_size, softcap, deterministic: as in flash_attn_func.
        dropout_p: as in flash_attn_func, but the keep mask is not the single-device one: the kernels
            count dropout's random numbers by block-local indices, so each block of work (rank, ring step,
            block) draws its own mask from a seed hashed from one drawn per call from torch's default
            generator (torch.manual_seed on every rank makes it reproducible). Each probability is still
            kept independently with probability 1 - dropout_p, and the backward regenerates the same mask:
            the gradients are exactly those of the forward that ran. With dropout_p = 0 the results equal
            the single-device ones.
        return_lse: also return the log-sum-exp (batch, nheads, local_seqlen) float32 (float64 for
            float64 inputs), +inf for rows that see no key; differentiable.

    Not taken (no block-local form of them): alibi_slopes and attn_bias (their terms depend on the
    global positions), block_mask.

    Returns:
        out (batch, local_seqlen, nheads, headdim) in q's dtype, or (out, lse). The partial results are
        merged in float32 (float64 for float64), so float16/bfloat16 outputs carry one rounding per ring
        step's block on top of flash_attn_func's.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    out, lse = _dense(q, k, v, group, causal, softmax_scale, dropout_p, window_size, softcap, deterministic)
    return (out, lse) if return_lse else out


def _dense(q: Tensor, k: Tensor, v: Tensor, group, causal: bool, softmax_scale: float | None, dropout_p: float,
           window_size: tuple[int, int], softcap: float, deterministic: bool, ring_type: type = _Ring,
           ) -> tuple[Tensor, Tensor]:
    """ring_attn_func's (out, lse), over a ring of `ring_type` (_Ring; flashattn.bench.ring passes one
    that keeps each rank's own K/V, to time the compute without the exchanges)."""
    q, k, v = _autocast(q, k, v)
    call = _validate(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, None, deterministic,
                     False, None, None)
    _check_self_attention(q, k, 1)
    ring = _ring(group, ring_type)
    lengths = _agree(ring, q, k)
    segs = [layout.segments(sum(lengths), ring.size, r) for r in range(ring.size)]
    steps = [layout.dense_blocks(segs[ring.rank], segs[ring.source(s)], call.window_left, call.window_right)
             for s in range(ring.size)]
    plan = _Plan(ring, lengths, steps, call, softcap, dropout_p, deterministic)
    return _RingAttention.apply(q, k, v, plan)


def ring_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, group=None,
                          causal: bool = False, softmax_scale: float | None = None, *, dropout_p: float = 0.0,
                          window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                          deterministic: bool = False, return_lse: bool = False):
    """ring_attn_func for packed sequences (training with packing): flash_attn_varlen_func over the
    whole packed batch, each rank computing the rows of its slice; sequences may cross rank boundaries.

    Args:
        q: (local_total, nheads, headdim); k, v: (local_total, nheads_k, headdim): this rank's slice of
            the packed tensors, cut by shard_sequence(x, world_size, rank, dim=0).
        cu_seqlens: int32 (batch + 1,), the cumulative lengths of the whole packed batch (the same on
            every rank, on q's device), queries and keys alike (self-attention).
        max_seqlen: the longest sequence of the whole batch.
        group, causal, softmax_scale, dropout_p, window_size, softcap, deterministic, return_lse: as in
            ring_attn_func; causal and windows apply within each sequence.

    Returns:
        out (local_total, nheads, headdim), or (out, lse) with lse (nheads, local_total).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
        if x.dim() != 3:
            raise ValueError(f"{name} must have 3 dims (total_tokens, nheads, headdim), got shape {tuple(x.shape)}")
    _check_self_attention(q, k, 0)
    _check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be an int32 tensor of shape (batch + 1,) with batch >= 1, got dtype "
                         f"{cu_seqlens.dtype} and shape {tuple(cu_seqlens.shape)}")
    n_seq = cu_seqlens.numel() - 1
    q, k, v = _autocast(q, k, v)
    q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    call = _validate(q4, k4, v4, dropout_p, softmax_scale, causal, window_size, softcap, None, deterministic,
                     False, None, None, n_seq=n_seq, max_seqlens=(max_seqlen, max_seqlen) if _is_int(max_seqlen)
                     else None)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    ring = _ring(group)
    values = cu_seqlens.tolist()
    # The packed batch's fingerprint: its number of sequences and the sum of its offsets.
    lengths = _agree(ring, q4, k4, (n_seq, sum(values)))
    _check_cu_seqlens("cu_seqlens", cu_seqlens, sum(lengths), max_seqlen, "max_seqlen", q.device)
    segs = [layout.segments(sum(lengths), ring.size, r) for r in range(ring.size)]
    steps = [layout.varlen_blocks(segs[ring.rank], segs[ring.source(s)], values, call.window_left,
                                  call.window_right, q.device) for s in range(ring.size)]
    plan = _Plan(ring, lengths, steps, call, softcap, dropout_p, deterministic)
    out, lse = _RingAttention.apply(q4, k4, v4, plan)
    return (out[0], lse[0]) if return_lse else out[0]
