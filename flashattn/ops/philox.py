"""Philox 4x32-10 in PyTorch, bit-identical to Triton's ``tl.philox``: the random numbers of dropout.

Dropout never stores an N x N mask. Each probability P_ij draws its own random number from a
counter-based generator: a pure function of (seed, counters), so the forward, the backward and the
PyTorch path all regenerate the same keep mask Z from the seed alone, in any tile order.

The contract (a Triton kernel and this file must agree bit for bit; tests/ops/test_philox.py checks
it against ``tl.philox`` and the kernels' own tile helper run by Triton):

    r = tl.philox(seed, c0, c1, c2, c3)[j % 4]       # 10 rounds, 32-bit counters; four keys a call
    u = tl.uint_to_uniform_float(r)                  # float32 in [0, 1)
    keep = u >= dropout_p                            # dropout_p as a float32 kernel argument

with the counters (all int32, bitcast to uint32):

    c0 = j // 4             key index j, 0 <= j < seqlen_k: keys 4g .. 4g + 3 share a call, each
                            taking its own output (the draw costs a quarter of one call per key)
    c1 = i                  query index, 0 <= i < seqlen_q
    c2 = b * nheads + h     batch index b, *query* head h (with GQA, h is not the key/value head)
    c3 = 0

and the seed a non-negative int64 (its low 32 bits are Philox's key k0, its high 32 bits k1), drawn
once per call by :func:`draw_seed` from torch's default CPU generator.

Here the 32-bit unsigned arithmetic is done in int64 tensors masked to 32 bits; the 32 x 32 -> 64
bit products are split into 16-bit halves so that nothing overflows int64.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

# Triton's constants for 32-bit counters (triton/language/random.py).
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
MASK32 = 0xFFFFFFFF
# tl.uint_to_uniform_float's scale for 32-bit inputs: the largest float with (2^31 - 1) * scale < 1.
UNIFORM_SCALE = 4.6566127342e-10
SEED_HIGH = 2 ** 63 - 1   # seeds are drawn in [0, SEED_HIGH)


def draw_seed() -> Tensor:
    """One dropout seed: an int64 scalar tensor on the CPU from torch's default generator.

    ``torch.manual_seed`` therefore makes dropout reproducible, and each call draws a fresh seed
    (a fresh mask). It stays a tensor so that torch.compile traces the draw; it stays on the CPU so
    that reading it never synchronises a GPU.
    """
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device="cpu")


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """The high and low 32 bits of the 64-bit product of the constant `a` and `b` (uint32 in int64)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t_lo = b * a_lo                                   # < 2^48
    t_hi = b * a_hi                                   # < 2^48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & MASK32
    return hi, lo


def philox(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, n_rounds: int = N_ROUNDS,
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tl.philox(seed, c0, c1, c2, c3)`` with 32-bit counters: four uint32 outputs held in int64.

    The counters are integer tensors (broadcast together) read as uint32, as Triton's bitcast does.
    """
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c0, c1, c2, c3 = (c.to(torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint_to_uniform_float(x: Tensor) -> Tensor:
    """``tl.uint_to_uniform_float`` for uint32 input (held in int64): float32 in [0, 1).

    Read as int32, negative values fold onto -x - 1, then scale: float32(x) * float32(scale).
    """
    x = torch.where(x >= 2 ** 31, MASK32 - x, x)      # int32 x < 0 -> -x - 1 == 2^32 - 1 - uint32 x
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def uniform(seed: int, rows: Tensor, cols: Tensor, heads: Tensor) -> Tensor:
    """The dropout uniforms of a tile: float32 of shape heads.shape + (len(rows), len(cols)).

    rows: query indices i; cols: key indices j; heads: the c2 counters b * nheads + h, any shape.
    """
    cols = cols.to(torch.int64)[None, :]
    c1 = rows.to(torch.int64)[:, None]
    c2 = heads.to(torch.int64)[..., None, None]
    outputs = philox(seed, cols // 4, c1, c2, torch.zeros((), dtype=torch.int64, device=cols.device))
    which = cols % 4                                                   # key j takes output j % 4
    r = torch.where(which == 0, outputs[0], torch.where(which == 1, outputs[1],
                                                        torch.where(which == 2, outputs[2], outputs[3])))
    return uint_to_uniform_float(r)


def keep_mask(seed: int, dropout_p: float, rows: Tensor, cols: Tensor, heads: Tensor) -> Tensor:
    """Z of a tile: True where P_ij is kept, i.e. uniform >= dropout_p (dropout_p rounded to fp32)."""
    p = torch.tensor(dropout_p, dtype=torch.float32)
    return uniform(seed, rows, cols, heads) >= p


def head_counters(batch: int, nheads: int, device: torch.device | str = "cpu") -> Tensor:
    """The c2 counters b * nheads + h as a (batch, nheads) int64 tensor."""
    return torch.arange(batch * nheads, dtype=torch.int64, device=device).reshape(batch, nheads)


def dropout_keep_mask(seed: int, dropout_p: float, batch: int, nheads: int, seqlen_q: int,
                      seqlen_k: int, device: torch.device | str = "cpu", first_batch: int = 0) -> Tensor:
    """The whole keep mask Z (batch, nheads, seqlen_q, seqlen_k) bool: O(N^2), for tests and the
    return_attn_probs debugging aid only; the tiled paths generate it tile by tile. `first_batch`:
    the batch index b of the first entry (a packed sequence's index)."""
    rows = torch.arange(seqlen_q, device=device)
    cols = torch.arange(seqlen_k, device=device)
    heads = head_counters(batch, nheads, device) + first_batch * nheads
    return keep_mask(seed, dropout_p, rows, cols, heads)
