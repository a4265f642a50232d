"""The zigzag layout of a sequence over the ranks of a ring, and which blocks of work each step holds.

Pure geometry, no communication: what shard_sequence cuts, and, for each ring step, the (query rows,
key rows, window) calls that together compute exactly the single-device attention of the rank's
queries against the keys it holds at that step.

Layout. The sequence (dense: the S positions of dim 1; packed: the total tokens) is cut into 2W
chunks by torch.tensor_split (the first total % 2W chunks one token longer), and rank r holds chunks
r and 2W - 1 - r, in that order. With causal attention chunk c's queries see c + 1 chunks, so each
rank's pair sees 2W + 1 chunks in all: every rank does the same work (no rank idles while the
last waits), which the contiguous layout would not give.

Blocks. Query chunk (global start qs, a rows) against key chunk (global start ks, c keys): with
d = qs - ks, query i (chunk-local) may see key j iff

    d - window_left <= j - i <= d + window_right      (a bound of -1 absent; causal: right = 0)

(variant.py's band with the global positions qs + i, ks + j and offset 0: ring attention is
self-attention, Sq = Sk). The kernels align a window to the bottom-right corner of the block they are
given (offset o = keys - rows), so each block is trimmed to the rows and keys that see something, and
the trimmed block's window is chosen so its band is the same set of (i, j): see _block. Trimmed rows
see no key in that block (O = 0 and lse = +inf, which the merge ignores); trimmed keys get no
gradient from it. Bounds that do not cut the trimmed block become -1 (unbounded), so a block wholly
inside the band is a plain call (the fast kernels).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def chunk_bounds(total: int, world_size: int) -> list[tuple[int, int]]:
    """The 2W chunks [start, end) of `total` positions, as torch.tensor_split cuts them."""
    n = 2 * world_size
    base, extra = divmod(total, n)
    bounds, start = [], 0
    for c in range(n):
        end = start + base + (c < extra)
        bounds.append((start, end))
        start = end
    return bounds


def rank_chunks(world_size: int, rank: int) -> tuple[int, int]:
    """The chunks rank `rank` holds, in its local order."""
    return rank, 2 * world_size - 1 - rank


def local_lengths(total: int, world_size: int) -> list[int]:
    """Each rank's local length under the zigzag layout of `total` positions."""
    bounds = chunk_bounds(total, world_size)
    return [sum(bounds[c][1] - bounds[c][0] for c in rank_chunks(world_size, r)) for r in range(world_size)]


def positions(total: int, world_size: int, rank: int) -> list[int]:
    """The global positions of rank `rank`'s local rows, in order (rotary embeddings need them)."""
    bounds = chunk_bounds(total, world_size)
    return [p for c in rank_chunks(world_size, rank) for p in range(*bounds[c])]


@dataclass(frozen=True)
class Segment:
    """One chunk as a rank holds it: global start, length, and its first row in the local tensor."""

    start: int
    length: int
    local: int


def segments(total: int, world_size: int, rank: int) -> tuple[Segment, Segment]:
    bounds = chunk_bounds(total, world_size)
    first, second = (bounds[c] for c in rank_chunks(world_size, rank))
    n_first = first[1] - first[0]
    return Segment(first[0], n_first, 0), Segment(second[0], second[1] - second[0], n_first)


@dataclass(frozen=True)
class Block:
    """One attention call of a ring step: local query rows [q0, q1) against the held key rows
    [k0, k1), with the window (bottom-right aligned, -1 unbounded) that gives those rows exactly the
    keys the global band allows them. cu_seqlens (int32, on the device) and max_seqlen: the packed
    sequences of the block when it is a varlen call (rows and keys then cover the same tokens)."""

    q0: int
    q1: int
    k0: int
    k1: int
    window_left: int = -1
    window_right: int = -1
    cu_seqlens: Tensor | None = None
    max_seqlen: int = 0

    @property
    def full(self) -> bool:
        return self.window_left == -1 and self.window_right == -1 and self.cu_seqlens is None


def _block(qs: int, a: int, ks: int, c: int, window_left: int, window_right: int,
           ) -> tuple[int, int, int, int, int, int] | None:
    """(q0, q1, k0, k1, left', right') chunk-local, or None when no query of the a rows from global
    position qs sees a key of the c keys from ks. With L = d - left and R = d + right (d = qs - ks),
    rows that see something are [max(0, -R), min(a, c - L)) and keys [max(0, L), min(c, a + R)); in the
    trimmed block j' - i' lies in [L', R'] (shifted by k0 - q0), and its offset o' = keys - rows
    satisfies L' <= o' <= R', so left' = o' - L' and right' = R' - o' are valid (>= 0) windows."""
    if a <= 0 or c <= 0:
        return None
    d = qs - ks
    lo = d - window_left if window_left >= 0 else None       # L (None: no bound)
    hi = d + window_right if window_right >= 0 else None     # R
    q0 = max(0, -hi) if hi is not None else 0
    q1 = min(a, c - lo) if lo is not None else a
    k0 = max(0, lo) if lo is not None else 0
    k1 = min(c, a + hi) if hi is not None else c
    if q0 >= q1 or k0 >= k1:
        return None
    rows, keys = q1 - q0, k1 - k0
    o = keys - rows
    left = right = -1
    if lo is not None and lo - k0 + q0 + rows - 1 > 0:       # the left edge cuts some row
        left = o - (lo - k0 + q0)
    if hi is not None and hi - k0 + q0 < keys - 1:          # the right edge cuts some row
        right = hi - k0 + q0 - o
    return q0, q1, k0, k1, left, right


def dense_blocks(q_segments, kv_segments, window_left: int, window_right: int) -> list[Block]:
    """The blocks of every (query chunk, key chunk) pair, in local rows; full blocks merged."""
    blocks = []
    for qseg in q_segments:
        for kseg in kv_segments:
            found = _block(qseg.start, qseg.length, kseg.start, kseg.length, window_left, window_right)
            if found is not None:
                q0, q1, k0, k1, left, right = found
                blocks.append(Block(qseg.local + q0, qseg.local + q1, kseg.local + k0, kseg.local + k1,
                                    left, right))
    return _merge_full(blocks)


def varlen_blocks(q_segments, kv_segments, cu_seqlens: list[int], window_left: int, window_right: int,
                  device: torch.device) -> list[Block]:
    """The blocks of packed sequences (cu_seqlens: the global cumulative lengths). A chunk against
    itself: one varlen call over the chunk's pieces of the sequences, each piece against itself, so
    with offset 0 the user's window applies as it is. Two distinct chunks: only the one sequence that
    contains the later chunk's first token can cross into the other (sequences are disjoint
    intervals), so at most one dense block, of that sequence's two pieces."""
    blocks = []
    for qseg in q_segments:
        for kseg in kv_segments:
            if qseg.start == kseg.start:
                if qseg.length:
                    blocks.append(_own_chunk(qseg, cu_seqlens, device, window_left, window_right))
                continue
            seq = bisect.bisect_right(cu_seqlens, max(qseg.start, kseg.start)) - 1
            if seq >= len(cu_seqlens) - 1:
                continue
            s, e = cu_seqlens[seq], cu_seqlens[seq + 1]
            qa, qb = max(qseg.start, s), min(qseg.start + qseg.length, e)
            ka, kb = max(kseg.start, s), min(kseg.start + kseg.length, e)
            found = _block(qa, qb - qa, ka, kb - ka, window_left, window_right)
            if found is not None:
                q0, q1, k0, k1, left, right = found
                qo, ko = qseg.local + qa - qseg.start, kseg.local + ka - kseg.start
                blocks.append(Block(qo + q0, qo + q1, ko + k0, ko + k1, left, right))
    return _merge_full(blocks)


def _own_chunk(seg: Segment, cu_seqlens: list[int], device, window_left: int, window_right: int) -> Block:
    end = seg.start + seg.length
    first = bisect.bisect_right(cu_seqlens, seg.start) - 1
    last = bisect.bisect_left(cu_seqlens, end)
    cuts = [seg.start] + [x for x in cu_seqlens[first + 1:last] if seg.start < x < end] + [end]
    local = [x - seg.start for x in cuts]
    longest = max(b - a for a, b in zip(local, local[1:]))
    return Block(seg.local, seg.local + seg.length, seg.local, seg.local + seg.length, window_left,
                 window_right, torch.tensor(local, dtype=torch.int32, device=device), longest)


def _merge_full(blocks: list[Block]) -> list[Block]:
    """Full blocks side by side become one call: same rows and adjacent keys, then same keys and
    adjacent rows (the non-causal steps become one call, the causal zigzag steps after the first
    one each)."""
    for same, adjacent in ((("q0", "q1"), ("k0", "k1")), (("k0", "k1"), ("q0", "q1"))):
        merged: list[Block] = []
        for b in blocks:
            prev = merged[-1] if merged else None
            if (prev is not None and prev.full and b.full
                    and all(getattr(prev, f) == getattr(b, f) for f in same)
                    and getattr(prev, adjacent[1]) == getattr(b, adjacent[0])):
                merged[-1] = Block(**{**prev.__dict__, adjacent[1]: getattr(b, adjacent[1])})
            else:
                merged.append(b)
        blocks = merged
    return blocks
