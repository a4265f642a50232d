"""Pieces shared by the forward and backward kernels: which tiles a block visits, the mask and the
scores of one tile with every option, the dropout keep mask, and the loads of one tile.

Glossary (see flashattn/ops/reference.py for the algorithm, flashattn/ops/variant.py for the options):
    offset      seqlen_k - seqlen_q; query row i sees key j <= i + offset when causal
    full_hi     keys [0, full_hi) are in bounds and visible to every row of the query block: those
                tiles run without any mask
    hi          one past the last key any row of the block may see; tiles in [full_hi, hi) are masked
    lo, full_lo with a window (or a block mask), the band also has a left edge: tiles [lo, full_lo)
                are masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked (key_tiles, query_tiles)
    i, j        query and key indices of a tile, broadcast against it: [BLOCK_M, 1] and [1, BLOCK_N],
                or [1, BLOCK_M] and [BLOCK_N, 1] for the backward's transposed tiles
    *_LOG2      log-sum-exp and scale in base 2, so that every exponential is one exp2

The options are tl.constexpr flags that default to off; with every flag off the kernels compile to the
plain code (the option branches below are never generated):
    HAS_WINDOW   window_left / window_right bound the band (causal folded in: right = 0); an unbounded
                 side is passed as seqlen_q + seqlen_k, so one formula serves every window
    SOFTCAP      x = softcap * tanh(x / softcap), from softcap_scale = softmax_scale / softcap and
                 softcap_log2 = softcap * log2(e)
    HAS_ALIBI    x -= slope * |i + offset - j|, slope_log2 = slope * log2(e) of the program's (b, h)
    BIAS_KIND    0: none, 1: float bias added to x, 2: bool mask (read as uint8; 0 = masked)
    DROPOUT      keep P_ij iff uniform(Philox(seed, j // 4, i, b * H + h)[j % 4]) >= dropout_p (philox.py)
    BLOCK_SPARSE the tiles walked are those of the listed blocks (SPARSE_BLOCK rows/columns each,
                 cut into tiles that divide it), found by sparse_tiles_before
    WIDE         an element's offset from its (batch, head, sequence) base, row index x row stride,
                 may pass 2^31 (wide(), on the host): the portable kernels multiply row indices by
                 the row stride in 64 bits (ROW_T); off, in 32 bits, the code they were tuned with.
                 Not a 64-bit base per tile with 32-bit offsets within it: the compiler hoists those
                 loop-invariant offsets out of the loops, and the registers they hold made the
                 backward spill. Batch, head and sequence bases are 64-bit either way; the Hopper
                 kernels address by TMA descriptors and 64-bit tile bases
    VARLEN       packed sequences (variant.py): the grid's batch axis runs over the sequences of
                 CU_SEQLENS_Q / CU_SEQLENS_K; a program reads its sequence's bounds (packed_sequence),
                 moves its bases to the sequence's first rows (the batch strides are 0) and exits
                 when its block lies past the sequence; seqlen_q / seqlen_k arrive as the totals
                 (the LSE's rows are (H, total_q)) and become the sequence's lengths
"""
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from flashattn.ops.variant import Variant

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def strides(t, packed: bool = False) -> tuple[int, int, int]:
    """Batch, sequence and head strides of a (B, S, H, D) tensor whose last dim is contiguous; with
    packed sequences ((1, total, H, D)) the batch stride is 0: a program's sequence offset does it."""
    return (0, *t.stride()[1:3]) if packed else t.stride()[:3]


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address every (batch, head) of these (B, S, H, D) tensors: a
    16-byte aligned base, batch, sequence and head strides of whole 16 bytes, and rows that are not
    one broadcast row (a sequence stride of 0, which a descriptor's row stride cannot be)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:3]) or t.stride(1) <= 0:
            return False
    return True


def block_d(head_dim: int) -> int:
    """The tiles' width: the head dim rounded up to a power of two, at least 16 (tl.dot's minimum);
    the columns past the head dim are loaded as zeros."""
    return max(16, 1 << (head_dim - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b); triton.cdiv is a jit function, ten times slower to call from the host."""
    return -(-a // b)


def _broadcast_strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides of a tensor whose size-1 dims broadcast: 0 there."""
    return tuple(0 if n == 1 else s for n, s in zip(x.shape, x.stride()))


@dataclass(frozen=True)
class Options:
    """A Variant in the kernels' terms: the keyword arguments of the option parameters and their
    constexpr flags (only those that are on: the kernels' defaults are off), and a short name of the
    enabled flags for configs.run's key."""

    kwargs: dict
    extra: str
    block_size: int        # the block mask's block size (tiles must divide it); 0 without one

    def tiles(self, cfg):
        """The TileConfig `cfg` with tiles that divide the block mask's blocks."""
        if not self.block_size:
            return cfg
        return replace(cfg, block_m=min(cfg.block_m, self.block_size),
                       block_n=min(cfg.block_n, self.block_size))


_PLAIN = Options({}, "", 0)


def _seed_halves(seed: int) -> tuple[int, int]:
    """The low and high 32 bits of the seed, each as a signed int32 (a stable kernel signature)."""
    halves = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    return tuple(h - (1 << 32) if h >= 1 << 31 else h for h in halves)


def options(variant: Variant, q: torch.Tensor, k: torch.Tensor, softmax_scale: float,
            seqlen_k: int | None = None) -> Options:
    """The kernels' option arguments for `variant` (causal is the kernels' own IS_CAUSAL). `seqlen_k`:
    the longest key sequence when k's shape does not say it (a KV cache's capacity per sequence)."""
    if variant.is_plain:
        return _PLAIN
    seqlen_q, seqlen_k = q.shape[1], k.shape[1] if seqlen_k is None else seqlen_k
    kw, names = {}, []
    tensor = variant.bias if variant.bias is not None else variant.mask
    if tensor is not None:
        kind = 1 if variant.bias is not None else 2
        if kind == 2:
            tensor = tensor.view(torch.uint8)
        kw.update(Bias=tensor, BIAS_KIND=kind, **dict(zip(
            ("stride_biasb", "stride_biash", "stride_biasq", "stride_biask"), _broadcast_strides(tensor))))
        names.append("bias" if kind == 1 else "mask")
    if variant.alibi_slopes is not None:
        slopes = variant.alibi_slopes
        kw.update(Alibi=slopes, HAS_ALIBI=True,
                  **dict(zip(("stride_alibib", "stride_alibih"), _broadcast_strides(slopes))))
        names.append("alibi")
    if variant.softcap > 0.0:
        kw.update(softcap_scale=softmax_scale / variant.softcap, softcap_log2=variant.softcap * LOG2E.value,
                  SOFTCAP=True)
        names.append("softcap")
    if not (variant.window_left == -1 and variant.window_right == (0 if variant.causal else -1)):
        # Farther than any key: one formula for every window, and no int32 overflow in the kernels.
        unbounded = seqlen_q + seqlen_k
        left, right = (unbounded if w < 0 else min(w, unbounded) for w in (variant.window_left,
                                                                             variant.window_right))
        kw.update(window_left=left, window_right=right, HAS_WINDOW=True)
        names.append("window")
    if variant.dropout_p > 0.0:
        seed_lo, seed_hi = _seed_halves(variant.seed)
        kw.update(seed_lo=seed_lo, seed_hi=seed_hi, dropout_p=variant.dropout_p, DROPOUT=True)
        names.append("dropout")
    if variant.cu_seqlens_q is not None:
        kw.update(CU_SEQLENS_Q=variant.cu_seqlens_q, CU_SEQLENS_K=variant.cu_seqlens_k, VARLEN=True)
        names.append("varlen")
    block_size = 0
    bm = variant.block_mask
    if bm is not None:
        mb, mh = bm.shape[:2]
        block_size = bm.block_size
        kw.update(KV_NUM=bm.kv_num_blocks.contiguous(), KV_IDX=bm.kv_indices.contiguous(),
                  Q_NUM=bm.q_num_blocks.contiguous(), Q_IDX=bm.q_indices.contiguous(),
                  sparse_stride_b=mh if mb > 1 else 0, sparse_stride_h=1 if mh > 1 else 0,
                  BLOCK_SPARSE=True, SPARSE_BLOCK=block_size)
        names.append(f"sparse{block_size}")
    return Options(kw, "+".join(names), block_size)


@triton.jit
def _sequence(CU_SEQLENS, b):
    start = tl.load(CU_SEQLENS + b)
    return start.to(tl.int64), tl.load(CU_SEQLENS + b + 1) - start


@triton.jit
def packed_sequence(CU_SEQLENS_Q, CU_SEQLENS_K, b):
    """Packed sequence b: its first query row and first key row (int64: the offsets of a large batch
    pass 2^31) and its query and key lengths."""
    q_start, seqlen_q = _sequence(CU_SEQLENS_Q, b)
    k_start, seqlen_k = _sequence(CU_SEQLENS_K, b)
    return q_start, k_start, seqlen_q, seqlen_k


# The most rows of any kernel's tile (configs' tables and their autotuning neighbours); interface.py's
# MAX_TILE_ROWS, the same bound, checks the outputs' rows against it.
MAX_TILE = 256


def wide(rows: int, *tensors: torch.Tensor) -> bool:
    """WIDE for tiles over `rows` rows (a sequence's, the longest of packed ones) of these (B, S, H, D)
    tensors: whether an element offset from a (batch, head) base, up to (rows + a tile) x row stride,
    may pass 2^31. (Bases at a batch entry, a head or a packed sequence are 64-bit either way.)"""
    return (rows + MAX_TILE) * max(t.stride(1) for t in tensors) >= 2 ** 31


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
def _band_tiles(first_lo, last_lo, first_hi, last_hi, n, TILE: tl.constexpr):
    """(lo, full_lo, full_hi, hi) over one axis of length n for a block of the other axis whose first
    element sees [first_lo, first_hi) and whose last element sees [last_lo, last_hi), both edges
    growing along the block: tiles [lo, full_lo) and [full_hi, hi) are masked, [full_lo, full_hi)
    are seen whole by every element and in bounds. lo, full_lo, full_hi are multiples of TILE (or hi)."""
    lo = tl.maximum(first_lo, 0) // TILE * TILE
    hi = tl.maximum(tl.minimum(last_hi, n), lo)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last_lo, 0), TILE) * TILE, lo), hi)
    full_hi = tl.maximum(tl.minimum(first_hi, n), 0) // TILE * TILE
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def key_tiles(start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(lo, full_lo, full_hi, hi) over keys for the query rows [start_m, start_m + BLOCK_M): key tiles
    [lo, full_lo) and [full_hi, hi) need the mask, [full_lo, full_hi) do not. Tiles outside [lo, hi)
    hold no key of the window band (Variant.key_range), so they are never visited."""
    if HAS_WINDOW:
        offset = seqlen_k - seqlen_q
        last_row = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
        # Row i sees keys [i + offset - window_left, i + offset + window_right].
        lo, full_lo, full_hi, hi = _band_tiles(start_m + offset - window_left, last_row + offset - window_left,
                                               start_m + offset + window_right + 1,
                                               last_row + offset + window_right + 1, seqlen_k, BLOCK_N)
    else:
        full_hi, hi = key_block_bounds(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
        lo = 0
        full_lo = 0
    return lo, full_lo, full_hi, hi


@triton.jit
def query_tiles(start_n, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(lo, full_lo, full_hi, hi) over query rows for the keys [start_n, start_n + BLOCK_N), as
    key_tiles does for keys (Variant.query_range), except that [full_lo, full_hi) may be empty with
    full_hi < full_lo (causal): the masked tail then starts at max(full_lo, full_hi)."""
    if HAS_WINDOW:
        offset = seqlen_k - seqlen_q
        last_col = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
        # Key j is seen by rows [j - offset - window_right, j - offset + window_left].
        lo, full_lo, full_hi, hi = _band_tiles(start_n - offset - window_right, last_col - offset - window_right,
                                               start_n - offset + window_left + 1,
                                               last_col - offset + window_left + 1, seqlen_q, BLOCK_M)
    else:
        lo, full_lo, full_hi = query_block_bounds(start_n, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, IS_CAUSAL)
        hi = seqlen_q
    return lo, full_lo, full_hi, hi


@triton.jit
def sparse_tiles_before(IDX, count, x, SPARSE_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """Position of x (a multiple of TILE) in the walk over the listed blocks IDX[0:count] (ascending),
    each cut into SPARSE_BLOCK // TILE tiles: how many of those tiles start before x. Binary search,
    so a bound costs log2(count) scalar loads; the walk itself never visits an unlisted block."""
    block = x // SPARSE_BLOCK
    lo = count * 0
    hi = count
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(IDX + mid) < block:
            lo = mid + 1
        else:
            hi = mid
    pos = lo * (SPARSE_BLOCK // TILE)
    if lo < count:
        if tl.load(IDX + lo) == block:
            pos += (x - block * SPARSE_BLOCK) // TILE
    return pos


@triton.jit
def sparse_tile_start(IDX, it, SPARSE_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """The first index of tile `it` of the walk over the listed blocks IDX (see sparse_tiles_before)."""
    return tl.load(IDX + it // (SPARSE_BLOCK // TILE)) * SPARSE_BLOCK + it % (SPARSE_BLOCK // TILE) * TILE


@triton.jit
def sparse_walk(IDX, count, lo, full_lo, full_hi, hi, SPARSE_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """The band's stage bounds (lo, full_lo, full_hi, hi: positions, see key_tiles) as positions in the
    walk over the listed blocks: the same three stages, visiting only listed tiles."""
    hi = tl.cdiv(hi, TILE) * TILE
    return (sparse_tiles_before(IDX, count, lo, SPARSE_BLOCK, TILE),
            sparse_tiles_before(IDX, count, full_lo, SPARSE_BLOCK, TILE),
            sparse_tiles_before(IDX, count, full_hi, SPARSE_BLOCK, TILE),
            sparse_tiles_before(IDX, count, hi, SPARSE_BLOCK, TILE))


@triton.jit
def listed_walk(NUM, IDX, off_b, off_h, stride_b, stride_h, start, seqlen_own, seqlen_other, lo, full_lo,
                full_hi, hi, SPARSE_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """The blocks a block mask lists for the block holding index `start` of one side (queries for
    the forward and dQ, keys for dK/dV; seqlen_own its length, seqlen_other the other side's):
    IDX moved to that list, and the stage bounds as positions in the walk over it (sparse_walk)."""
    row = (off_b * stride_b + off_h * stride_h) * tl.cdiv(seqlen_own, SPARSE_BLOCK) + start // SPARSE_BLOCK
    count = tl.load(NUM + row)
    IDX += row * tl.cdiv(seqlen_other, SPARSE_BLOCK)
    lo, full_lo, full_hi, hi = sparse_walk(IDX, count, lo, full_lo, full_hi, hi, SPARSE_BLOCK, TILE)
    return IDX, lo, full_lo, full_hi, hi


@triton.jit
def alibi_slope_log2(Alibi, off_b, off_h, stride_alibib, stride_alibih, HAS_ALIBI: tl.constexpr):
    """The ALiBi slope of one (batch, head) in base-2 units (0 without ALiBi)."""
    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(Alibi + off_b * stride_alibib + off_h * stride_alibih) * LOG2E
    return slope_log2


@triton.jit
def tile_mask(offs_m, offs_n, seqlen_q, seqlen_k, IS_CAUSAL: tl.constexpr):
    """True where query offs_m[i] may see key offs_n[j] and both are in bounds. [BLOCK_M, BLOCK_N]"""
    valid = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    if IS_CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (seqlen_k - seqlen_q))
    return valid


@triton.jit
def tanh(x):
    """tanh from one exp2, 1 - 2 / (e^2x + 1): exact at both saturated ends (no tanh in tl, and
    libdevice's does not run in the interpreter)."""
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def scores(qk, i, j, seqlen_q, seqlen_k, qk_scale, softcap_scale, softcap_log2, slope_log2,
           window_left, window_right, Bias, stride_biasq, stride_biask,
           MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
           HAS_ALIBI: tl.constexpr, BIAS_KIND: tl.constexpr):
    """(S, T) of one tile with every option, in the specification's order (variant.py): S in base-2
    units with -inf where (i, j) is not allowed; T = tanh(scale q.k / softcap) for the softcap's
    backward (qk itself without softcap). The one copy of the score options, used by the forward,
    the dK/dV and the dQ loops, in either tile orientation (i, j broadcast against qk).

    MASK: the tile may cross the window band, the causal diagonal or the end of either axis. Without
    it only the program's own padding rows (columns in dK/dV) can be out of bounds: the bias and
    mask loads are bounded by (i < seqlen_q) & (j < seqlen_k) either way. Bias points at the
    program's (batch, head) of the bias or mask.
    """
    if SOFTCAP:
        t = tanh(qk * softcap_scale)
        s = t * softcap_log2
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        s = s - slope_log2 * tl.abs(i + (seqlen_k - seqlen_q) - j).to(tl.float32)
    in_bounds = (i < seqlen_q) & (j < seqlen_k)
    if MASK:
        allowed = in_bounds
        if HAS_WINDOW:
            diagonal = i + (seqlen_k - seqlen_q)
            allowed = allowed & (j >= diagonal - window_left) & (j <= diagonal + window_right)
        elif IS_CAUSAL:
            allowed = allowed & (j <= i + (seqlen_k - seqlen_q))
        in_bounds = allowed
    if BIAS_KIND != 0:
        ptrs = Bias + i.to(tl.int64) * stride_biasq + j.to(tl.int64) * stride_biask     # a (Sq, Sk) bias may pass 2^31
        if BIAS_KIND == 1:
            s = s + tl.load(ptrs, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
        else:
            keep = tl.load(ptrs, mask=in_bounds, other=0) != 0
            if MASK:
                allowed = allowed & keep
            else:
                s = tl.where(keep, s, float("-inf"))
    if MASK:
        s = tl.where(allowed, s, float("-inf"))
    return s, t


@triton.jit
def dropout_keep(seed_lo, seed_hi, dropout_p, rows, first_col, bh, BLOCK_N: tl.constexpr,
                 KEYS_FIRST: tl.constexpr = False):
    """Z of the tile rows x [first_col, first_col + BLOCK_N): True where P_ij is kept; [len(rows),
    BLOCK_N], or its transpose with KEYS_FIRST. Bit for bit flashattn/ops/philox.py: one Philox call
    (seed, c0=j // 4, c1=i, c2=b * H + h, c3=0) serves four keys, output j % 4 becoming key j's
    uniform, kept iff >= dropout_p. first_col is a multiple of 4 (tiles start at multiples of
    BLOCK_N). The seed comes as two int32 halves so that the kernel's signature never depends on its
    value."""
    tl.static_assert(BLOCK_N % 4 == 0, "four keys per Philox call")
    seed = ((seed_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32)
            | seed_lo.to(tl.uint32, bitcast=True).to(tl.uint64))
    groups = first_col // 4 + tl.arange(0, BLOCK_N // 4)
    r0, r1, r2, r3 = tl.philox(seed, groups[None, :], rows[:, None], bh, 0)      # [rows, BLOCK_N / 4]
    # [rows, BLOCK_N / 4, 2, 2] with r_(2x + y) at [.., g, x, y]: row-major, column 4 g + t holds r_t.
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [rows.shape[0], BLOCK_N])
    keep = tl.uint_to_uniform_float(r) >= dropout_p
    if KEYS_FIRST:
        keep = tl.trans(keep)
    return keep


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
