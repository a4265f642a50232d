"""Autograd for attention, and the kernels as PyTorch custom operators for graph capture.

`attention` is the one entry point: a thin torch.autograd.Function whose forward saves what the
backward needs (Q, K, V, O, lse, and the option tensors: ALiBi slopes, the dropout seed, the bias or
mask, the block mask) and nothing more; with dropout the backward regenerates the mask from the
seed. Validation happens before this layer (flashattn/interface.py); the options are packed into
one Variant after it (flashattn/ops/dispatch.py). Under torch.func's transforms (vmap, grad, jacrev)
the same function in the form those need, with vmap rules for the forward and the backward
(_AttentionTransformed, _AttentionBackward).

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


def _save(ctx, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, call: tuple) -> None:
    softmax_scale, *options, backend = call
    tensors = [i for i in _TENSOR_ARGS if options[i] is not None]
    ctx.save_for_backward(q, k, v, out, lse, *(options[i] for i in tensors))
    ctx.tensor_positions = tensors
    # ctx keeps no tensor outside save_for_backward. (A new list: torch 2.11's dynamo takes the
    # starred `options` above for a tuple and cannot trace item assignment into it.)
    ctx.options = [None if i in tensors else value for i, value in enumerate(options)] if tensors else options
    ctx.softmax_scale, ctx.backend = softmax_scale, backend
    ctx.set_materialize_grads(False)


def _grads(ctx, dout: Tensor | None, dlse: Tensor | None) -> tuple:
    q, k, v, out, lse, *saved = ctx.saved_tensors
    options = list(ctx.options)
    for i, value in zip(ctx.tensor_positions, saved):
        options[i] = value
    if dout is None:
        dout = torch.zeros_like(out)
    bias_grad = bool(ctx.needs_input_grad[3])
    if torch._C._are_functorch_transforms_active():
        # torch.func's transforms (vmap of grad: per-sample gradients) run this backward on their
        # wrapped tensors, which no kernel takes: an operation of its own, with its own vmap rule.
        bias, options[_ATTN_BIAS] = options[_ATTN_BIAS], None       # an argument of its own: vmap maps it
        dq, dk, dv, dbias = _AttentionBackward.apply(dout, q, k, v, out, lse, dlse, bias,
                                                     (ctx.softmax_scale, *options, ctx.backend), bias_grad)
    else:
        dq, dk, dv, dbias = _backward(dout, q, k, v, out, lse, dlse, ctx.softmax_scale, *options, bias_grad,
                                      ctx.backend)
    return dq, dk, dv, dbias if bias_grad else None, None


class _Attention(torch.autograd.Function):
    """Saves and restores; the work is in dispatch (eager) or the custom operators (traced). Only the
    differentiable tensors are arguments of their own; everything else travels in one tuple `call`
    (softmax_scale, VARIANT_ARGS..., backend), since apply's cost grows with its argument count."""

    @staticmethod
    def forward(ctx, q, k, v, attn_bias, call):
        out, lse = _forward(q, k, v, *call)
        _save(ctx, q, k, v, out, lse, call)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, dlse)


class _AttentionTransformed(torch.autograd.Function):
    """_Attention as torch.func's transforms need it (torch.vmap, torch.func.grad, jacrev: per-sample
    gradients, say): a forward without ctx, setup_context, and a vmap rule. A class of its own because
    apply binds a setup_context function's arguments by signature, a cost the eager path skips.
    Attention is independent per batch entry, so vmap folds its dimension into the batch."""

    @staticmethod
    def forward(q, k, v, attn_bias, call):
        return _forward(q, k, v, *call)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, call = inputs
        _save(ctx, q, k, v, *output, call)

    @staticmethod
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, dlse)

    @staticmethod
    def vmap(info, in_dims, q, k, v, attn_bias, call):
        """(V, B, ...) inputs as (V * B, ...) ones: the mapped dim folded into the batch (an unmapped q,
        k or v expanded to it first, which copies what the V calls share). The option tensors stay per
        call: packed sequences and block masks, whose tensors are per batch entry, are refused."""
        size, batch = info.batch_size, _vmapped_batch(q, in_dims[0])
        bias = _fold(attn_bias, in_dims[3], size, batch, shared=True)
        out, lse = _AttentionTransformed.apply(_fold(q, in_dims[0], size, batch), _fold(k, in_dims[1], size, batch),
                                               _fold(v, in_dims[2], size, batch), bias,
                                               _vmapped_call(call, in_dims[4], size, bias))
        return (_unfold(out, size), _unfold(lse, size)), (0, 0)


class _AttentionBackward(torch.autograd.Function):
    """_Attention's backward as an operation of its own, called only under torch.func's transforms: its
    vmap rule folds the mapped dim into the batch, as _Attention's does for the forward. Its own
    backward (a second derivative) is not implemented."""

    @staticmethod
    def forward(dout, q, k, v, out, lse, dlse, attn_bias, call, bias_grad):
        softmax_scale, *options, backend = call
        options[_ATTN_BIAS] = attn_bias
        return _backward(dout, q, k, v, out, lse, dlse, softmax_scale, *options, bias_grad, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("flashattn's attention has no second derivative (its backward is not "
                                  "differentiable)")

    @staticmethod
    def vmap(info, in_dims, dout, q, k, v, out, lse, dlse, attn_bias, call, bias_grad):
        """Each mapped call's gradients: every input folded into the batch, an unmapped one expanded
        (so that k's gradient, say, comes back per mapped call, as vmap returns it)."""
        size, batch = info.batch_size, _vmapped_batch(q, in_dims[1])
        folded = [_fold(x, d, size, batch) for x, d in zip((dout, q, k, v, out, lse, dlse), in_dims[:7])]
        dq, dk, dv, dbias = _AttentionBackward.apply(
            *folded, _fold(attn_bias, in_dims[7], size, batch, shared=not bias_grad),
            _vmapped_call(call, in_dims[8], size, None), bias_grad)
        return (tuple(_unfold(x, size) for x in (dq, dk, dv, dbias)), (0, 0, 0, None if dbias is None else 0))


def _vmapped_batch(x: Tensor, dim: int | None) -> int:
    return x.shape[1] if dim is not None else x.shape[0]


def _vmapped_call(call: tuple, option_dims, size: int, bias: Tensor | None) -> tuple:
    """The options of a call whose batch the vmap rules multiply by `size`, with the folded bias; refused
    where they are mapped or are per batch entry in a way folding cannot keep (packed sequences, block
    masks)."""
    bias_dim = 1 + _ATTN_BIAS                       # the bias is folded as an argument of its own
    if option_dims is not None and any(d is not None for i, d in enumerate(option_dims) if i != bias_dim):
        raise NotImplementedError("torch.vmap over flashattn's option tensors (alibi_slopes, block_mask, "
                                  "cu_seqlens): map over q, k, v and attn_bias only")
    softmax_scale, *options, backend = call
    if options[VARIANT_ARGS.index("cu_seqlens_q")] is not None or options[VARIANT_ARGS.index("block_mask")] \
            is not None:
        raise NotImplementedError("torch.vmap over packed sequences (varlen) or a block mask is not supported: "
                                  "call with the mapped calls as a batch instead")
    alibi = VARIANT_ARGS.index("alibi_slopes")
    if options[alibi] is not None and options[alibi].dim() == 2:      # (B, H): one row per batch entry
        options[alibi] = options[alibi].repeat(size, 1)
    options[_ATTN_BIAS] = bias
    return (softmax_scale, *options, backend)


def _fold(x: Tensor | None, dim: int | None, size: int, batch: int, shared: bool = False) -> Tensor | None:
    """x (mapped at `dim`, or unmapped) as (size * batch, ...): the mapped dim in front, folded into the
    batch dim (of `batch` entries, or 1 for a bias broadcast over them). `shared`: an unmapped x of batch
    1 stays as it is, broadcast over every entry (a bias that needs no gradient)."""
    if x is None or (dim is None and shared and x.shape[0] == 1):
        return x
    x = x.movedim(dim, 0) if dim is not None else x.expand(size, *x.shape)
    if x.shape[1] != batch:                       # a bias's batch of 1: one per entry
        x = x.expand(size, batch, *x.shape[2:])
    return x.reshape(size * batch, *x.shape[2:])


def _unfold(x: Tensor | None, size: int) -> Tensor | None:
    return None if x is None else x.view(size, x.shape[0] // size, *x.shape[1:])


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
    function = _AttentionTransformed if torch._C._are_functorch_transforms_active() else _Attention
    return function.apply(q, k, v, attn_bias, (softmax_scale, *options_and_backend))
