"""Autograd for attention, and the kernels as PyTorch custom operators for graph capture.

`attention` is the one entry point: a thin torch.autograd.Function whose forward saves what the
backward needs (Q, K, V, O, lse, and the option tensors: ALiBi slopes, the dropout seed, the bias or
mask, the block mask) and nothing more; with dropout the backward regenerates the mask from the
seed. Validation happens before this layer (flashattn/interface.py); the options are packed into
one Variant after it (flashattn/ops/dispatch.py).

Under torch.compile, or any tracing or dispatch mode (make_fx, FakeTensorMode, FlopCounterMode), or
with tensor subclasses, the function calls the registered custom operators `flashattn::attention_
forward` / `attention_backward`, which have fake (meta) implementations, so torch.compile(fullgraph=
True) traces a model that calls flashattn without graph breaks. In plain eager mode it calls the
backend directly: a custom operator's dispatch, and torch.library's autograd layer (which rebuilds
the schema's argument list for every argument), cost the host more per call than a short kernel
takes on the GPU (benchmarks/TUNING.md, § host-cost). The operator's O is contiguous, as its fake
declares; in eager mode O keeps the backend's layout, which on torch's fused CPU kernel is q's when
q is dense (flashattn/ops/cpu.py): the two differ in strides only.

Both operators take the options as the same explicit arguments, in this order (VARIANT_ARGS):
causal, window_left, window_right, softcap, alibi_slopes, dropout_p, seed, attn_bias, block_mask,
kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_size, deterministic, cu_seqlens_q,
cu_seqlens_k, max_seqlen_q, max_seqlen_k, tile_size. attn_bias is a float
bias or a bool mask, 4-dim and broadcastable to (B, H, Sq, Sk) (never expanded); seed is an int64
scalar tensor on the CPU (None without dropout); the block-mask tensors are those of a
flashattn.BlockMask (None without one); cu_seqlens_q/k (int32, None when dense) and max_seqlen_q/k
(0 when dense) describe packed sequences, and tile_size (0: the tables) the caller's square tiles
(flashattn/ops/variant.py).
"""
from __future__ import annotations

import torch

from flashattn.ops import dispatch

Tensor = torch.Tensor

VARIANT_ARGS = ("causal", "window_left", "window_right", "softcap", "alibi_slopes", "dropout_p", "seed",
                "attn_bias", "block_mask", "kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices",
                "block_size", "deterministic", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                "tile_size")
_ATTN_BIAS = VARIANT_ARGS.index("attn_bias")
# The options that are tensors (or None): what the autograd.Function saves for the backward.
_TENSOR_ARGS = tuple(VARIANT_ARGS.index(name) for name in (
    "alibi_slopes", "seed", "attn_bias", "block_mask", "kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices",
    "cu_seqlens_q", "cu_seqlens_k"))


def _run_forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *options_and_backend,
                 ) -> tuple[Tensor, Tensor]:
    *options, backend = options_and_backend
    variant = dispatch.make_variant(q.shape[0], q.shape[2], *options)
    return dispatch.forward(q, k, v, softmax_scale, variant, backend)


def _run_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  dlse: Tensor | None, softmax_scale: float, *options_bias_grad_backend,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    *options, bias_grad, backend = options_bias_grad_backend
    variant = dispatch.make_variant(q.shape[0], q.shape[2], *options)
    return dispatch.backward(dout, q, k, v, out, lse, dlse, softmax_scale, variant, bias_grad, backend)


@torch.library.custom_op("flashattn::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool,
                      window_left: int, window_right: int, softcap: float, alibi_slopes: Tensor | None,
                      dropout_p: float, seed: Tensor | None, attn_bias: Tensor | None,
                      block_mask: Tensor | None, kv_num_blocks: Tensor | None, kv_indices: Tensor | None,
                      q_num_blocks: Tensor | None, q_indices: Tensor | None, block_size: int,
                      deterministic: bool, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
                      max_seqlen_q: int, max_seqlen_k: int, tile_size: int, backend: str,
                      ) -> tuple[Tensor, Tensor]:
    """O (B, Sq, H, D) and lse (B, H, Sq), both contiguous: the layout the fake implementation declares,
    which inductor compiles the graph around (an eager call keeps the backend's O: dispatch.forward)."""
    out, lse = _run_forward(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                            dropout_p, seed, attn_bias, block_mask, kv_num_blocks, kv_indices, q_num_blocks,
                            q_indices, block_size, deterministic, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, tile_size, backend)
    return out.contiguous(), lse


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
                       deterministic: bool, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
                       max_seqlen_q: int, max_seqlen_k: int, tile_size: int, bias_grad: bool, backend: str,
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv and dbias (attn_bias's shape; an empty tensor unless bias_grad)."""
    dq, dk, dv, dbias = _run_backward(dout, q, k, v, out, lse, dlse, softmax_scale, causal, window_left,
                                      window_right, softcap, alibi_slopes, dropout_p, seed, attn_bias,
                                      block_mask, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
                                      block_size, deterministic, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, tile_size, bias_grad, backend)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, dlse, softmax_scale, causal, window_left, window_right, softcap,
      alibi_slopes, dropout_p, seed, attn_bias, block_mask, kv_num_blocks, kv_indices, q_num_blocks,
      q_indices, block_size, deterministic, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      tile_size, bias_grad, backend):
    dbias = attn_bias.new_empty(attn_bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


@torch.library.custom_op("flashattn::kv_cache_attention", mutates_args=("k_cache", "v_cache"))
def kv_cache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None, v: Tensor | None,
                       rotary_cos: Tensor | None, rotary_sin: Tensor | None, cache_seqlens: Tensor | None,
                       cache_seqlen: int, cache_leftpad: Tensor | None, cache_batch_idx: Tensor | None, block_table: Tensor | None,
                       softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                       alibi_slopes: Tensor | None, rotary_interleaved: bool, num_splits: int, backend: str,
                       ) -> tuple[Tensor, Tensor]:
    """flash_attn_with_kvcache below validation: appends to k_cache/v_cache in place, then attends
    (dispatch.kv_cache_forward). No gradient: an inference operator."""
    return dispatch.kv_cache_forward(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                     cache_seqlen, cache_leftpad, cache_batch_idx, block_table, softmax_scale, causal,
                                     window_left, window_right, softcap, alibi_slopes, rotary_interleaved,
                                     num_splits, backend)


@kv_cache_attention.register_fake
def _(q, k_cache, v_cache, *rest):
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=dispatch.lse_dtype(q.dtype))


def kv_cache(q: Tensor, *args) -> tuple[Tensor, Tensor]:
    """The cache operator: the registered custom operator when traced, dispatch directly in eager."""
    op = kv_cache_attention if _traced(q) else dispatch.kv_cache_forward
    return op(q, *args)


def _traced(q: Tensor) -> bool:
    """Whether the call must appear as the custom operators (see the module docstring)."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or type(q) is not torch.Tensor)


def _forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *options_and_backend):
    op = attention_forward if _traced(q) else _run_forward
    return op(q, k, v, softmax_scale, *options_and_backend)


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
              softmax_scale: float, *options_bias_grad_backend):
    op = attention_backward if _traced(q) else _run_backward
    return op(dout, q, k, v, out, lse, dlse, softmax_scale, *options_bias_grad_backend)


class _Attention(torch.autograd.Function):
    """Saves and restores; the work is in dispatch (eager) or the custom operators (traced). Only the
    differentiable tensors are arguments of their own; everything else travels in one tuple `call`
    (softmax_scale, VARIANT_ARGS..., backend), since apply's cost grows with its argument count."""

    @staticmethod
    def forward(ctx, q, k, v, attn_bias, call):
        softmax_scale, *options, backend = call
        out, lse = _forward(q, k, v, *call)
        tensors = [i for i in _TENSOR_ARGS if options[i] is not None]
        ctx.save_for_backward(q, k, v, out, lse, *(options[i] for i in tensors))
        ctx.tensor_positions = tensors
        # ctx keeps no tensor outside save_for_backward. (A new list: torch 2.11's dynamo takes the
        # starred `options` above for a tuple and cannot trace item assignment into it.)
        ctx.options = [None if i in tensors else value for i, value in enumerate(options)] if tensors else options
        ctx.softmax_scale, ctx.backend = softmax_scale, backend
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        options = list(ctx.options)
        for i, value in zip(ctx.tensor_positions, saved):
            options[i] = value
        if dout is None:
            dout = torch.zeros_like(out)
        bias_grad = bool(ctx.needs_input_grad[3])
        dq, dk, dv, dbias = _backward(dout, q, k, v, out, lse, dlse, ctx.softmax_scale, *options, bias_grad,
                                      ctx.backend)
        return dq, dk, dv, dbias if bias_grad else None, None


def attention(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, *options_and_backend,
              ) -> tuple[Tensor, Tensor]:
    """O (B, Sq, H, D) and lse (B, H, Sq), differentiable in q, k, v and a float attn_bias; the
    arguments are the custom operators' (VARIANT_ARGS, then the backend name)."""
    attn_bias = options_and_backend[_ATTN_BIAS]
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
            attn_bias is not None and attn_bias.requires_grad))) and not torch._C._are_functorch_transforms_active():
        # Nothing to differentiate: the autograd.Function's apply, context and saved tensors would only
        # cost host time (its forward computes the same).
        return _forward(q, k, v, softmax_scale, *options_and_backend)
    # One tensor given as two of q, k, v: torch.compile refuses an autograd.Function that receives the
    # same tensor twice; distinct views of it are the same values (and gradients add up as before).
    if k is q or v is q or v is k:
        k = k.view_as(k) if k is q else k
        v = v.view_as(v) if v is q or v is k else v
    return _Attention.apply(q, k, v, attn_bias, (softmax_scale, *options_and_backend))
