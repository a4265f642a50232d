"""The attention variants, packed into one value that every backend receives: the exact semantics.

This is the specification the PyTorch path implements and the Triton kernels must follow. Names:
b batch, h query head (H of them), i query index (0 <= i < Sq), j key index (0 <= j < Sk),
offset = Sk - Sq (masks are aligned to the bottom-right corner, flash-attn >= 2.1).

The score of (b, h, i, j) is built in this order:

    x = softmax_scale * q_i . k_j                        (q, k of query head h and its kv head)
    x = softcap * tanh(x / softcap)                      if softcap > 0
    x = x - alibi_slopes[b, h] * |i + offset - j|        if alibi_slopes is given
    x = x + bias[b, h, i, j]                             if attn_bias is a float tensor
    x = -inf unless (i, j) is allowed, where allowed means all of:
        window:      i + offset - window_left <= j       (if window_left >= 0)
                     j <= i + offset + window_right      (if window_right >= 0; causal: right = 0)
        bool mask:   mask[b, h, i, j]                    (True = may attend)
        block mask:  block_mask.mask[b, h, i // bs, j // bs]

then P = softmax_j(x) (lse = logsumexp_j(x)), and with dropout O = sum_j P_ij * Z_ij / (1 - p) v_j,
where Z_ij = keep(seed, j, i, b * H + h) is defined in flashattn/ops/philox.py (the statistics
m, l and lse are those of P before dropout). A row in which no key is allowed (or every score is
-inf) gets O = 0 and lse = +inf. Broadcast dimensions (size 1) of alibi/bias/mask/block mask are
shared; no tensor is expanded in memory.

Backward (Z regenerated from the seed): dV = (P * Z / (1-p))^T dO, dP = (dO V^T) * Z / (1-p),
dS = P * (dP - delta) with delta = rowsum(dO * O) - dlse; dBias = dS summed over the bias's
broadcast dimensions; through the softcap dX = dS * (1 - tanh^2(x / softcap)); dQ = scale * dX K,
dK = scale * dX^T Q.

Tiles wholly outside the window band, or not listed in the block mask, are never visited, in the
forward and in the backward: key_range / query_range below give the band's span for a block of
queries / keys, and the block mask's kv_indices (forward, dQ) / q_indices (dK, dV) list the blocks,
ascending. The PyTorch path uses block_size x block_size tiles with a block mask; a kernel whose
tiles are smaller walks each listed block in sub-tiles (block_size is a power of two >= 16).

Packed sequences (varlen): with cu_seqlens_q / cu_seqlens_k (int32, B + 1 entries, cumulative from
0), q is (1, total_q, H, D) and k, v are (1, total_k, Hk, D); sequence b is rows
cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q against rows cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v,
and every rule above applies within each sequence with its own Sq, Sk and offset, b being the
sequence index (ALiBi's batch row, dropout's counter b * H + h) and i, j positions within the
sequence. The lse is (1, H, total_q). Bias, bool masks and block masks take no packed form.

Numerics a kernel must match: the dropout test is float32 uniform >= float32(dropout_p) (see
philox.py) and kept values are scaled by 1 / (1 - dropout_p); tanh, ALiBi and the bias are applied
in float32 (float64 for float64 inputs) after the scale and before the base-2 conversion a kernel
may do for exp2; the bias is read in its own dtype (q's or float32) and converted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flashattn.sparse import BlockMask

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)
class Variant:
    """Every option of one attention call, in the backends' terms (see the module docstring).

    causal            window_right == 0 and window_left == -1 (kept as a flag for the plain kernels).
    window_left/right -1 = unbounded; causal is folded in (window_right = 0).
    softcap           0.0 = off.
    alibi_slopes      (B, H) float32 (a stride-0 view when the user gave (H,)), or None.
    dropout_p, seed   dropout probability (0.0 = off) and the Philox seed (a Python int).
    bias              float tensor of 4 dims, each 1 or (B, H, Sq, Sk) respectively, or None:
                      broadcast by expand() views, never copied. Its gradient has its shape.
    mask              bool tensor of 4 dims, like bias (True = may attend), or None.
    block_mask        a flashattn.BlockMask, or None.
    deterministic     the backward must be bitwise reproducible (the PyTorch path always is).
    cu_seqlens_q/k    packed sequences (see the module docstring): int32 (B + 1,), or None (dense).
    max_seqlen_q/k    the longest sequence of each side (the grid's size); 0 when dense.
    batch_index       the sequence index b of the first batch entry (dropout's counters): the
                      PyTorch path runs packed sequences one at a time.
    tile_size         0: the kernels' tuned tiles. Else the side of square tiles (block_m = block_n)
                      the caller asked for (flash_attn_func's tile_size): the portable kernels (and
                      the PyTorch path's loops) run exactly those.
    """

    causal: bool = False
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Tensor | None = None
    dropout_p: float = 0.0
    seed: int = 0
    bias: Tensor | None = None
    mask: Tensor | None = None
    block_mask: BlockMask | None = None
    deterministic: bool = False
    cu_seqlens_q: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    batch_index: int = 0
    tile_size: int = 0

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def is_plain(self) -> bool:
        """Only causal (or nothing), dense: the Triton kernels then run with every option flag off."""
        return self.cu_seqlens_q is None and self.is_plain_or_varlen

    @property
    def is_plain_or_varlen(self) -> bool:
        """Only causal (or nothing), dense or packed: the options the Hopper kernels take (packed
        sequences with their VARLEN flag)."""
        return (self.window_left == -1 and self.window_right == (0 if self.causal else -1)
                and self.softcap == 0.0 and self.alibi_slopes is None and self.dropout_p == 0.0
                and self.bias is None and self.mask is None and self.block_mask is None)

    def key_range(self, start_m: int, block_m: int, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
        """[lo, hi): the keys that some row of the query block [start_m, start_m + block_m) may see
        through the window. Key tiles wholly outside it are skipped."""
        offset = seqlen_k - seqlen_q
        last_row = min(start_m + block_m, seqlen_q) - 1
        lo = max(0, start_m + offset - self.window_left) if self.window_left >= 0 else 0
        hi = min(seqlen_k, last_row + offset + self.window_right + 1) if self.window_right >= 0 else seqlen_k
        return lo, max(lo, hi)

    def query_range(self, start_n: int, block_n: int, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
        """[lo, hi): the queries that may see some key of the block [start_n, start_n + block_n)
        through the window (the backward's loop over query tiles)."""
        offset = seqlen_k - seqlen_q
        last_col = min(start_n + block_n, seqlen_k) - 1
        lo = max(0, start_n - offset - self.window_right) if self.window_right >= 0 else 0
        hi = min(seqlen_q, last_col - offset + self.window_left + 1) if self.window_left >= 0 else seqlen_q
        return lo, max(lo, hi)


PLAIN = Variant()
CAUSAL = Variant(causal=True, window_right=0)


def from_causal(causal: bool) -> Variant:
    return CAUSAL if causal else PLAIN


@dataclass(frozen=True, eq=False)
class KVCache:
    """Which keys of a KV cache each sequence b of a call attends to (flash_attn_with_kvcache).

    The cache is contiguous, (B_cache, capacity, Hk, D), sequence b in batch entry batch_idx[b] (or
    b), or paged, (pages, page_size, Hk, D), slot s of sequence b in row s % page_size of page
    block_table[b, s // page_size]. Sequence b's keys are the slots [leftpad[b], seqlens[b] +
    seqlen_new): the seqlens[b] cached before the call (leftpad included) and the seqlen_new appended
    by it; key position j (the masks' j, variant.py) is slot leftpad[b] + j, so Sk = seqlens[b] +
    seqlen_new - leftpad[b] and the masks align to each sequence's own bottom-right corner.

    seqlens        int32 (B,), or one int for every sequence (read by no kernel: a launch argument)
    seqlen_new     tokens appended by this call (0 without k/v)
    leftpad        int32 (B,), or None (0)
    batch_idx      int32 (B,) into the cache's batch entries, or None (contiguous only)
    block_table    int32 (B, max_blocks) into the pages, or None (contiguous)
    page_size      0 when contiguous
    capacity       slots per sequence: the cache's length, or max_blocks * page_size
    """

    seqlens: Tensor | int
    seqlen_new: int = 0
    leftpad: Tensor | None = None
    batch_idx: Tensor | None = None
    block_table: Tensor | None = None
    page_size: int = 0
    capacity: int = 0
