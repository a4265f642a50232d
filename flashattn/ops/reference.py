"""FlashAttention in plain PyTorch: the tiled algorithm, step by step, and the standard baseline.

This file is the documentation of the algorithm and the path on devices without a usable GPU. The
Triton kernels in ``flashattn/ops/triton`` do the same steps in the same order with the same names;
read this file first. The exact semantics of every option (window, softcap, ALiBi, bias, masks,
block-sparse, dropout) are specified in ``flashattn/ops/variant.py``; the random numbers of dropout
in ``flashattn/ops/philox.py``.

Glossary (Dao et al., 2022, Algorithm 1 and 2; flash-attn 2.x conventions):
    B, H, Hk     batch, query heads, key/value heads (H = Hk * G; G > 1 is GQA, Hk = 1 is MQA)
    Sq, Sk, D    query length, key length, head dim
    Q_i, K_j, V_j  one row block of queries (block_m rows), one column block of keys/values (block_n)
    S_ij         the scores of one tile (never stored beyond one tile): scale * Q_i K_j^T, softcapped
                 (T_ij = tanh(scale * Q_i K_j^T / softcap) is kept for the backward), minus the
                 ALiBi distance term, plus the bias tile, -inf where masked
    m_i, l_i     running row max and running row sum of exp(S - m_i): the online softmax state
    P~_ij        exp(S_ij - m_new), the unnormalised probabilities of one tile
    Z_ij         the dropout keep mask of one tile, regenerated from (seed, i, j, b * H + h)
    alpha        exp(m_old - m_new), the factor that rescales acc and l_i when the row max grows
    acc          running unnormalised output sum_j (P~_ij * Z_ij / (1 - p)) V_j
    lse          log-sum-exp of each score row, m_i + log(l_i): all the forward keeps besides O
    delta        rowsum(dO * O), the backward's per-row correction term (minus dLSE when given)
    offset       Sk - Sq: causal and window masks are aligned to the bottom-right corner, so with
                 causal query i sees keys j <= i + offset (flash-attn >= 2.1). A row that sees no
                 key gets O = 0 and lse = +inf, which makes every recomputed probability of that
                 row exactly 0.

NaN and inf are never hidden. "The row saw no key" is the test l_i == 0 (every score -inf), never
l_i > 0, which is False for NaN too: a NaN or inf in q, k or v that reaches a row's scores or sum
(NaN in the row's scores or the keys it sees, +inf and -inf scores from an inf in q against keys of
both signs) makes l_i, O and lse of that row NaN, so the backward's P = exp(S - lse) is NaN too and
the gradients that depend on it are NaN, as in standard attention (torch SDPA). The masks replace a
masked score by -inf (masked_fill here, tl.where in the kernels; adding -inf would turn a NaN score
into NaN, not -inf), so a NaN key does not reach the rows that may not see it. Where standard
attention differs or cannot be matched without cost:
  - a row whose every score is -inf because of an inf input (inf in q against keys whose entry in
    that dimension is negative) is indistinguishable from a row that sees no key: O = 0 and
    lse = +inf here and in attention_standard (torch SDPA's math path gives 0 too); the plain
    Triton kernels give 0 or NaN for it, depending on the tiles;
  - where logsumexp of a row is +inf (a +inf score) lse is NaN, as its probabilities are (inf - inf),
    so that +inf keeps meaning "no key" (attention_standard reports it the same way);
  - within one tile the products multiply a NaN or inf input by exact zeros (a masked P, a zero dS)
    and IEEE gives NaN (0 * inf, 0 * NaN): a NaN in v (or in k, for dQ; in q, for dK) also reaches
    the rows or keys that share a visited tile with it, and so the outputs and gradients derived from
    those. Dense standard attention multiplies every row by every key and so spreads it further (a
    NaN in v makes every output row of that head NaN); tiles never visited stay clean.

The loops visit only the tiles that can hold an allowed score: those that meet the window band
(causal is the band with window_right = 0), and with a block mask only the listed blocks; so a
fixed window costs time linear in the sequence length, and a block mask time proportional to its
density. A per-(batch, head) block mask is applied one (batch, head) group at a time, as the kernel
does with one program per (block, head, batch); a shared one lets a tile cover all of them at once.

Extra memory is O(N): the tiles of one (row block, column block) pair, the O(Sq) row statistics,
an fp32 copy of the inputs, and the fp32 dQ accumulator in the backward (plus dBias, the size of
the bias, when the bias needs a gradient).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from flashattn.ops import philox
from flashattn.ops.variant import KVCache, Variant, from_causal
from flashattn.sparse import BlockMask

Tensor = torch.Tensor


def _grouped(x: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """(B, S, H, D) -> (B, H // groups, groups, S, D) in `dtype`, so that GQA broadcasts, not copies."""
    b, s, h, d = x.shape
    return x.to(dtype).transpose(1, 2).reshape(b, h // groups, groups, s, d)


def _ungrouped(x: Tensor) -> Tensor:
    """(B, Hk, G, S, D) -> (B, S, Hk * G, D)."""
    b, hk, g, s, d = x.shape
    return x.reshape(b, hk * g, s, d).transpose(1, 2)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def window_mask(rows: Tensor, cols: Tensor, offset: int, window_left: int, window_right: int) -> Tensor:
    """True where query `rows[i]` may see key `cols[j]` through the window (bottom-right aligned):
    rows + offset - left <= cols <= rows + offset + right, a bound of -1 being absent."""
    diagonal = rows[:, None] + offset
    allowed = torch.ones(len(rows), len(cols), dtype=torch.bool, device=rows.device)
    if window_left >= 0:
        allowed &= cols[None, :] >= diagonal - window_left
    if window_right >= 0:
        allowed &= cols[None, :] <= diagonal + window_right
    return allowed


# ------------------------------------------------------------------------------------------------
# The standard (dense) attention: O(N^2) memory, written independently of the tiled loops below.
# ------------------------------------------------------------------------------------------------

def _per_head(x: Tensor, batch: int, nheads: int) -> Tensor:
    """alibi slopes (H,) or (B, H) -> (B or 1, H, 1, 1)."""
    return x.reshape(-1, nheads)[:, :, None, None] if x.dim() == 2 else x.reshape(1, nheads, 1, 1)


def _dense_scores(q: Tensor, k: Tensor, softmax_scale: float, dtype: torch.dtype, *, window_left: int,
                  window_right: int, softcap: float, alibi_slopes: Tensor | None, bias: Tensor | None,
                  mask: Tensor | None, block_mask: BlockMask | None) -> Tensor:
    """The whole score matrix (B, H, Sq, Sk) in `dtype`, every option applied in the documented order."""
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qh = q.to(dtype).transpose(1, 2)                                  # (B, H, Sq, D)
    kh = k.to(dtype).repeat_interleave(h // hk, dim=2).transpose(1, 2)  # (B, H, Sk, D)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    rows = torch.arange(sq, device=q.device)
    cols = torch.arange(sk, device=q.device)
    if alibi_slopes is not None:
        distance = (rows[:, None] + (sk - sq) - cols[None, :]).abs().to(dtype)
        s = s - _per_head(alibi_slopes, b, h).to(dtype) * distance
    if bias is not None:
        s = s + bias.to(dtype)
    allowed = window_mask(rows, cols, sk - sq, window_left, window_right).expand(b, h, sq, sk)
    if mask is not None:
        allowed = allowed & mask
    if block_mask is not None:
        allowed = allowed & block_mask.element_mask(sq, sk)
    return s.masked_fill(~allowed, float("-inf"))


def _softmax_rows_may_be_empty(s: Tensor) -> Tensor:
    """softmax over the last dim; a row of only -inf (no key) gives 0, with a zero (not NaN) gradient.
    A row with a NaN or a +inf score is not empty: its probabilities are NaN, as torch.softmax's."""
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    return torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def attention_standard(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool = False, *,
                       window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                       alibi_slopes: Tensor | None = None, attn_bias: Tensor | None = None,
                       block_mask: BlockMask | None = None, dropout_p: float = 0.0,
                       dropout_mask: Tensor | None = None, seed: int | None = None,
                       ) -> tuple[Tensor, Tensor]:
    """The paper's baseline: materialise S and P in HBM (O(N^2) memory), in the inputs' dtype.

    Same layout and conventions as the fused kernels: q (B, Sq, H, D), k/v (B, Sk, Hk, D); returns
    O (B, Sq, H, D) and lse (B, H, Sq) in float32 (float64 for float64 inputs). Pass float64
    tensors for a high-precision reference; pass the kernel's dtype for "the same math, done the
    standard way", whose error is the yardstick for the kernel's error in the tests.

    The options take flash_attn_func's names and meanings (flashattn/ops/variant.py); attn_bias is a
    float bias or a bool mask broadcastable to (B, H, Sq, Sk). Dropout uses `dropout_mask`
    (B, H, Sq, Sk) bool (True = kept) when given, else the Philox mask of `seed`. Everything is
    differentiable by autograd, which makes this an independent check of the fused backward.
    """
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    window_left, window_right = window_size
    if causal:
        window_right = 0
    bias = attn_bias if attn_bias is not None and attn_bias.dtype != torch.bool else None
    mask = attn_bias if attn_bias is not None and attn_bias.dtype == torch.bool else None
    s = _dense_scores(q, k, softmax_scale, q.dtype, window_left=window_left, window_right=window_right,
                      softcap=softcap, alibi_slopes=alibi_slopes, bias=bias, mask=mask,
                      block_mask=block_mask)                           # (B, H, Sq, Sk)
    lse = torch.logsumexp(s.to(_accumulator_dtype(q.dtype)), dim=-1)  # (B, H, Sq)
    p = _softmax_rows_may_be_empty(s)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = philox.dropout_keep_mask(seed, dropout_p, b, h, sq, sk, q.device)
        p = torch.where(dropout_mask, p / (1.0 - dropout_p), 0.0)
    vh = v.repeat_interleave(h // v.shape[2], dim=2).transpose(1, 2)  # (B, H, Sk, D)
    o = torch.matmul(p, vh.to(p.dtype)).transpose(1, 2)              # (B, Sq, H, D)
    # The kernels' conventions: +inf = the row sees no key (logsumexp -inf); a row with a +inf score
    # has NaN probabilities (inf - inf), and its lse is NaN too (logsumexp says +inf).
    lse = torch.where(lse == float("inf"), float("nan"), lse)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    return o, lse


def attention_probs(q: Tensor, k: Tensor, softmax_scale: float, variant: Variant | bool) -> Tensor:
    """The probabilities softmax(S) (B, H, Sq, Sk) after every option, in float32 (float64 for
    float64 inputs): O(N^2), for debugging only.

    With dropout, the entries that were dropped are negated (flash-attn's convention); their sign
    bit is set even where P is 0, so ``torch.signbit(probs)`` is exactly the dropped set, and
    O = (|probs| * ~signbit / (1 - p)) V.
    """
    if isinstance(variant, bool):
        variant = from_causal(variant)
    if variant.varlen:
        # Packed sequences: (B, H, max_seqlen_q, max_seqlen_k), zero past each sequence's lengths.
        n_seq = variant.cu_seqlens_q.numel() - 1
        probs = torch.zeros((n_seq, q.shape[2], variant.max_seqlen_q, variant.max_seqlen_k),
                            dtype=_accumulator_dtype(q.dtype), device=q.device)
        for b, rows_q, rows_k, dense in _sequences(variant):
            part = attention_probs(q[:, rows_q], k[:, rows_k], softmax_scale, dense)[0]
            probs[b, :, :part.shape[1], :part.shape[2]] = part
        return probs
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    s = _dense_scores(q, k, softmax_scale, _accumulator_dtype(q.dtype),
                      window_left=variant.window_left, window_right=variant.window_right,
                      softcap=variant.softcap, alibi_slopes=variant.alibi_slopes, bias=variant.bias,
                      mask=variant.mask, block_mask=variant.block_mask)
    p = _softmax_rows_may_be_empty(s)
    if variant.dropout_p > 0.0:
        keep = philox.dropout_keep_mask(variant.seed, variant.dropout_p, b, h, sq, sk, q.device,
                                        variant.batch_index)
        p = torch.where(keep, p, -p)
    return p


# ------------------------------------------------------------------------------------------------
# The tiled algorithm.
# ------------------------------------------------------------------------------------------------

@dataclass
class _Group:
    """The (batch, head) entries one pass of the tiled loops covers, and their per-head data.

    One group covers everything unless the block mask differs per batch or per head; then there
    is one group per (batch, head) entry of the block mask. Tensors are sliced to the group:
    index selects (B', Hk', G') from the (B, Hk, G) layout, kv_index (B', Hk', 1).
    """

    index: tuple[slice, slice, slice]
    kv_index: tuple[slice, slice, slice]
    heads: Tensor                     # (B', Hk', G') the dropout counters c2 = b * H + h
    slopes: Tensor | None             # (B', Hk', G') ALiBi slopes, accumulator dtype
    bias: Tensor | None               # (B', Hk', G', Sq, Sk) expanded view, never copied
    mask: Tensor | None               # (B', Hk', G', Sq, Sk) expanded bool view
    kv_lists: list[list[int]] | None  # per query block: the key blocks listed by the block mask
    q_lists: list[list[int]] | None   # per key block: the query blocks listed by the block mask


def _broadcast_view(x: Tensor, b: int, hk: int, g: int, sq: int, sk: int) -> Tensor:
    """A 4-dim tensor broadcastable to (B, H, Sq, Sk) as a (B, Hk, G, Sq, Sk) stride-0 view."""
    return x.expand(b, hk * g, sq, sk).view(b, hk, g, sq, sk)


def _lists(num: Tensor, indices: Tensor) -> list[list[int]]:
    return [row[:n] for n, row in zip(num.tolist(), indices.tolist())]


def _groups(variant: Variant, b: int, h: int, hk: int, sq: int, sk: int, device: torch.device,
            dtype: torch.dtype) -> list[_Group]:
    g = h // hk
    heads = (philox.head_counters(b, h, device) + variant.batch_index * h).view(b, hk, g)
    slopes = None if variant.alibi_slopes is None else variant.alibi_slopes.to(dtype).reshape(b, hk, g)
    bias = None if variant.bias is None else _broadcast_view(variant.bias, b, hk, g, sq, sk)
    mask = None if variant.mask is None else _broadcast_view(variant.mask, b, hk, g, sq, sk)
    everything = slice(None)

    def group(bsl, hksl, gsl, kv_lists=None, q_lists=None) -> _Group:
        index = (bsl, hksl, gsl)
        return _Group(index, (bsl, hksl, everything), heads[index],
                      None if slopes is None else slopes[index],
                      None if bias is None else bias[index], None if mask is None else mask[index],
                      kv_lists, q_lists)

    bm = variant.block_mask
    if bm is None:
        return [group(everything, everything, everything)]
    groups = []
    mb, mh = bm.shape[:2]
    for bi in range(mb):
        bsl = slice(bi, bi + 1) if mb > 1 else everything
        for hi in range(mh):
            # Query head hi is (kv head hi // G, member hi % G of its group).
            hksl, gsl = ((slice(hi // g, hi // g + 1), slice(hi % g, hi % g + 1)) if mh > 1
                         else (everything, everything))
            groups.append(group(bsl, hksl, gsl, _lists(bm.kv_num_blocks[bi, hi], bm.kv_indices[bi, hi]),
                                _lists(bm.q_num_blocks[bi, hi], bm.q_indices[bi, hi])))
    return groups


def _block_sizes(variant: Variant, block_m: int, block_n: int) -> tuple[int, int]:
    """A block mask fixes the tiles to its blocks; otherwise the caller's tile sizes."""
    if variant.block_mask is not None:
        return variant.block_mask.block_size, variant.block_mask.block_size
    return block_m, block_n


def _key_blocks(variant: Variant, grp: _Group, start_m: int, block_m: int, block_n: int, sq: int,
                sk: int) -> list[int]:
    """The starts of the key tiles the query tile at start_m visits: those meeting the window band
    (causal included), and with a block mask only the listed ones."""
    lo, hi = variant.key_range(start_m, block_m, sq, sk)
    if grp.kv_lists is None:
        return list(range(lo - lo % block_n, hi, block_n))
    return [c * block_n for c in grp.kv_lists[start_m // block_m]
            if c * block_n < hi and (c + 1) * block_n > lo]


def _query_blocks(variant: Variant, grp: _Group, start_n: int, block_m: int, block_n: int, sq: int,
                  sk: int) -> list[int]:
    """The starts of the query tiles the key tile at start_n visits in the backward (same tiles as
    the forward, seen from the key side)."""
    lo, hi = variant.query_range(start_n, block_n, sq, sk)
    if grp.q_lists is None:
        return list(range(lo - lo % block_m, hi, block_m))
    return [r * block_m for r in grp.q_lists[start_n // block_n]
            if r * block_m < hi and (r + 1) * block_m > lo]


def _tile_scores(q_i: Tensor, k_j: Tensor, softmax_scale: float, variant: Variant, grp: _Group,
                 start_m: int, start_n: int, offset: int) -> tuple[Tensor, Tensor | None]:
    """S_ij with every option applied, and T_ij = tanh(x / softcap) (None without softcap).

    (B', Hk', G', BM, BN), in the order of the specification: scale, softcap, ALiBi, bias, masks.
    """
    s_ij = torch.matmul(q_i, k_j.transpose(-1, -2)) * softmax_scale
    t_ij = None
    if variant.softcap > 0.0:
        t_ij = torch.tanh(s_ij / variant.softcap)
        s_ij = variant.softcap * t_ij
    bm, bn = q_i.shape[-2], k_j.shape[-2]
    rows = torch.arange(start_m, start_m + bm, device=q_i.device)
    cols = torch.arange(start_n, start_n + bn, device=q_i.device)
    if grp.slopes is not None:
        distance = (rows[:, None] + offset - cols[None, :]).abs().to(s_ij.dtype)
        s_ij = s_ij - grp.slopes[..., None, None] * distance
    if grp.bias is not None:
        s_ij = s_ij + grp.bias[..., start_m:start_m + bm, start_n:start_n + bn].to(s_ij.dtype)
    allowed = None
    if variant.window_left >= 0 or variant.window_right >= 0:
        allowed = window_mask(rows, cols, offset, variant.window_left, variant.window_right)
    if grp.mask is not None:
        tile = grp.mask[..., start_m:start_m + bm, start_n:start_n + bn]
        allowed = tile if allowed is None else allowed & tile
    if allowed is not None:
        s_ij = s_ij.masked_fill(~allowed, float("-inf"))
    return s_ij, t_ij


def _keep(variant: Variant, grp: _Group, start_m: int, start_n: int, bm: int, bn: int,
          device: torch.device) -> Tensor:
    """Z_ij of the tile, regenerated from the seed: (B', Hk', G', BM, BN) bool."""
    rows = torch.arange(start_m, start_m + bm, device=device)
    cols = torch.arange(start_n, start_n + bn, device=device)
    return philox.keep_mask(variant.seed, variant.dropout_p, rows, cols, grp.heads)


def _tiles_source(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q (B, Hk, G, Sq, D), K and V (B, Hk, 1, Sk, D) in the accumulator dtype: the tiles are slices
    of these, and GQA broadcasts K/V over the G query heads of a group instead of copying them."""
    acc_dtype = _accumulator_dtype(q.dtype)
    groups = q.shape[2] // k.shape[2]
    return _grouped(q, groups, acc_dtype), _grouped(k, 1, acc_dtype), _grouped(v, 1, acc_dtype)


def _sequences(variant: Variant):
    """Packed sequences, one at a time: (b, rows of q, rows of k, the dense Variant of sequence b)."""
    cu_q, cu_k = variant.cu_seqlens_q.tolist(), variant.cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        slopes = variant.alibi_slopes
        if slopes is not None:
            slopes = slopes[b:b + 1]                                   # (B, H) -> (1, H)
        dense = replace(variant, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                        alibi_slopes=slopes, batch_index=b)
        yield b, slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1]), dense


def flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float,
                            variant: Variant | bool = False, block_m: int = 128, block_n: int = 128,
                            ) -> tuple[Tensor, Tensor]:
    """Algorithm 1 (forward): returns O (B, Sq, H, D) in the inputs' dtype and lse (B, H, Sq).

    `variant` carries the options (a bool is read as plain causal / non-causal).
    """
    if isinstance(variant, bool):
        variant = from_causal(variant)
    if variant.varlen:
        # Packed sequences (q (1, total_q, H, D)): each is a dense problem of its own.
        out = torch.empty_like(q)
        lse = torch.empty((1, q.shape[2], q.shape[1]), dtype=_accumulator_dtype(q.dtype), device=q.device)
        for _, rows_q, rows_k, dense in _sequences(variant):
            out[:, rows_q], lse[:, :, rows_q] = flash_attention_forward(
                q[:, rows_q], k[:, rows_k], v[:, rows_k], softmax_scale, dense, block_m, block_n)
        return out, lse
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    Q, K, V = _tiles_source(q, k, v)
    acc_dtype, offset = Q.dtype, sk - sq
    block_m, block_n = _block_sizes(variant, block_m, block_n)
    dropout = variant.dropout_p > 0.0
    O = torch.empty_like(Q)                                          # (B, Hk, G, Sq, D)
    lse = torch.empty(Q.shape[:-1], dtype=acc_dtype, device=q.device)  # (B, Hk, G, Sq)

    for grp in _groups(variant, b, h, hk, sq, sk, q.device, acc_dtype):
        for start_m in range(0, sq, block_m):
            rows_i = grp.index + (slice(start_m, start_m + block_m),)
            Q_i = Q[rows_i]                                          # (B', Hk', G', BM, D)
            rows = Q_i.shape[:-1]
            m_i = torch.full(rows, float("-inf"), dtype=acc_dtype, device=q.device)
            l_i = torch.zeros(rows, dtype=acc_dtype, device=q.device)
            acc = torch.zeros_like(Q_i)
            # Only the key tiles that meet the window band (and, block-sparse, the listed ones).
            for start_n in _key_blocks(variant, grp, start_m, block_m, block_n, sq, sk):
                cols_j = grp.kv_index + (slice(start_n, start_n + block_n),)
                K_j, V_j = K[cols_j], V[cols_j]                      # (B', Hk', 1, BN, D)
                S_ij, _ = _tile_scores(Q_i, K_j, softmax_scale, variant, grp, start_m, start_n, offset)
                m_new = torch.maximum(m_i, S_ij.amax(dim=-1))        # (B', Hk', G', BM)
                # A row that has seen only masked keys keeps m = -inf; subtract 0 instead, so that
                # exp(-inf - (-inf)) never makes a NaN.
                m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
                P_ij = torch.exp(S_ij - m_safe[..., None])           # P~_ij (B', Hk', G', BM, BN)
                alpha = torch.exp(m_i - m_safe)                      # rescale of the old state
                l_i = alpha * l_i + P_ij.sum(dim=-1)                 # the softmax sees P before dropout
                if dropout:
                    Z_ij = _keep(variant, grp, start_m, start_n, *S_ij.shape[-2:], q.device)
                    P_ij = torch.where(Z_ij, P_ij * (1.0 / (1.0 - variant.dropout_p)), 0.0)
                acc = alpha[..., None] * acc + torch.matmul(P_ij, V_j)
                m_i = m_new
            # The row saw no key exactly when l_i == 0 (every score -inf): O = 0 and lse = +inf. A NaN
            # l_i (a NaN or inf in the inputs) is not 0 and reaches O and lse (`l_i > 0` would hide it).
            seen = l_i != 0
            O[rows_i] = torch.where(seen[..., None], acc / torch.where(seen, l_i, 1.0)[..., None], 0.0)
            lse[rows_i] = torch.where(seen, m_i + torch.log(torch.where(seen, l_i, 1.0)), float("inf"))
    return _ungrouped(O).to(q.dtype), lse.reshape(b, h, sq)


def _add_bias_grad(dBias: Tensor, dS_ij: Tensor, index: tuple[slice, ...]) -> None:
    """dBias[index] += dS_ij, summing dS_ij over the dimensions where the bias broadcasts (size 1).

    dBias (B|1, Hk|1, G|1, Sq|1, Sk|1) is the bias's gradient buffer; index selects the tile in the
    full (B, Hk, G, Sq, Sk) layout."""
    target = []
    for dim, sl in enumerate(index):
        if dBias.shape[dim] == 1:
            dS_ij = dS_ij.sum(dim=dim, keepdim=True)
            target.append(slice(None))
        else:
            target.append(sl)
    dBias[tuple(target)] += dS_ij


def flash_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             lse: Tensor, softmax_scale: float, variant: Variant | bool = False,
                             dlse: Tensor | None = None, block_m: int = 128, block_n: int = 128,
                             bias_grad: bool = False,
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Algorithm 2 (backward), recomputing P from Q, K and lse. Returns dq, dk, dv (inputs' dtype)
    and dbias (the bias's shape and dtype; None unless `bias_grad`).

    The outer loop runs over key blocks, so dK_j and dV_j live in registers in the kernel (here:
    one tile); dQ is summed over key blocks into an fp32 buffer. For GQA, the G query heads of a
    group all add into the same dK_j/dV_j. `dlse` is the gradient flowing into lse, if any:
    d lse / d S = P, so it enters as delta - dlse. With dropout, Z_ij is regenerated from the seed:
    dV_j gets (P_ij * Z_ij / (1-p))^T dO_i and dP_ij is masked and scaled the same way. dS_ij is
    the gradient of the final scores, hence of the bias; the softcap's chain rule follows it.
    """
    if isinstance(variant, bool):
        variant = from_causal(variant)
    if variant.varlen:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for _, rows_q, rows_k, dense in _sequences(variant):
            dq[:, rows_q], dk[:, rows_k], dv[:, rows_k], _ = flash_attention_backward(
                dout[:, rows_q], q[:, rows_q], k[:, rows_k], v[:, rows_k], out[:, rows_q], lse[:, :, rows_q],
                softmax_scale, dense, None if dlse is None else dlse[:, :, rows_q], block_m, block_n)
        return dq, dk, dv, None
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    Q, K, V = _tiles_source(q, k, v)
    groups, offset, acc_dtype = h // hk, sk - sq, Q.dtype
    block_m, block_n = _block_sizes(variant, block_m, block_n)
    dropout = variant.dropout_p > 0.0
    dO = _grouped(dout, groups, acc_dtype)                           # (B, Hk, G, Sq, D)
    LSE = lse.to(acc_dtype).reshape(b, hk, groups, sq)               # (B, Hk, G, Sq)
    delta = (dO * _grouped(out, groups, acc_dtype)).sum(dim=-1)      # (B, Hk, G, Sq)
    if dlse is not None:
        delta = delta - dlse.to(acc_dtype).reshape(b, hk, groups, sq)
    dQ = torch.zeros_like(Q)
    dK = torch.zeros_like(K)
    dV = torch.zeros_like(V)
    dBias = None
    if bias_grad:
        bb, bh, bq, bk = variant.bias.shape
        dBias = torch.zeros((bb, hk if bh > 1 else 1, groups if bh > 1 else 1, bq, bk),
                            dtype=acc_dtype, device=q.device)

    for grp in _groups(variant, b, h, hk, sq, sk, q.device, acc_dtype):
        for start_n in range(0, sk, block_n):
            cols_j = grp.kv_index + (slice(start_n, start_n + block_n),)
            K_j, V_j = K[cols_j], V[cols_j]                          # (B', Hk', 1, BN, D)
            dK_j = torch.zeros_like(K_j)
            dV_j = torch.zeros_like(V_j)
            # Only the query tiles that see this key tile (window band, block-mask lists).
            for start_m in _query_blocks(variant, grp, start_n, block_m, block_n, sq, sk):
                rows_i = grp.index + (slice(start_m, start_m + block_m),)
                Q_i, dO_i = Q[rows_i], dO[rows_i]                    # (B', Hk', G', BM, D)
                S_ij, T_ij = _tile_scores(Q_i, K_j, softmax_scale, variant, grp, start_m, start_n, offset)
                P_ij = torch.exp(S_ij - LSE[rows_i][..., None])      # (B', Hk', G', BM, BN)
                dP_ij = torch.matmul(dO_i, V_j.transpose(-1, -2))    # (B', Hk', G', BM, BN)
                if dropout:
                    Z_ij = _keep(variant, grp, start_m, start_n, *S_ij.shape[-2:], q.device)
                    rescale = 1.0 / (1.0 - variant.dropout_p)
                    dV_j += torch.matmul(torch.where(Z_ij, P_ij * rescale, 0.0).transpose(-1, -2),
                                         dO_i).sum(dim=2, keepdim=True)
                    dP_ij = torch.where(Z_ij, dP_ij * rescale, 0.0)
                else:
                    dV_j += torch.matmul(P_ij.transpose(-1, -2), dO_i).sum(dim=2, keepdim=True)
                dS_ij = P_ij * (dP_ij - delta[rows_i][..., None])
                if dBias is not None:
                    _add_bias_grad(dBias, dS_ij, rows_i + (slice(start_n, start_n + block_n),))
                if T_ij is not None:
                    dS_ij = dS_ij * (1.0 - T_ij * T_ij)              # d softcap*tanh(x/softcap) / dx
                dK_j += torch.matmul(dS_ij.transpose(-1, -2), Q_i).sum(dim=2, keepdim=True)
                dQ[rows_i] += torch.matmul(dS_ij, K_j)
            dK[cols_j] += dK_j * softmax_scale
            dV[cols_j] += dV_j
    dq = _ungrouped(dQ * softmax_scale).to(q.dtype)
    dbias = None if dBias is None else dBias.reshape(variant.bias.shape).to(variant.bias.dtype)
    return dq, _ungrouped(dK).to(k.dtype), _ungrouped(dV).to(v.dtype), dbias


# ------------------------------------------------------------------------------------------------
# KV cache (flash_attn_with_kvcache): the append, rotary embeddings, and attention over each
# sequence's keys. The Triton path (flashattn/ops/triton/decode.py) splits the keys across programs
# and merges the partial results by their log-sum-exp; this path runs each sequence whole, which
# gives the same result up to rounding.
# ------------------------------------------------------------------------------------------------

def rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """x (B, S, H, D) with its first 2 * cos.shape[1] dims rotated at `positions` (B, S) (rows of
    cos/sin), computed in float32 (float64 for float64 x), returned in x's dtype. Non-interleaved
    (GPT-NeoX) pairs dim c with c + half; interleaved (GPT-J) pairs 2c with 2c + 1."""
    dtype = _accumulator_dtype(x.dtype)
    half = cos.shape[1]
    c = cos.to(dtype)[positions][:, :, None, :]                       # (B, S, 1, half)
    s = sin.to(dtype)[positions][:, :, None, :]
    xr = x[..., :2 * half].to(dtype)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _cached(cache: KVCache, b: int) -> int:
    """Tokens in sequence b's cache before the call."""
    return cache.seqlens if isinstance(cache.seqlens, int) else int(cache.seqlens[b])


def _slots(cache: KVCache, b: int, start: int, stop: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(cache batch entry or page, row) of the slots [start, stop) of sequence b."""
    slots = torch.arange(start, stop, device=device)
    if cache.block_table is not None:
        return cache.block_table[b, slots // cache.page_size].long(), slots % cache.page_size
    entry = int(cache.batch_idx[b]) if cache.batch_idx is not None else b
    return torch.full_like(slots, entry), slots


def kv_cache_append(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None, v: Tensor | None,
                    cache: KVCache, rotary_cos: Tensor | None, rotary_sin: Tensor | None,
                    rotary_interleaved: bool, q_all_positions: bool) -> Tensor:
    """Write k, v (B, Sn, Hk, D) into the cache at slots seqlens[b] + t (k rotated at position
    seqlens[b] - leftpad[b] + t when cos/sin are given); return q rotated at position seqlens[b] -
    leftpad[b] (+ i when q_all_positions), or q itself without rotary."""
    batch, seqlen_q = q.shape[:2]
    start = torch.tensor([_cached(cache, b) for b in range(batch)], device=q.device)
    if cache.leftpad is not None:
        start = start - cache.leftpad.long()
    if rotary_cos is not None:
        steps = torch.arange(seqlen_q, device=q.device) if q_all_positions else torch.zeros(
            seqlen_q, dtype=torch.long, device=q.device)
        q = rotary(q, rotary_cos, rotary_sin, start[:, None] + steps, rotary_interleaved)
    if k is not None:
        seqlen_new = k.shape[1]
        if rotary_cos is not None:
            positions = start[:, None] + torch.arange(seqlen_new, device=k.device)
            k = rotary(k, rotary_cos, rotary_sin, positions, rotary_interleaved)
        for b in range(batch):
            cached = _cached(cache, b)
            entry, row = _slots(cache, b, cached, cached + seqlen_new, q.device)
            k_cache[entry, row] = k[b]
            v_cache[entry, row] = v[b]
    return q


def kv_cache_forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, softmax_scale: float, variant: Variant,
                     cache: KVCache) -> tuple[Tensor, Tensor]:
    """O (B, Sq, H, D) and lse (B, H, Sq): each sequence's keys (KVCache) gathered, then Algorithm 1."""
    batch, seqlen_q, nheads, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=_accumulator_dtype(q.dtype), device=q.device)
    for b in range(batch):
        first = int(cache.leftpad[b]) if cache.leftpad is not None else 0
        entry, row = _slots(cache, b, first, _cached(cache, b) + cache.seqlen_new, q.device)
        slopes = variant.alibi_slopes
        one = replace(variant, alibi_slopes=None if slopes is None else slopes[b:b + 1])
        out[b:b + 1], lse[b:b + 1] = flash_attention_forward(
            q[b:b + 1], k_cache[entry, row][None], v_cache[entry, row][None], softmax_scale, one)
    return out, lse
