"""MultiheadAttention: a drop-in for torch.nn.MultiheadAttention over this library's kernels.

It subclasses torch's module, so the constructor, the parameters, their initialisation and the
state_dict keys are torch's own (an existing checkpoint loads with strict=True), and overrides
forward: the same signature, semantics and return values as torch's (F.multi_head_attention_forward's
control flow, step for step), with the attention computed by flash_attn_func, or by
flashattn.scaled_dot_product_attention where torch's is_causal hint applies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashattn.interface import _check_tensor, _is_int, flash_attn_func
from flashattn.ops.capabilities import TRITON
from flashattn.sdpa import scaled_dot_product_attention

Tensor = torch.Tensor


def _check_mask_dtype(name: str, mask: Tensor) -> None:
    _check_tensor(name, mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = not allowed to attend, torch's convention) or a float mask "
                        f"added to the scores, got {mask.dtype}")


def _to_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A torch-convention mask as a float bias: bool True (may not attend) -> -inf, False -> 0; a float
    mask as it is, in `dtype` unless it is float32 (the kernels take a bias of q's dtype or float32)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask if mask.dtype in (dtype, torch.float32) else mask.to(dtype)


def _attention_weights(q: Tensor, k: Tensor, mask: Tensor | None, keep: Tensor | None, dropout_p: float) -> Tensor:
    """softmax(q k^T / sqrt(head_dim) + mask) (N, H, L, S), densely (O(N^2)), differentiable, in q's dtype
    (computed in float32 for 16-bit inputs). `mask`: flash_attn_func's attn_bias (bool: True = may
    attend; float: added); `keep`: dropout's kept entries (the kernel's), whose weights are scaled by
    1 / (1 - dropout_p) while the dropped ones are 0, as torch returns them. A row that may attend to
    no key gives 0."""
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scores = torch.einsum("nlhd,nshd->nhls", q.to(work), k.to(work)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(work)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if keep is not None:
        weights = torch.where(keep, weights / (1.0 - dropout_p), 0.0)
    return weights.to(q.dtype)


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention, with the attention computed by FlashAttention.

    The constructor is torch's (embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None), and so
    are the parameters and state_dict keys: in_proj_weight (3 * embed_dim, embed_dim) when kdim ==
    vdim == embed_dim, else q_proj_weight / k_proj_weight / v_proj_weight; in_proj_bias (3 *
    embed_dim,) when bias; out_proj.weight / out_proj.bias; bias_k / bias_v (1, 1, embed_dim) with
    add_bias_kv. A state_dict of torch.nn.MultiheadAttention loads with strict=True and gives the
    same outputs. This module is an instance of torch.nn.MultiheadAttention.

    Limits beyond torch's: embed_dim / num_heads at most 256 (the kernels' head dims), and dropout
    in [0, 1) (ValueError here). Bad inputs raise ValueError or TypeError naming the observed values
    (torch raises AssertionError or RuntimeError for some of the same). Where torch computes a
    row that may attend to no key at all (every key masked), torch gives NaN on its explicit path;
    this module gives 0 (the library's rule).

    torch.nn.TransformerEncoderLayer's inference fast path reads the weights of its self_attn and
    calls torch's native kernel without calling self_attn.forward: with this module there, that
    path computes the same result with torch's kernel.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None) -> None:
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not (_is_int(value) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        if embed_dim // num_heads > TRITON.max_head_dim:
            raise ValueError(f"head dim = embed_dim / num_heads = {embed_dim} / {num_heads} = "
                             f"{embed_dim // num_heads}: the kernels take head dims up to {TRITON.max_head_dim}; "
                             "use more heads")
        for name, value in (("kdim", kdim), ("vdim", vdim)):
            if value is not None and not (_is_int(value) and value >= 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """torch.nn.MultiheadAttention.forward's signature, semantics and return values.

        Args:
            query: (L, N, E), or (N, L, E) with batch_first, or (L, E) unbatched; E = embed_dim.
            key: (S, N, kdim) / (N, S, kdim) / (S, kdim); value likewise with vdim.
            key_padding_mask: (N, S) or (S,) unbatched. Bool: True = this key is IGNORED (torch's
                convention, the opposite of flashattn.bert_padding's); float: added to the scores.
            need_weights: also return the attention weights. They are computed densely, O(L S) time
                and memory per head (softmax(q k^T / sqrt(head_dim) + masks), differentiable, after
                dropout as torch returns them) beside the fused attention: as with torch, pass
                need_weights=False when the weights are not needed.
            attn_mask: (L, S) or (N * num_heads, L, S) ((num_heads, L, S) unbatched). Bool: True = NOT
                allowed to attend (torch's convention); float: added to the scores (it gets a
                gradient when it requires one). Combined with key_padding_mask as torch does.
            average_attn_weights: return the weights averaged over the heads (N, L, S), else per
                head (N, num_heads, L, S).
            is_causal: torch's hint that attn_mask is the causal mask; it needs attn_mask (ValueError
                without it). As torch does: without key_padding_mask and with need_weights=False the
                mask is dropped and the causal mask (aligned to the top-left corner: query i sees keys
                j <= i) is applied without building it; otherwise attn_mask is used as given.

        Dropout (self.dropout, on the attention probabilities) applies in training mode only.

        Returns:
            (attn_output, attn_weights): attn_output (L, N, E) / (N, L, E) / (L, E), as query;
            attn_weights as described under need_weights and average_attn_weights ((L, S) or
            (num_heads, L, S) unbatched), or None when need_weights=False.
        """
        for name, flag in (("need_weights", need_weights), ("average_attn_weights", average_attn_weights),
                           ("is_causal", is_causal)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        self_attention = query is key and key is value
        # Batch first inside: (N, L, E), (N, S, kdim), (N, S, vdim); key_padding_mask (N, S).
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, tgt_len, embed_dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim

        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is torch's hint that attn_mask is the causal mask: it needs attn_mask "
                             "(torch's rule); build one with torch.nn.Transformer.generate_square_subsequent_mask")
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None              # torch's rule: the hint replaces the mask

        q, k, v = self._project(query, key, value, self_attention)           # (N, L, E), (N, S, E), (N, S, E)
        extra = 0                                                             # key columns appended
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, embed_dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, embed_dim)], dim=1)
            extra += 1
        q = q.view(batch, tgt_len, heads, head_dim)
        k = k.view(batch, k.shape[1], heads, head_dim)
        v = v.view(batch, v.shape[1], heads, head_dim)
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, 1, heads, head_dim)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            extra += 1
        mask = self._combined_mask(attn_mask, key_padding_mask, batch, q.dtype, extra)

        dropout_p = self.dropout if self.training else 0.0
        keep = None
        if causal:
            out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               dropout_p=dropout_p, is_causal=True).transpose(1, 2)
        elif need_weights and dropout_p > 0.0:
            # The kernel's probabilities say which entries its dropout kept (their sign bit is clear).
            out, _, probs = flash_attn_func(q, k, v, dropout_p, attn_bias=mask, return_attn_probs=True)
            keep = ~torch.signbit(probs)
        else:
            out = flash_attn_func(q, k, v, dropout_p, attn_bias=mask)        # (N, L, H, D)
        out = F.linear(out.reshape(batch, tgt_len, embed_dim), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = _attention_weights(q, k, mask, keep, dropout_p)            # (N, H, L, S)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights if batched else weights.squeeze(0)

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool) -> tuple[Tensor, ...]:
        """The input projections, as torch's _in_projection(_packed): one matmul for self-attention."""
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            if self_attention:
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _combined_mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int,
                       dtype: torch.dtype, extra: int) -> Tensor | None:
        """attn_mask and key_padding_mask (torch's conventions) as one attn_bias for flash_attn_func,
        broadcastable to (N, H, L, S + extra), the `extra` appended key columns (bias_k, the zero key)
        open to every query as torch pads them. Both bool: a bool mask, True = may attend (nothing
        float is built); otherwise a float bias, bool masks becoming -inf where True, as torch's
        _canonical_mask does, and the two added."""
        if attn_mask is None and key_padding_mask is None:
            return None
        masks = []
        if attn_mask is not None:                                              # (L, S) or (N * H, L, S)
            masks.append(attn_mask[None, None] if attn_mask.dim() == 2
                         else attn_mask.view(batch, self.num_heads, *attn_mask.shape[1:]))
        if key_padding_mask is not None:                                       # (N, S)
            masks.append(key_padding_mask[:, None, None, :])
        if all(m.dtype == torch.bool for m in masks):
            allowed = ~masks[0] if len(masks) == 1 else ~(masks[0] | masks[1])
            return F.pad(allowed, (0, extra), value=True) if extra else allowed
        biases = [_to_bias(m, dtype) for m in masks]
        bias = biases[0] if len(biases) == 1 else biases[0] + biases[1]
        if bias.dtype not in (dtype, torch.float32):
            bias = bias.to(dtype)
        return F.pad(bias, (0, extra), value=0.0) if extra else bias

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """torch's shape rules (F._mha_shape_check and the checks after it), as ValueError/TypeError
        naming the observed shapes; returns whether the inputs are batched."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            _check_tensor(name, x)
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D (batched: {'(N, L, E)' if self.batch_first else '(L, N, E)'}) or "
                             f"2-D (unbatched: (L, E)), got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key and value must have query's {query.dim()} dims, got shapes {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        for name, x, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.shape[-1] != dim:
                raise ValueError(f"{name}'s last dim must be {dim} (the module's "
                                 f"{'embed_dim' if name == 'query' else name[0] + 'dim'}), got shape {tuple(x.shape)}")
        weight = self.out_proj.weight
        if not (query.dtype == key.dtype == value.dtype == weight.dtype):
            raise TypeError(f"query, key, value must have the parameters' dtype {weight.dtype}, got {query.dtype}, "
                            f"{key.dtype}, {value.dtype}")
        seq_dim, batch_dim = (1, 0) if batched and self.batch_first else (0, 1)
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must agree in their sequence (and batch) dims, got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if batched and key.shape[batch_dim] != query.shape[batch_dim]:
            raise ValueError(f"query and key have different batch sizes: shapes {tuple(query.shape)} and "
                             f"{tuple(key.shape)} (batch_first={self.batch_first})")
        batch = query.shape[batch_dim] if batched else 1
        tgt_len, src_len = query.shape[seq_dim], key.shape[seq_dim]
        if key_padding_mask is not None:
            _check_mask_dtype("key_padding_mask", key_padding_mask)
            expected = (batch, src_len) if batched else (src_len,)
            if tuple(key_padding_mask.shape) != expected:
                layout = "(N, S)" if batched else "(S,)"
                raise ValueError(f"key_padding_mask must have shape {expected} {layout}, got "
                                 f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            _check_mask_dtype("attn_mask", attn_mask)
            shapes = [(tgt_len, src_len), (batch * self.num_heads, tgt_len, src_len)]
            if tuple(attn_mask.shape) not in shapes:
                raise ValueError(f"attn_mask must have shape (L, S) = {shapes[0]} or (N * num_heads, L, S) = "
                                 f"{shapes[1]}, got {tuple(attn_mask.shape)}")
        return batched
