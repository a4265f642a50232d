"""torch.nn.functional.scaled_dot_product_attention's signature and semantics over this library's
kernels: a model that calls `F.scaled_dot_product_attention` switches by one import.

A thin layer: torch's (batch, heads, seqlen, headdim) layout is a transposed view of flash-attn's
(batch, seqlen, heads, headdim), so nothing is copied; masks become `attn_bias`, and torch's causal
mask (aligned to the top-left corner) becomes the bottom-right-aligned window that selects the same
keys.
"""
from __future__ import annotations

import torch

from flashattn.interface import _check_tensor, flash_attn_func

Tensor = torch.Tensor


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """softmax(scale * query key^T + mask) value, as torch's function computes it, by FlashAttention.

    Args:
        query: (batch, heads, L, E); key, value: (batch, heads_kv, S, E) (value's head dim must equal
            E here). heads_kv == heads, or with enable_gqa=True a divisor of it (query head h uses
            key/value head h // (heads // heads_kv)).
        attn_mask: a bool mask (True = may attend) or a float mask added to the scores, broadcastable
            to (batch, heads, L, S); float masks in query's dtype or float32 get a gradient when they
            require one. Not with is_causal.
        dropout_p: dropout on the attention probabilities, applied whenever it is > 0 (as torch's
            functional form does; pass 0.0 in evaluation).
        is_causal: torch's causal mask, aligned to the TOP-LEFT corner: query i sees keys j <= i
            (flash-attn's `causal` is aligned to the bottom-right corner; the two agree when L == S).
            With L < S this needs an explicit (L, S) bool mask, which is built (O(L S) memory).
        scale: defaults to 1 / sqrt(E).

    A row that may attend to no key gives 0 (as torch's kernels do). Returns (batch, heads, L, E), a
    transposed view of a contiguous (batch, L, heads, E) tensor, or where torch's fused CPU kernel
    computes it (flash_attn_func's Returns), in query's layout: contiguous for contiguous inputs.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (batch, heads, seqlen, headdim), got shape {tuple(x.shape)}")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"value's head dim ({value.shape[-1]}) must equal query's ({query.shape[-1]}) "
                                  "in this implementation")
    heads, heads_kv = query.shape[1], key.shape[1]
    if heads != heads_kv and not enable_gqa:
        raise ValueError(f"query has {heads} heads and key/value {heads_kv}: pass enable_gqa=True for grouped-query "
                         "attention (torch's rule)")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    if is_causal and attn_mask is not None:
        raise ValueError("is_causal=True and an attn_mask were both given: pass one (torch's rule)")
    L, S = query.shape[2], key.shape[2]
    window = (-1, -1)
    if is_causal:
        if L >= S:
            # Top-left: j <= i is the bottom-right band j <= i + (S - L) + right with right = L - S.
            window = (-1, L - S)
        else:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
    out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=dropout_p,
                          softmax_scale=scale, window_size=window, attn_bias=attn_mask)
    return out.transpose(1, 2)
