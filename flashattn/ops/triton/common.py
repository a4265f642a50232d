"""Pieces shared by the forward and backward kernels: which key blocks a query block visits, the mask
of one tile, and the loads of one tile.

Glossary (see flashattn/ops/reference.py for the algorithm):
    offset      seqlen_k - seqlen_q; query row i sees key j <= i + offset when causal
    full_hi     keys [0, full_hi) are in bounds and visible to every row of the query block: those
                tiles run without any mask
    hi          one past the last key any row of the block may see; tiles in [full_hi, hi) are masked
    *_LOG2      log-sum-exp and scale in base 2, so that every exponential is one exp2
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def strides(t) -> tuple[int, int, int]:
    """Batch, sequence and head strides of a (B, S, H, D) tensor whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


@triton.jit
def key_block_bounds(start_m, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     IS_CAUSAL: tl.constexpr):
    """(full_hi, hi) for the query rows [start_m, start_m + BLOCK_M)."""
    if IS_CAUSAL:
        offset = seqlen_k - seqlen_q
        # The first row of the block sees keys [0, start_m + offset + 1).
        full_hi = tl.minimum(tl.maximum(start_m + offset + 1, 0), seqlen_k)
        full_hi = full_hi // BLOCK_N * BLOCK_N
        last_row = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
        hi = tl.minimum(tl.maximum(last_row + offset + 1, 0), seqlen_k)
    else:
        full_hi = seqlen_k // BLOCK_N * BLOCK_N
        hi = seqlen_k
    return full_hi, hi


@triton.jit
def query_block_bounds(start_n, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       IS_CAUSAL: tl.constexpr):
    """(lo, full_lo, full_hi) over query rows for the keys [start_n, start_n + BLOCK_N).

    Rows [lo, full_lo) need the mask (causal diagonal), rows [full_lo, full_hi) see every key of the
    block and are in bounds, rows [max(full_lo, full_hi), seqlen_q) are the masked tail. All three are
    multiples of BLOCK_M except at seqlen_q.
    """
    full_hi = seqlen_q // BLOCK_M * BLOCK_M
    if IS_CAUSAL:
        offset = seqlen_k - seqlen_q
        # Row start_n - offset is the first to see key start_n; row start_n + BLOCK_N - 1 - offset
        # the first to see the whole block.
        lo = tl.minimum(tl.maximum(start_n - offset, 0), seqlen_q) // BLOCK_M * BLOCK_M
        full_lo = tl.maximum(start_n + BLOCK_N - 1 - offset, 0)
        full_lo = tl.minimum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, seqlen_q)
    else:
        lo = 0
        full_lo = 0
    return lo, full_lo, full_hi


@triton.jit
def tile_mask(offs_m, offs_n, seqlen_q, seqlen_k, IS_CAUSAL: tl.constexpr):
    """True where query offs_m[i] may see key offs_n[j] and both are in bounds. [BLOCK_M, BLOCK_N]"""
    valid = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    if IS_CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (seqlen_k - seqlen_q))
    return valid


@triton.jit
def load_tile(ptrs, offs_rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              CHECK_ROWS: tl.constexpr):
    """Load one [rows, BLOCK_D] tile, zero-filled past n_rows and past HEAD_DIM."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=offs_rows[:, None] < n_rows, other=0.0)
        return tl.load(ptrs, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def store_tile(ptrs, value, offs_rows, n_rows, offs_d, HEAD_DIM: tl.constexpr):
    tl.store(ptrs, value, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))
