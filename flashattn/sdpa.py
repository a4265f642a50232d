"""torch.nn.functional.scaled_dot_product_attention's signature and semantics over this library's
kernels: a model that calls `F.scaled_dot_product_attention` switches by one import.

A thin layer: torch's (batch, heads, seqlen, headdim) layout is a transposed view of flash-attn's
(batch, seqlen, heads, headdim), so nothing is copied; masks become `attn_bias`, and torch's causal
mask (aligned to the top-left corner) becomes the bottom-right-aligned window that selects the same
keys.
"""
from __future__ import annotations

import math

import torch

from flashattn.interface import _check_tensor, flash_attn_func

Tensor = torch.Tensor


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """softmax(scale * query key^T + mask) value, as torch's function computes it, by FlashAttention.

    Args:
        query: (N..., heads, L, E); key, value: (N..., heads_kv, S, E) (value's head dim must equal E
            here). Any number of leading batch dims N... (none at all, or heads absent too, as torch
            takes them); those of query, key and value broadcast against each other, as do the head
            counts without enable_gqa (one key/value head serves every query head). With
            enable_gqa=True the key and value head counts divide heads: query head h uses key head
            h // (heads // heads_k) and value head h // (heads // heads_v) (torch's rule).
        attn_mask: a bool mask (True = may attend) or a float mask added to the scores, broadcastable
            to (N..., heads, L, S); float masks in query's dtype or float32 get a gradient when they
            require one. Not with is_causal.
        dropout_p: dropout on the attention probabilities, applied whenever it is > 0 (as torch's
            functional form does; pass 0.0 in evaluation).
        is_causal: torch's causal mask, aligned to the TOP-LEFT corner: query i sees keys j <= i
            (flash-attn's `causal` is aligned to the bottom-right corner; the two agree when L == S).
            With L < S this needs an explicit (L, S) bool mask, which is built (O(L S) memory).
        scale: defaults to 1 / sqrt(E).

    A row that may attend to no key gives 0 (as torch's kernels do). Returns (N..., heads, L, E) with
    the broadcast leading dims: for 4-dim inputs of one batch size a transposed view of a contiguous
    (batch, L, heads, E) tensor, or where torch's fused CPU kernel computes it (flash_attn_func's
    Returns), in query's layout: contiguous for contiguous inputs. Inputs whose batch dims are not one
    (batch,) dim are viewed as that where their strides allow, and copied where they do not, or where
    they broadcast (a key with batch 1 against a query with batch 4); key/value head counts that
    differ under enable_gqa are repeated to a common count.
    """
    q, k, v, attn_mask, out_shape = _as_4d(query, key, value, attn_mask, enable_gqa)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    if is_causal and attn_mask is not None:
        raise ValueError("is_causal=True and an attn_mask were both given: pass one (torch's rule)")
    L, S = q.shape[2], k.shape[2]
    window = (-1, -1)
    if is_causal:
        if L >= S:
            # Top-left: j <= i is the bottom-right band j <= i + (S - L) + right with right = L - S.
            window = (-1, L - S)
        else:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                          softmax_scale=scale, window_size=window, attn_bias=attn_mask)
    out = out.transpose(1, 2)
    return out if out_shape is None else out.reshape(out_shape)


def _as_4d(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, enable_gqa: bool,
           ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, tuple[int, ...] | None]:
    """torch's (N..., heads, L, E) inputs as (batch, heads, L, E) ones of one batch and a key/value head
    count that divides the query's, with the mask in four dims; and the output's shape (None: the
    (batch, heads, L, E) one as it is)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, x)
        if x.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (N..., heads, seqlen, headdim), got shape "
                             f"{tuple(x.shape)}")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"value's head dim ({value.shape[-1]}) must equal query's ({query.shape[-1]}) "
                                  "in this implementation")
    if key.shape[-1] != query.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key {tuple(key.shape)} must have query's head dim ({query.shape[-1]}) and value's "
                         f"sequence length ({value.shape[-2]})")
    if (query.dim() == key.dim() == value.dim() == 4 and query.shape[0] == key.shape[0] == value.shape[0]
            and key.shape[1] == value.shape[1] and (query.shape[1] == key.shape[1] or (
                enable_gqa and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0))):
        return query, key, value, attn_mask, None               # the common call: nothing to reshape
    rank = max(x.dim() for x in (query, key, value)) - 2        # leading dims, heads the last of them
    lead = [(1,) * (rank - (x.dim() - 2)) + tuple(x.shape[:-2]) for x in (query, key, value)]
    if rank == 0:
        lead = [(1,), (1,), (1,)]
    batch = _broadcast(*(dims[:-1] for dims in lead))
    if batch is None:
        raise ValueError(f"the batch dims of query {lead[0][:-1]}, key {lead[1][:-1]} and value {lead[2][:-1]} "
                         "do not broadcast")
    heads_q, heads_k, heads_v = (dims[-1] for dims in lead)
    if 0 in (heads_q, heads_k, heads_v):
        raise ValueError(f"query, key and value must have at least one head each, got {heads_q}, {heads_k} and "
                         f"{heads_v} (dim -3)")
    heads = _check_heads(heads_q, heads_k, heads_v, enable_gqa)
    heads_kv = math.lcm(heads_k, heads_v)
    n = math.prod(batch)

    def fold(x: Tensor, dims: tuple[int, ...], h: int) -> Tensor:
        x = x.reshape(*dims, *x.shape[-2:])
        if dims[-1] != h:                 # heads to repeat: 1 by a stride-0 view, else interleaved copies
            x = x.expand(*dims[:-1], h, *x.shape[-2:]) if dims[-1] == 1 else x.repeat_interleave(
                h // dims[-1], dim=-3)
        return x.expand(*batch, h, *x.shape[-2:]).reshape(n, h, *x.shape[-2:])

    q = fold(query, lead[0], heads)
    k, v = fold(key, lead[1], heads_kv), fold(value, lead[2], heads_kv)
    if attn_mask is not None:
        _check_tensor("attn_mask", attn_mask)
        if attn_mask.dim() > len(batch) + 3:
            raise ValueError(f"attn_mask {tuple(attn_mask.shape)} has more dims than the scores "
                             f"{(*batch, heads, q.shape[2], k.shape[2])} it is added to")
        mask = attn_mask.reshape((1,) * (len(batch) + 3 - attn_mask.dim()) + tuple(attn_mask.shape))
        mask_batch = mask.shape[:len(batch)]
        if any(d not in (1, b) for d, b in zip(mask_batch, batch)):
            raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to the scores "
                             f"{(*batch, heads, q.shape[2], k.shape[2])}")
        if all(d == 1 for d in mask_batch):
            attn_mask = mask.reshape(1, *mask.shape[len(batch):])
        else:
            attn_mask = mask.expand(*batch, *mask.shape[len(batch):]).reshape(n, *mask.shape[len(batch):])
    out_lead = (*batch, heads) if query.dim() > 2 or key.dim() > 2 or value.dim() > 2 else ()
    return q, k, v, attn_mask, (*out_lead, query.shape[-2], query.shape[-1])


def _check_heads(heads_q: int, heads_k: int, heads_v: int, enable_gqa: bool) -> int:
    """The output's head count, by torch's rules: with enable_gqa, key and value head counts divide the
    query's; without, the three broadcast (equal, or 1)."""
    if enable_gqa:
        if heads_q % heads_k or heads_q % heads_v:
            raise ValueError(f"enable_gqa=True needs key and value head counts ({heads_k}, {heads_v}) that divide "
                             f"query's ({heads_q})")
        return heads_q
    if heads_q != heads_k and heads_k != 1 and heads_q % heads_k == 0:
        raise ValueError(f"query has {heads_q} heads and key/value {heads_k}: pass enable_gqa=True for grouped-query "
                         "attention (torch's rule)")
    heads = _broadcast((heads_q,), (heads_k,), (heads_v,))
    if heads is None:
        raise ValueError(f"the head counts of query ({heads_q}), key ({heads_k}) and value ({heads_v}) do not "
                         "broadcast: pass equal counts, or enable_gqa=True for grouped-query attention")
    return heads[0]


def _broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of equal-length shapes (each dim equal, or 1), None if they do not broadcast. (Not
    torch.broadcast_shapes: at 20 us a call it would be a tenth of a short call's host time.)"""
    out = []
    for dims in zip(*shapes):
        sizes = set(dims) - {1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)
