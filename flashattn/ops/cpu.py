"""torch's own fused CPU attention, for the calls whose every rule it follows exactly.

The PyTorch path (reference.py) is the readable algorithm and implements every option; for a plain
call on the CPU, torch's fused flash-attention kernel (`aten::_scaled_dot_product_flash_attention_
for_cpu`, vectorised and multithreaded, forward and backward) computes the same softmax(scale q k^T)
v with the same saved log-sum-exp, several times faster. `applies` says which calls it may serve; the
rest, and float64 (the high-precision check of the algorithm itself), stay on reference.py. `forward`
and `backward` return None where the inputs' values (NaN, inf) make its result differ from ours: the
caller then takes reference.py.

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

NaN and inf. With finite inputs its results are ours (up to rounding); with a NaN or inf in them they
may not be: a row whose every score is -inf (an inf in q, or in k where a causal row sees one key) gets
O = 0 and lse = 0 there, O = 0 and lse = +inf here, and where a NaN or inf meets an exact zero inside a
tile (0 * inf in P V or dS K), which rows and keys turn NaN depends on the tiles, and its tiles are not
reference.py's. So it serves only calls it provably computes as reference.py does, and the test costs
as few passes over the inputs as that allows. "finite" below is one float32 sum of the tensor, read as
a Python float: a NaN or inf makes it non-finite, and one vectorised pass is cheaper than isfinite's
several (float32 accumulation, so a 16-bit input's sum cannot overflow where the input is finite; a
finite input whose sum overflows, at ~1e38, merely takes the slower test or path). "lse clean": no
lse is NaN, +-inf or 0 (one pass over lse, (B, H, Sq), not over the inputs).

Forward: after the kernel, v finite and lse clean; a call that fails that test is served still when
q, k and v are finite (an lse of exactly 0 is legitimate, and finite inputs whose scores overflow
are the kernel's as before), and otherwise takes reference.py. Why a finite v and a clean lse imply
our result:
  - q is finite. A NaN or inf in row i of q makes every score of row i non-finite (its product with
    any key entry is +-inf or NaN, and so is any sum holding one). Then either some score of the row
    is NaN or +inf, and the kernel's max or sum of the row, and so its lse, is NaN or +inf; or every
    score is -inf, and the kernel marks the row empty: lse = 0. Neither is clean.
  - a NaN or inf in key j of k makes the score of j non-finite in every row that sees j. A NaN or +inf
    there leaves that row's lse NaN or +inf, as above; so with a clean lse the score of j is -inf in
    every row that sees it, each of which also has a finite score (else it is empty: lse = 0). Key j
    then weighs exp(-inf - m) = 0 against a finite row max m, in the kernel as in reference.py (a -inf
    score is how both mask): both compute attention over the other keys, from finite q, v and those
    keys' entries of k: the finite case, whose results agree.
Backward: k, v and dout finite and lse clean (the forward's lse, of these q and k, from either path:
reference.py's lse of a row with a NaN or inf in q is NaN or +inf too), which implies a finite q as
above; failing that, q, k, v and dout finite. Finite inputs (and the forward's finite O and lse) are
the case where its gradients are ours. k is tested itself: a key masked by -inf scores leaves the
forward clean, but its dS = 0 meets the inf in dS K (dQ is NaN, over each implementation's own tiles).
"""
from __future__ import annotations

import math

import torch

from flashattn.ops.variant import CAUSAL, PLAIN, Variant

Tensor = torch.Tensor
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def applies(q: Tensor, k: Tensor, variant: Variant, dlse: Tensor | None = None) -> bool:
    """Whether torch's fused CPU kernel may serve this call: device, dtype and options (the values
    are tested by forward and backward)."""
    if q.device.type != "cpu" or q.dtype not in DTYPES or dlse is not None:
        return False
    if variant is PLAIN:        # make_variant's plain calls: no new Variant, nothing to look into
        return True
    if variant is not CAUSAL and not (variant.is_plain and not variant.deterministic and not variant.tile_size):
        return False
    return not variant.causal or q.shape[1] == k.shape[1]


def _sum(x: Tensor) -> float:
    return x.sum(dtype=torch.float32).item()


def _lse_term(lse: Tensor) -> float:
    """sum(1 / lse + lse) over a contiguous lse: +-inf or NaN exactly when some lse is NaN, +-inf or 0
    (or so near 0 that 1 / lse overflows; or the sum itself overflows, at ~1e38: the slower test)."""
    flat = lse.view(-1)
    return flat.reciprocal().add_(flat).sum().item()


def _finite(*tensors: Tensor) -> bool:
    return all(math.isfinite(_sum(x)) for x in tensors)


def forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool) -> tuple[Tensor, Tensor] | None:
    """O (B, Sq, H, D) in the layout torch.empty_like(q) gives (see the module docstring) and lse
    (B, H, Sq) float32 contiguous; None where NaN or inf in the inputs need reference.py."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=softmax_scale)
    lse = lse.contiguous()      # torch's lse is (B, Sq, H) in memory
    # v finite and lse clean (one Python float: a non-finite term makes the sum non-finite), else the
    # inputs finite. A NaN or inf in v wastes this kernel call; finite calls need one test fewer.
    if not math.isfinite(_sum(v) + _lse_term(lse)) and not _finite(q, k, v):
        return None
    return out.transpose(1, 2), lse


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, softmax_scale: float,
             causal: bool) -> tuple[Tensor, Tensor, Tensor] | None:
    """dq, dk, dv in the inputs' (B, S, H, D) shapes, from the forward's out and contiguous lse; None
    where NaN or inf in the inputs need reference.py."""
    if not math.isfinite(_sum(dout) + _sum(k) + _sum(v) + _lse_term(lse)) and not _finite(q, k, v, dout):
        return None
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        lse, 0.0, causal, scale=softmax_scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
