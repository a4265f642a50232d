"""The attention kernels as PyTorch custom operators, with fake (meta) implementations and autograd.

Registering them with torch.library lets torch.compile(fullgraph=True) trace through a model that
calls flashattn without graph breaks, and keeps autograd in one place: the forward saves what the
backward needs (Q, K, V, O, lse) and nothing more. Validation happens before this layer
(flashattn/interface.py); launch details after it (flashattn/ops/dispatch.py).
"""
from __future__ import annotations

import torch

from flashattn.ops import dispatch

Tensor = torch.Tensor


@torch.library.custom_op("flashattn::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    return dispatch.forward(q, k, v, softmax_scale, causal, backend)


@attention_forward.register_fake
def _(q, k, v, softmax_scale, causal, backend):
    batch, seqlen_q, nheads, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, nheads, seqlen_q), dtype=dispatch.lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("flashattn::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       dlse: Tensor | None, softmax_scale: float, causal: bool, backend: str,
                       ) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.backward(dout, q, k, v, out, lse, dlse, softmax_scale, causal, backend)


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, dlse, softmax_scale, causal, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale, ctx.causal, ctx.backend = softmax_scale, causal, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, dlse, ctx.softmax_scale, ctx.causal,
                                    ctx.backend)
    return dq, dk, dv, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)
