"""FlashAttention in plain PyTorch: the tiled algorithm, step by step, and the standard baseline.

This file is the documentation of the algorithm and the path on devices without a usable GPU. The
Triton kernels in ``flashattn/ops/triton`` do the same steps in the same order with the same names;
read this file first.

Glossary (Dao et al., 2022, Algorithm 1 and 2; flash-attn 2.x conventions):
    B, H, Hk     batch, query heads, key/value heads (H = Hk * G; G > 1 is GQA, Hk = 1 is MQA)
    Sq, Sk, D    query length, key length, head dim
    Q_i, K_j, V_j  one row block of queries (block_m rows), one column block of keys/values (block_n)
    S_ij         scale * Q_i K_j^T, the scores of one tile (never stored beyond one tile)
    m_i, l_i     running row max and running row sum of exp(S - m_i): the online softmax state
    P~_ij        exp(S_ij - m_new), the unnormalised probabilities of one tile
    alpha        exp(m_old - m_new), the factor that rescales acc and l_i when the row max grows
    acc          running unnormalised output sum_j P~_ij V_j
    lse          log-sum-exp of each score row, m_i + log(l_i): all the forward keeps besides O
    delta        rowsum(dO * O), the backward's per-row correction term (minus dLSE when given)
    offset       Sk - Sq: the causal mask is aligned to the bottom-right corner, so query i sees
                 keys j <= i + offset (flash-attn >= 2.1). A row that sees no key gets O = 0 and
                 lse = +inf, which makes every recomputed probability of that row exactly 0.

Extra memory is O(N): the tiles of one (row block, column block) pair, the O(Sq) row statistics,
an fp32 copy of the inputs, and the fp32 dQ accumulator in the backward.
"""
from __future__ import annotations

import torch

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


def causal_mask(rows: Tensor, cols: Tensor, offset: int) -> Tensor:
    """True where query `rows[i]` may see key `cols[j]` (bottom-right aligned). (len(rows), len(cols))"""
    return cols[None, :] <= rows[:, None] + offset


def _dense_scores(q: Tensor, k: Tensor, softmax_scale: float, causal: bool, dtype: torch.dtype,
                  ) -> Tensor:
    """The whole score matrix as one tile, in `dtype`. (B, Hk, G, Sq, Sk)"""
    groups = q.shape[2] // k.shape[2]
    return _tile_scores(_grouped(q, groups, dtype), _grouped(k, 1, dtype), softmax_scale, causal,
                        0, 0, k.shape[1] - q.shape[1])


def attention_standard(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool = False,
                       ) -> tuple[Tensor, Tensor]:
    """The paper's baseline: materialise S and P in HBM (O(N^2) memory), in the inputs' dtype.

    Same layout and conventions as the fused kernels: q (B, Sq, H, D), k/v (B, Sk, Hk, D); returns
    O (B, Sq, H, D) and lse (B, H, Sq) in float32 (float64 for float64 inputs). Pass float64
    tensors for a high-precision reference; pass the kernel's dtype for "the same math, done the
    standard way", whose error is the yardstick for the kernel's error in the tests.
    """
    b, sq, h, d = q.shape
    s = _dense_scores(q, k, softmax_scale, causal, q.dtype)          # (B, Hk, G, Sq, Sk)
    lse = torch.logsumexp(s.to(_accumulator_dtype(q.dtype)), dim=-1)  # (B, Hk, G, Sq)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                     # rows with no key: 0, not NaN
    o = torch.matmul(p, _grouped(v, 1, v.dtype))                     # (B, Hk, G, Sq, D)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    return _ungrouped(o), lse.reshape(b, h, sq)


def attention_probs(q: Tensor, k: Tensor, softmax_scale: float, causal: bool) -> Tensor:
    """softmax(scale * Q K^T) as a dense (B, H, Sq, Sk) float32 tensor: O(N^2), for debugging only."""
    b, sq, h, d = q.shape
    s = _dense_scores(q, k, softmax_scale, causal, _accumulator_dtype(q.dtype))
    return torch.softmax(s, dim=-1).nan_to_num(0.0).reshape(b, h, sq, k.shape[1])


def _tile_scores(q_i: Tensor, k_j: Tensor, softmax_scale: float, causal: bool,
                 start_m: int, start_n: int, offset: int) -> Tensor:
    """S_ij = scale * Q_i K_j^T with the causal mask applied. (B, Hk, G, BM, BN)"""
    s_ij = torch.matmul(q_i, k_j.transpose(-1, -2)) * softmax_scale
    if causal:
        rows = torch.arange(start_m, start_m + q_i.shape[-2], device=q_i.device)
        cols = torch.arange(start_n, start_n + k_j.shape[-2], device=q_i.device)
        s_ij = s_ij.masked_fill(~causal_mask(rows, cols, offset), float("-inf"))
    return s_ij


def _tiles_source(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q (B, Hk, G, Sq, D), K and V (B, Hk, 1, Sk, D) in the accumulator dtype: the tiles are slices
    of these, and GQA broadcasts K/V over the G query heads of a group instead of copying them."""
    acc_dtype = _accumulator_dtype(q.dtype)
    groups = q.shape[2] // k.shape[2]
    return _grouped(q, groups, acc_dtype), _grouped(k, 1, acc_dtype), _grouped(v, 1, acc_dtype)


def _key_range(start_m: int, block_m: int, sq: int, sk: int, causal: bool) -> int:
    """One past the last key any row of the block [start_m, start_m + block_m) may see."""
    if not causal:
        return sk
    last_row = min(start_m + block_m, sq) - 1
    return max(0, min(sk, last_row + (sk - sq) + 1))


def flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool,
                            block_m: int = 128, block_n: int = 128) -> tuple[Tensor, Tensor]:
    """Algorithm 1 (forward): returns O (B, Sq, H, D) in the inputs' dtype and lse (B, H, Sq)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    Q, K, V = _tiles_source(q, k, v)
    acc_dtype, offset = Q.dtype, sk - sq
    O = torch.empty_like(Q)                                          # (B, Hk, G, Sq, D)
    lse = torch.empty(Q.shape[:-1], dtype=acc_dtype, device=q.device)  # (B, Hk, G, Sq)

    for start_m in range(0, sq, block_m):
        Q_i = Q[..., start_m:start_m + block_m, :]                   # (B, Hk, G, BM, D)
        rows = Q_i.shape[:-1]
        m_i = torch.full(rows, float("-inf"), dtype=acc_dtype, device=q.device)
        l_i = torch.zeros(rows, dtype=acc_dtype, device=q.device)
        acc = torch.zeros_like(Q_i)
        # Causal: blocks entirely above the diagonal are never visited.
        for start_n in range(0, _key_range(start_m, block_m, sq, sk, causal), block_n):
            K_j = K[..., start_n:start_n + block_n, :]               # (B, Hk, 1, BN, D)
            V_j = V[..., start_n:start_n + block_n, :]
            S_ij = _tile_scores(Q_i, K_j, softmax_scale, causal, start_m, start_n, offset)
            m_new = torch.maximum(m_i, S_ij.amax(dim=-1))            # (B, Hk, G, BM)
            # A row that has seen only masked keys keeps m = -inf; subtract 0 instead, so that
            # exp(-inf - (-inf)) never makes a NaN.
            m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
            P_ij = torch.exp(S_ij - m_safe[..., None])               # P~_ij (B, Hk, G, BM, BN)
            alpha = torch.exp(m_i - m_safe)                          # rescale of the old state
            l_i = alpha * l_i + P_ij.sum(dim=-1)
            acc = alpha[..., None] * acc + torch.matmul(P_ij, V_j)
            m_i = m_new
        seen = l_i > 0
        O[..., start_m:start_m + block_m, :] = torch.where(
            seen[..., None], acc / torch.where(seen, l_i, 1.0)[..., None], 0.0)
        lse[..., start_m:start_m + block_m] = torch.where(
            seen, m_i + torch.log(torch.where(seen, l_i, 1.0)), float("inf"))
    return _ungrouped(O).to(q.dtype), lse.reshape(b, h, sq)


def flash_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             lse: Tensor, softmax_scale: float, causal: bool,
                             dlse: Tensor | None = None, block_m: int = 128, block_n: int = 128,
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 2 (backward), recomputing P from Q, K and lse. Returns dq, dk, dv (inputs' dtype).

    The outer loop runs over key blocks, so dK_j and dV_j live in registers in the kernel (here:
    one tile); dQ is summed over key blocks into an fp32 buffer. For GQA, the G query heads of a
    group all add into the same dK_j/dV_j. `dlse` is the gradient flowing into lse, if any:
    d lse / d S = P, so it enters as delta - dlse.
    """
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    Q, K, V = _tiles_source(q, k, v)
    groups, offset, acc_dtype = h // hk, sk - sq, Q.dtype
    dO = _grouped(dout, groups, acc_dtype)                           # (B, Hk, G, Sq, D)
    LSE = lse.to(acc_dtype).reshape(b, hk, groups, sq)               # (B, Hk, G, Sq)
    delta = (dO * _grouped(out, groups, acc_dtype)).sum(dim=-1)      # (B, Hk, G, Sq)
    if dlse is not None:
        delta = delta - dlse.to(acc_dtype).reshape(b, hk, groups, sq)
    dQ = torch.zeros_like(Q)
    dK = torch.empty_like(K)
    dV = torch.empty_like(V)

    for start_n in range(0, sk, block_n):
        K_j = K[..., start_n:start_n + block_n, :]                   # (B, Hk, 1, BN, D)
        V_j = V[..., start_n:start_n + block_n, :]
        dK_j = torch.zeros_like(K_j)
        dV_j = torch.zeros_like(V_j)
        # Causal: the first query that sees key start_n is start_n - offset.
        first_row = max(0, start_n - offset) if causal else 0
        for start_m in range(first_row - first_row % block_m, sq, block_m):
            Q_i = Q[..., start_m:start_m + block_m, :]               # (B, Hk, G, BM, D)
            dO_i = dO[..., start_m:start_m + block_m, :]
            S_ij = _tile_scores(Q_i, K_j, softmax_scale, causal, start_m, start_n, offset)
            P_ij = torch.exp(S_ij - LSE[..., start_m:start_m + block_m, None])  # (B, Hk, G, BM, BN)
            dV_j += torch.matmul(P_ij.transpose(-1, -2), dO_i).sum(dim=2, keepdim=True)
            dP_ij = torch.matmul(dO_i, V_j.transpose(-1, -2))        # (B, Hk, G, BM, BN)
            dS_ij = P_ij * (dP_ij - delta[..., start_m:start_m + block_m, None])
            dK_j += torch.matmul(dS_ij.transpose(-1, -2), Q_i).sum(dim=2, keepdim=True)
            dQ[..., start_m:start_m + block_m, :] += torch.matmul(dS_ij, K_j)
        dK[..., start_n:start_n + block_n, :] = dK_j * softmax_scale
        dV[..., start_n:start_n + block_n, :] = dV_j
    dq = _ungrouped(dQ * softmax_scale).to(q.dtype)
    return dq, _ungrouped(dK).to(k.dtype), _ungrouped(dV).to(v.dtype)
