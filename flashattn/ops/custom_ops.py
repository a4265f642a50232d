"""The attention kernels as PyTorch custom operators, with fake (meta) implementations and autograd.

Registering them with torch.library lets torch.compile(fullgraph=True) trace through a model that
calls flashattn without graph breaks, and keeps autograd in one place: the forward saves what the
backward needs (Q, K, V, O, lse, and the option tensors: ALiBi slopes, the dropout seed, the bias or
mask, the block mask) and nothing more; with dropout the backward regenerates the mask from the
seed. Validation happens before this layer (flashattn/interface.py); the options are packed into
one Variant after it (flashattn/ops/dispatch.py).

Both operators take the options as the same explicit arguments, in this order (VARIANT_ARGS):
causal, window_left, window_right, softcap, alibi_slopes, dropout_p, seed, attn_bias, block_mask,
kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_size, deterministic. attn_bias is a float
bias or a bool mask, 4-dim and broadcastable to (B, H, Sq, Sk) (never expanded); seed is an int64
scalar tensor on the CPU (None without dropout); the block-mask tensors are those of a
flashattn.BlockMask (None without one).
"""
from __future__ import annotations

import torch

from flashattn.ops import dispatch

Tensor = torch.Tensor

VARIANT_ARGS = ("causal", "window_left", "window_right", "softcap", "alibi_slopes", "dropout_p", "seed",
                "attn_bias", "block_mask", "kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices",
                "block_size", "deterministic")
_ATTN_BIAS = 4 + VARIANT_ARGS.index("attn_bias")   # its position among the forward's inputs


@torch.library.custom_op("flashattn::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool,
                      window_left: int, window_right: int, softcap: float, alibi_slopes: Tensor | None,
                      dropout_p: float, seed: Tensor | None, attn_bias: Tensor | None,
                      block_mask: Tensor | None, kv_num_blocks: Tensor | None, kv_indices: Tensor | None,
                      q_num_blocks: Tensor | None, q_indices: Tensor | None, block_size: int,
                      deterministic: bool, backend: str) -> tuple[Tensor, Tensor]:
    variant = dispatch.make_variant(
        q.shape[0], q.shape[2], causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
        seed, attn_bias, block_mask, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_size,
        deterministic)
    return dispatch.forward(q, k, v, softmax_scale, variant, backend)


@attention_forward.register_fake
def _(q, k, v, softmax_scale, *options_and_backend):
    batch, seqlen_q, nheads, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, nheads, seqlen_q), dtype=dispatch.lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("flashattn::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       dlse: Tensor | None, softmax_scale: float, causal: bool, window_left: int,
                       window_right: int, softcap: float, alibi_slopes: Tensor | None, dropout_p: float,
                       seed: Tensor | None, attn_bias: Tensor | None, block_mask: Tensor | None,
                       kv_num_blocks: Tensor | None, kv_indices: Tensor | None,
                       q_num_blocks: Tensor | None, q_indices: Tensor | None, block_size: int,
                       deterministic: bool, bias_grad: bool, backend: str,
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv and dbias (attn_bias's shape; an empty tensor unless bias_grad)."""
    variant = dispatch.make_variant(
        q.shape[0], q.shape[2], causal, window_left, window_right, softcap, alibi_slopes, dropout_p,
        seed, attn_bias, block_mask, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_size,
        deterministic)
    dq, dk, dv, dbias = dispatch.backward(dout, q, k, v, out, lse, dlse, softmax_scale, variant,
                                          bias_grad, backend)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, dlse, softmax_scale, causal, window_left, window_right, softcap,
      alibi_slopes, dropout_p, seed, attn_bias, block_mask, kv_num_blocks, kv_indices, q_num_blocks,
      q_indices, block_size, deterministic, bias_grad, backend):
    dbias = attn_bias.new_empty(attn_bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, *options, backend = inputs
    out, lse = output
    options = dict(zip(VARIANT_ARGS, options))
    ctx.tensor_names = [name for name, value in options.items() if isinstance(value, torch.Tensor)]
    ctx.save_for_backward(q, k, v, out, lse, *(options[name] for name in ctx.tensor_names))
    ctx.options = {name: None if name in ctx.tensor_names else value for name, value in options.items()}
    ctx.softmax_scale, ctx.backend = softmax_scale, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *saved = ctx.saved_tensors
    options = dict(ctx.options, **dict(zip(ctx.tensor_names, saved)))
    if dout is None:
        dout = torch.zeros_like(out)
    bias_grad = bool(ctx.needs_input_grad[_ATTN_BIAS])
    dq, dk, dv, dbias = attention_backward(dout, q, k, v, out, lse, dlse, ctx.softmax_scale,
                                           *(options[name] for name in VARIANT_ARGS), bias_grad,
                                           ctx.backend)
    grads = [None] * (4 + len(VARIANT_ARGS) + 1)
    grads[:3] = dq, dk, dv
    if bias_grad:
        grads[_ATTN_BIAS] = dbias
    return tuple(grads)


attention_forward.register_autograd(_backward, setup_context=_setup_context)
