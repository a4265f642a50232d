"""torch's own fused CPU attention, for the calls whose every rule it follows exactly.

The PyTorch path (reference.py) is the readable algorithm and implements every option; for a plain
call on the CPU, torch's fused flash-attention kernel (`aten::_scaled_dot_product_flash_attention_
for_cpu`, vectorised and multithreaded, forward and backward) computes the same softmax(scale q k^T)
v with the same saved log-sum-exp, several times faster. `applies` says when it serves a call; the
rest, and float64 (the high-precision check of the algorithm itself), stay on reference.py.

Its conventions, and why each condition below keeps them equal to ours (variant.py):
    causal     top-left aligned in torch, bottom-right here: the same when seqlen_q == seqlen_k
    empty rows none: without a mask every row sees a key (seqlen_k >= 1 reaches here)
    lse        natural log, float32, (B, H, Sq): the layout the backward receives
    layouts    (B, H, S, D): our (B, S, H, D) tensors go as transposed views, nothing is copied. It
               allocates O as torch.empty_like(q) would (q's own layout when q is dense, as are the
               SDPA drop-in's transposed (B, H, S, D) tensors; contiguous otherwise), and O is
               returned in that layout; the custom operator makes it contiguous, the layout its
               fake declares (custom_ops.py), so eager and traced calls differ only in O's strides.
               Its gradients come back contiguous. GQA is native (fewer K/V heads)
    dlse       its backward takes no gradient of the lse (return_attn_probs' lse used in a loss)
    NaN, inf   it does not propagate them as variant.py requires (an inf in q can leave a row finite):
               inputs that are not all finite take reference.py. The test is one float32 sum per
               input, read as a Python float (a NaN or inf makes it non-finite; a finite input whose
               sum overflows, at ~1e38, merely takes the slower path): one vectorised pass instead
               of isfinite's five, and float32 accumulation, so a 16-bit input's sum cannot overflow
               where the input itself is finite. The backward tests q, k, v again (with dout): which
               path the forward took is not saved, and a finite O and lse do not imply finite
               inputs (an inf in k that sends every score of its key to -inf leaves them finite,
               and makes dQ NaN)
"""
from __future__ import annotations

import math

import torch

from flashattn.ops.variant import Variant

Tensor = torch.Tensor
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def applies(q: Tensor, k: Tensor, variant: Variant, *finite: Tensor, dlse: Tensor | None = None) -> bool:
    """Whether torch's fused CPU kernel computes this call exactly as specified; `finite` are the
    tensors that must hold no NaN or inf for that (the inputs, and dout in the backward)."""
    return (q.device.type == "cpu" and q.dtype in DTYPES and variant.is_plain and not variant.deterministic
            and not variant.tile_size
            and (not variant.causal or q.shape[1] == k.shape[1]) and dlse is None
            and all(math.isfinite(x.sum(dtype=torch.float32).item()) for x in finite))


def forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """O (B, Sq, H, D) in the layout torch.empty_like(q) gives (see the module docstring) and lse
    (B, H, Sq) float32 contiguous."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=softmax_scale)
    return out.transpose(1, 2), lse.contiguous()    # torch's lse is (B, Sq, H) in memory


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, softmax_scale: float,
             causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv in the inputs' (B, S, H, D) shapes."""
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        lse, 0.0, causal, scale=softmax_scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
