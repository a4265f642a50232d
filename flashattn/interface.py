"""Public API, with flash-attn 2.x names and signatures: switching is a change of import.

All input validation happens here, once, with exceptions that name the observed value and what is
accepted. Below this layer nothing checks user input again.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from flashattn.ops import capabilities, custom_ops, dispatch, philox, reference
from flashattn.sparse import BlockMask, num_blocks

Tensor = torch.Tensor


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


class _Call(NamedTuple):
    """A validated call, normalised: what the custom operator receives besides q, k, v. (A named
    tuple: it is built on every call, and costs less host time than a dataclass.)"""

    backend: str
    softmax_scale: float
    causal: bool
    window_left: int
    window_right: int
    attn_bias: Tensor | None         # 4 dims, each 1 or the full size (a view of the user's tensor)
    block_mask: BlockMask | None
    tile_size: int                   # 0: the tuned tiles


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_alibi(alibi_slopes, q: Tensor, batch: int) -> None:
    _check_tensor("alibi_slopes", alibi_slopes)
    nheads = q.shape[2]
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32 (flash-attn's convention), got {alibi_slopes.dtype}; "
                        "pass alibi_slopes.float()")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({nheads},) or (batch, nheads) = "
                         f"({batch}, {nheads}), got {tuple(alibi_slopes.shape)}")


def _check_attn_bias(attn_bias, q: Tensor, seqlen_k: int) -> Tensor:
    """Validate attn_bias; return it as a 4-dim view (leading dims of size 1 added, nothing copied)."""
    _check_tensor("attn_bias", attn_bias)
    batch, seqlen_q, nheads, _ = q.shape
    if attn_bias.dtype != torch.bool and attn_bias.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"attn_bias must be a bool mask (True = may attend) or a float bias of q's dtype "
                        f"({q.dtype}) or float32, got {attn_bias.dtype}")
    if attn_bias.device != q.device:
        raise ValueError(f"attn_bias must be on q's device {q.device}, got {attn_bias.device}")
    full = (batch, nheads, seqlen_q, seqlen_k)
    shape = tuple(attn_bias.shape)
    if len(shape) > 4 or any(s not in (1, f) for s, f in zip(shape[::-1], full[::-1])):
        raise ValueError(f"attn_bias of shape {shape} is not broadcastable to (batch, nheads, seqlen_q, "
                         f"seqlen_k) = {full}: it needs at most 4 dims, each 1 or the full size")
    return attn_bias[(None,) * (4 - len(shape))]


# The Triton kernels address a tensor from 64-bit bases (batch entry, head, packed sequence; and each
# row where an offset within a sequence may pass 2^31, ops/triton/common.py's WIDE): no limit on a
# tensor's size or strides. What stays 32-bit: the row indices of a sequence (which a window's band
# edges reach at about three lengths), and the Hopper kernels' offsets within a tile of their
# contiguous outputs (O, dK, dV: row stride nheads x headdim), of up to MAX_TILE_ROWS rows (common.py's
# MAX_TILE).
MAX_TILE_ROWS = 256
MAX_SEQLEN = 2 ** 29


def _check_traced(condition) -> None:
    """A check of sizes inside a torch.compile trace, where a size may be symbolic: asserted when
    the graph runs (`if` on it would break the graph). Without a message: torch 2.11's dynamo cannot
    pass the message function into the graph."""
    torch._check_value(condition)


def _check_extents(q: Tensor, k: Tensor, seqlens: tuple[int, int]) -> None:
    """The limits the Triton kernels' 32-bit indices leave: sequences (seqlens: the longest query and
    key sequence) shorter than MAX_SEQLEN rows, and tiles of MAX_TILE_ROWS rows of the outputs or
    gradients of q's and k's shapes within 2^31 elements."""
    if torch.compiler.is_compiling():
        for seqlen in seqlens:
            _check_traced(seqlen < MAX_SEQLEN)       # sequences shorter than 2^29 rows
    elif max(seqlens) >= MAX_SEQLEN:
        side, seqlen = ("query", seqlens[0]) if seqlens[0] >= MAX_SEQLEN else ("key", seqlens[1])
        raise ValueError(f"a {side} sequence of {seqlen} rows: the Triton kernels take sequences shorter than "
                         f"2^29 = {MAX_SEQLEN} rows (32-bit row indices, which a window's band edges reach "
                         "at three lengths); use FLASHATTN_BACKEND=reference")
    for name, x in (("q", q), ("k", k)):
        row = x.shape[2] * x.shape[3]
        if MAX_TILE_ROWS * row > 2 ** 31:
            raise ValueError(f"{name}: nheads x headdim = {row}: the Triton kernels write tiles of up to "
                             f"{MAX_TILE_ROWS} rows of the output (or gradient) of {name}'s shape by 32-bit offsets, "
                             f"which rows of {row} elements pass (2^31); call on fewer heads at once, or use "
                             "FLASHATTN_BACKEND=reference")


def _check_block_mask(block_mask, q: Tensor, seqlen_k: int) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a flashattn.BlockMask (see flashattn.sparse), got "
                        f"{type(block_mask).__name__}")
    batch, seqlen_q, nheads, _ = q.shape
    bs = block_mask.block_size
    if block_mask.device != q.device:
        raise ValueError(f"block_mask must be on q's device {q.device}, got {block_mask.device}; "
                         "use block_mask.to(q.device)")
    expected = (num_blocks(seqlen_q, bs), num_blocks(seqlen_k, bs))
    mb, mh, nq, nk = block_mask.shape
    if mb not in (1, batch) or mh not in (1, nheads) or (nq, nk) != expected:
        raise ValueError(f"block_mask of shape {block_mask.shape} (block size {bs}) does not fit: expected "
                         f"(1 or batch={batch}, 1 or nheads={nheads}, ceil(seqlen_q / {bs})={expected[0]}, "
                         f"ceil(seqlen_k / {bs})={expected[1]})")
    lists = ((block_mask.kv_num_blocks, (mb, mh, nq)), (block_mask.kv_indices, (mb, mh, nq, nk)),
             (block_mask.q_num_blocks, (mb, mh, nk)), (block_mask.q_indices, (mb, mh, nk, nq)))
    for tensor, shape in lists:
        if tensor.dtype != torch.int32 or tuple(tensor.shape) != shape or tensor.device != q.device:
            raise ValueError("block_mask's index lists do not match its mask; build it with "
                             "BlockMask.from_dense or a flashattn.sparse helper")


def _check_scores(softmax_scale, causal, window_size, softcap, head_dim: int) -> tuple[float, bool, int, int]:
    """Check the score options every entry point shares; return (softmax_scale, causal, window_left,
    window_right) normalised: the scale defaults to 1 / sqrt(head_dim), and causal is folded into the
    window (flash-attn's rule: causal means window_right = 0; conversely any window whose right bound
    is 0 is causal: window (-1, 0) is exactly causal, and the plain causal kernels take it)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(_is_int(w) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1: unbounded), got {window_size!r}")
    if not (isinstance(softcap, (int, float)) and -math.inf < softcap < math.inf and softcap >= 0.0):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {softcap!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    elif not (isinstance(softmax_scale, (int, float)) and -math.inf < softmax_scale < math.inf):
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    window_left, window_right = window_size
    if causal:
        window_right = 0
    return float(softmax_scale), window_right == 0, window_left, window_right


TILE_SIZES = (16, 32, 64, 128, 256)


def _check_tile_size(tile_size, block_mask) -> int:
    """tile_size None -> 0 (the tuned tiles); else a power of two in TILE_SIZES, within the block
    mask's blocks (a tile may not straddle two of them)."""
    if tile_size is None:
        return 0
    if not _is_int(tile_size) or tile_size not in TILE_SIZES:
        raise ValueError(f"tile_size must be None (the tuned tiles) or one of {TILE_SIZES}, got {tile_size!r}")
    if block_mask is not None and tile_size > block_mask.block_size:
        raise ValueError(f"tile_size={tile_size} is larger than the block mask's blocks ({block_mask.block_size}): "
                         f"pass tile_size <= {block_mask.block_size}")
    return tile_size


def _validate(q: Tensor, k: Tensor, v: Tensor, dropout_p, softmax_scale, causal, window_size,
              softcap, alibi_slopes, deterministic, return_attn_probs, attn_bias, block_mask,
              n_seq: int | None = None, max_seqlens: tuple[int, int] | None = None,
              tile_size: int | None = None) -> _Call:
    """Check every argument; return the backend, the softmax scale and the normalised options.
    `n_seq`: the number of packed sequences (varlen.py, q (1, total_q, H, D)) and `max_seqlens` the
    longest query and key sequence among them; None when dense."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (batch, seqlen, nheads, headdim), "
                             f"got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, _, nheads, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"batch size of q ({batch}) and k/v ({k.shape[0]}) differ")
    if k.shape[3] != head_dim:
        raise ValueError(f"head dim of q ({head_dim}) and k/v ({k.shape[3]}) differ")
    nheads_k = k.shape[2]
    if nheads == 0 or nheads_k == 0:
        raise ValueError(f"nheads must be >= 1, got {nheads} for q and {nheads_k} for k/v")
    if nheads % nheads_k:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of nheads of k/v ({nheads_k}) "
                         "(MQA/GQA)")
    for name, flag in (("deterministic", deterministic), ("return_attn_probs", return_attn_probs)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    softmax_scale, causal, window_left, window_right = _check_scores(softmax_scale, causal, window_size, softcap,
                                                                     head_dim)
    if alibi_slopes is not None:
        _check_alibi(alibi_slopes, q, q.shape[0] if n_seq is None else n_seq)
    if attn_bias is not None:
        attn_bias = _check_attn_bias(attn_bias, q, k.shape[1])
    if block_mask is not None:
        _check_block_mask(block_mask, q, k.shape[1])

    backend = dispatch.select_backend(q.device)
    if backend == "triton":
        _check_extents(q, k, max_seqlens or (q.shape[1], k.shape[1]))
    spec = dispatch.spec(backend)
    problems = capabilities.input_problems(spec, q.dtype, head_dim)
    if problems:
        error = TypeError if q.dtype not in spec.dtypes else ValueError
        raise error("; ".join(problems))
    if spec.features != capabilities.EVERY_FEATURE:
        features = capabilities.requested_features(
            causal=causal, gqa=nheads != nheads_k, dropout_p=float(dropout_p),
            window_size=(window_left, window_right), softcap=float(softcap), alibi_slopes=alibi_slopes,
            attn_bias=attn_bias, block_mask=block_mask, deterministic=deterministic)
        missing = capabilities.missing_features(spec, features)
        if missing:
            raise NotImplementedError(
                f"the {backend} kernel does not implement yet: {', '.join(missing)} (this call combines: "
                f"{', '.join(f for f in capabilities.ALL_FEATURES if f in features)}); the PyTorch path "
                "implements every option: FLASHATTN_BACKEND=reference")
    return _Call(backend, float(softmax_scale), causal, window_left, window_right, attn_bias, block_mask,
                 _check_tile_size(tile_size, block_mask))


def _autocast(*tensors):
    """Under torch.autocast for the inputs' device, attention is an op of the lower-precision list, as
    torch's scaled_dot_product_attention is: every floating-point input but float64 (q, k, v, a float
    attn_bias) is cast to the autocast dtype. Outside autocast, or for inputs that are not tensors
    (validation then says so), they are returned as they are."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
                 else x for x in tensors)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, attn_bias: Tensor | None = None,
                    block_mask: BlockMask | None = None, tile_size: int | None = None):
    """Exact attention softmax(softmax_scale * q k^T) v, computed by FlashAttention.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads must be a multiple of nheads_k
            (MQA/GQA: query head h uses key/value head h // (nheads // nheads_k)).
        dropout_p: dropout probability in [0, 1) on the attention probabilities: each is kept with
            probability 1 - dropout_p and scaled by 1 / (1 - dropout_p). The mask is never stored:
            it comes from a counter-based RNG (Philox, flashattn/ops/philox.py) whose seed is drawn
            from torch's default CPU generator at each call, so torch.manual_seed makes it
            reproducible and each call gets a fresh mask; the backward regenerates the same mask.
            Pass 0.0 in evaluation, as with flash-attn.
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: mask aligned to the bottom-right corner of the score matrix, so query i sees keys
            j <= i + seqlen_k - seqlen_q (flash-attn >= 2.1). Rows that see no key output 0.
        window_size: (left, right) sliding window; -1 = unbounded. Query i sees keys j with
            i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right. causal=True sets
            right = 0 (as flash-attn does). Tiles outside the band are skipped: for a fixed window the
            cost is linear in the sequence length.
        softcap: if > 0, the scaled scores x become softcap * tanh(x / softcap) (before ALiBi, bias
            and masks).
        alibi_slopes: float32 (nheads,) or (batch, nheads): adds -slope * |i + seqlen_k - seqlen_q - j|
            to the scores (flash-attn's convention). Treated as constants (no gradient).
        deterministic: make the backward bitwise reproducible. Two Triton backwards add with
            atomics unless deterministic=True: on Hopper (sm_90), the one-pass backward of plain
            fp16/bf16 calls at head dims 64 and 128 adds dQ into an fp32 buffer (deterministic=True
            orders those adds, at some speed); and the gradient of an attn_bias that broadcasts
            over batch or heads (deterministic=True reduces it by torch, at the cost of a buffer
            with the batch and head dims). Every other backward is deterministic already.
        return_attn_probs: also return the log-sum-exp (batch, nheads, seqlen_q) float32 and the
            attention probabilities (batch, nheads, seqlen_q, seqlen_k) after every option, with
            the entries that dropout dropped negated (their sign bit set: torch.signbit gives the
            dropped set). The probabilities cost O(N^2) time and memory and are recomputed
            densely by the PyTorch implementation: a debugging aid, never for production.
        attn_bias: keyword only, beyond flash-attn. A float tensor added to the scores (after
            softcap, with ALiBi), or a bool tensor (True = may attend, SDPA's convention),
            broadcastable to (batch, nheads, seqlen_q, seqlen_k); float dtype: q's or float32. It is
            never expanded in memory; a float bias that requires grad gets its gradient (summed
            over its broadcast dimensions).
        block_mask: keyword only, beyond flash-attn. A flashattn.BlockMask (see flashattn.sparse):
            which key blocks each query block attends to; skipped blocks cost nothing.
        tile_size: keyword only, beyond flash-attn. None (default): the tiles tuned for the GPU.
            16, 32, 64, 128 or 256: the side of the square tiles (query rows = keys per tile) the
            kernels cut the scores into, forward and backward: the portable Triton kernels run
            exactly these (fewer pipeline stages if the GPU's shared memory needs it; a ValueError
            if one stage does not fit), and so do the PyTorch path's loops. For experiments and
            for memory-constrained GPUs; the tuned tiles are the fast ones.

    Every option combines with every other (and with causal, GQA and packed inputs); a backend
    that lacks one raises NotImplementedError naming what is missing, nothing is ignored. The exact
    semantics are in flashattn/ops/variant.py. Both the Triton kernels and the PyTorch path
    implement every option.

    Dtypes: float16, bfloat16 and float32 (float32 products are exact fp32, not tf32); on the
    PyTorch path float64 too. Under torch.autocast, float32 inputs (and a float attn_bias) are cast to
    the autocast dtype first, as torch's scaled_dot_product_attention's are. Head dims 1 to 256. CUDA tensors run the Triton kernels, other
    devices the PyTorch implementation of the same algorithm; FLASHATTN_BACKEND=triton|reference
    forces one, and TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors.

    Returns:
        out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, attn_probs) when
        return_attn_probs. softmax_lse is +inf for rows that see no key. out is contiguous, except
        where torch's fused CPU kernel computes it (plain calls on the CPU, outside torch.compile):
        there it has the layout torch.empty_like(q) gives: q's own when q is dense (a transposed
        view, say).
    """
    q, k, v, attn_bias = _autocast(q, k, v, attn_bias)
    call = _validate(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                     deterministic, return_attn_probs, attn_bias, block_mask, tile_size=tile_size)
    return _attend(q, k, v, call, dropout_p, softcap, alibi_slopes, deterministic, return_attn_probs)


def _attend(q: Tensor, k: Tensor, v: Tensor, call: _Call, dropout_p, softcap, alibi_slopes, deterministic,
            return_attn_probs, packed: tuple = (None, None, 0, 0)):
    """The one call into the custom operators of every public function, after _validate: the options
    in VARIANT_ARGS order (`packed`: cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k of packed
    sequences), and the probabilities when return_attn_probs. Returns out, or (out, lse, probs)."""
    seed = philox.draw_seed() if dropout_p > 0.0 else None
    bm = call.block_mask
    options = (call.causal, call.window_left, call.window_right, float(softcap), alibi_slopes,
               float(dropout_p), seed, call.attn_bias,
               *((bm.mask, bm.kv_num_blocks, bm.kv_indices, bm.q_num_blocks, bm.q_indices) if bm is not None
                 else (None,) * 5),
               bm.block_size if bm is not None else 0, deterministic, *packed, call.tile_size)
    out, lse = custom_ops.attention(q, k, v, call.softmax_scale, *options, call.backend)
    if not return_attn_probs:
        return out
    with torch.no_grad():
        variant = dispatch.make_variant(q.shape[0], q.shape[2], *options)
        probs = reference.attention_probs(q, k, call.softmax_scale, variant)
    return out, lse, probs


def _check_packed(name: str, x, layout: str, dim: int, count: int) -> None:
    """x has the dims of `layout` (a shape written out) and `count` entries along dim `dim`."""
    _check_tensor(name, x)
    if x.dim() != layout.count(",") + 1 or x.shape[dim] != count:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                              softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                              deterministic: bool = False, return_attn_probs: bool = False, *,
                              attn_bias: Tensor | None = None, block_mask: BlockMask | None = None,
                              tile_size: int | None = None):
    """flash_attn_func with q, k, v packed as qkv (batch, seqlen, 3, nheads, headdim).

    The three are strided views of qkv, not copies; the gradient arrives as one (batch, seqlen, 3,
    nheads, headdim) tensor. Same options and return values as flash_attn_func.
    """
    _check_packed("qkv", qkv, "(batch, seqlen, 3, nheads, headdim)", 2, 3)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                           attn_bias=attn_bias, block_mask=block_mask, tile_size=tile_size)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False, *, attn_bias: Tensor | None = None,
                             block_mask: BlockMask | None = None, tile_size: int | None = None):
    """flash_attn_func with k, v packed as kv (batch, seqlen_k, 2, nheads_k, headdim).

    Same options and return values as flash_attn_func.
    """
    _check_packed("kv", kv, "(batch, seqlen_k, 2, nheads_k, headdim)", 2, 2)
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs,
                           attn_bias=attn_bias, block_mask=block_mask, tile_size=tile_size)
