"""Inference against a KV cache, with flash-attn 2.x's name and signature: flash_attn_with_kvcache.

One call appends the new keys and values to the cache in place (rotary embeddings applied on the
way) and attends to everything cached. The keys are split across programs and the partial results
merged by their log-sum-exp (flash-decoding, flashattn/ops/triton/decode.py), and the query heads
that share a KV head share each K/V tile, so a decode step reads the cache once, at the speed of
memory, even at batch 1. Every argument is checked before anything is written: on bad input the
cache is left bit-identical.
"""
from __future__ import annotations

import torch

from flashattn.interface import _check_alibi, _check_scores, _check_tensor, _is_int
from flashattn.ops import capabilities, custom_ops, dispatch

Tensor = torch.Tensor


def _check_index(name: str, x, shape: tuple[int, ...], device: torch.device) -> None:
    _check_tensor(name, x)
    if x.dtype != torch.int32 or tuple(x.shape) != shape:
        raise ValueError(f"{name} must be an int32 tensor of shape {shape}, got dtype {x.dtype} and shape "
                         f"{tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {x.device}")


def _check_values(seqlens: Tensor | int, seqlen_new: int, capacity: int, leftpad: Tensor | None,
                  batch_idx: Tensor | None, cache_batch: int, block_table: Tensor | None, page_size: int,
                  pages: int) -> None:
    """The checks that read device values: each sequence's cache length plus the new tokens fits,
    leftpad within it, cache_batch_idx and the block table entries in use in range. One length for
    every sequence (an int) is checked on the host; tensors are read in one sync, skipped while a
    CUDA graph is captured or torch.compile traces, where values cannot be read."""
    per_sequence = isinstance(seqlens, torch.Tensor)
    if not per_sequence and not 0 <= seqlens <= capacity - seqlen_new:
        raise ValueError(f"flash_attn_with_kvcache: cache_seqlens = {seqlens} plus {seqlen_new} new tokens is "
                         f"outside the cache's {capacity} slots per sequence; nothing was written")
    tensors = [x for x in (seqlens if per_sequence else None, leftpad, batch_idx, block_table) if x is not None]
    if not tensors or torch.compiler.is_compiling() or (
            tensors[0].is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    device = tensors[0].device
    lengths = seqlens.long() if per_sequence else torch.full((len(tensors[0]),), seqlens, device=device)
    total = lengths + seqlen_new
    checks = [lengths < 0, total > capacity]
    if leftpad is not None:
        checks += [leftpad < 0, leftpad > lengths]
    if batch_idx is not None:
        checks += [(batch_idx < 0) | (batch_idx >= cache_batch)]
    if block_table is not None:
        used = torch.arange(block_table.shape[1], device=block_table.device) * page_size < total[:, None]
        checks += [((block_table < 0) | (block_table >= pages)).logical_and(used).any(dim=1)]
    bad = torch.stack(checks).cpu()                                    # (checks, B), one sync
    if not bad.any():
        return
    problems = []
    values = lengths.tolist()
    for b in bad.any(dim=0).nonzero().flatten().tolist()[:4]:
        row = bad[:, b].tolist()
        if row[0]:
            problems.append(f"cache_seqlens[{b}] = {values[b]} is negative")
        if row[1]:
            problems.append(f"cache_seqlens[{b}] = {values[b]} plus {seqlen_new} new tokens exceeds the "
                            f"cache's {capacity} slots per sequence")
        index = 2
        if leftpad is not None:
            if row[index] or row[index + 1]:
                problems.append(f"cache_leftpad[{b}] = {int(leftpad[b])} is outside [0, cache_seqlens[{b}] = "
                                f"{values[b]}]")
            index += 2
        if batch_idx is not None:
            if row[index]:
                problems.append(f"cache_batch_idx[{b}] = {int(batch_idx[b])} is outside [0, {cache_batch})")
            index += 1
        if block_table is not None and row[index]:
            problems.append(f"block_table[{b}] lists a page outside [0, {pages}) among the "
                            f"{-(-int(total[b]) // page_size)} pages sequence {b} uses")
    raise ValueError("flash_attn_with_kvcache: " + "; ".join(problems) + "; nothing was written")


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None = None,
                            v: Tensor | None = None, rotary_cos: Tensor | None = None,
                            rotary_sin: Tensor | None = None, cache_seqlens: int | Tensor | None = None,
                            cache_batch_idx: Tensor | None = None, cache_leftpad: Tensor | None = None,
                            block_table: Tensor | None = None, softmax_scale: float | None = None,
                            causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Tensor | None = None,
                            num_splits: int = 0, return_softmax_lse: bool = False):
    """Append k, v to the KV cache in place, then attend q to everything cached (inference: no gradient).

    Args:
        q: (batch, seqlen_q, nheads, headdim); seqlen_q from 1 (decoding) to a few hundred
            (speculative decoding, chunked prefill).
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or with block_table a pool of
            pages (num_pages, page_size, nheads_k, headdim), page_size a multiple of 16. Written in
            place: their last dim must be contiguous. nheads must be a multiple of nheads_k (GQA).
        k, v: (batch, seqlen_new, nheads_k, headdim) or None: new tokens, written at slots
            cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 of sequence b, and attended to.
        rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2), rotary_dim <= headdim, seqlen_ro at
            least the cache's length per sequence; only with k and v. The new k is rotated at
            positions cache_seqlens[b] - cache_leftpad[b] + t; q at cache_seqlens[b] - cache_leftpad[b]
            + i when causal or windowed, else all of q at cache_seqlens[b] - cache_leftpad[b]
            (flash-attn's convention). Computed in float32; q itself is not modified.
        cache_seqlens: int, or int32 (batch,): the tokens already in each sequence's cache (leftpad
            included). None means the cache is full: every sequence has seqlen_cache tokens. An int
            (or None) is one length for every sequence, passed to the kernels as a launch argument.
        cache_batch_idx: int32 (batch,): sequence b uses batch entry cache_batch_idx[b] of the cache
            (contiguous caches only). None: entry b.
        cache_leftpad: int32 (batch,): sequence b's cache starts at slot cache_leftpad[b] (left
            padding): its keys are slots [cache_leftpad[b], cache_seqlens[b] + seqlen_new).
        block_table: int32 (batch, max_blocks_per_seq): page of each block of page_size slots of each
            sequence (a paged cache). Only the entries of blocks in use are read.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as in flash_attn_func, aligned to
            the bottom-right corner of each sequence's own scores (its query rows are its last
            tokens): with causal, query i sees keys j <= i + seqlen_k - seqlen_q.
        num_splits: split the keys of each (sequence, KV head) across this many programs, merged by
            log-sum-exp; 0 chooses from the shape and the GPU's SM count. The PyTorch path ignores it.
        return_softmax_lse: also return the log-sum-exp (batch, nheads, seqlen_q) float32.

    Every argument is validated before anything is written, the lengths, leftpad, cache_batch_idx and
    block table entries too (one read of those values from the device, skipped while a CUDA graph is
    captured or torch.compile traces): on bad input the cache is unchanged.

    Returns:
        out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse) when return_softmax_lse.
    """
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims, got shape {tuple(x.shape)}")
    batch, seqlen_q, nheads, head_dim = q.shape
    device, dtype = q.device, q.dtype
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != dtype or x.device != device:
            raise TypeError(f"{name} must have q's dtype {dtype} and device {device}, got {x.dtype} on {x.device}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} is written in place, so its last dim must be contiguous; got strides "
                             f"{x.stride()}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    cache_batch, cache_len, nheads_k, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"head dim of q ({head_dim}) and of the cache ({cache_dim}) differ")
    if nheads_k == 0 or nheads % nheads_k:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of the cache's nheads_k ({nheads_k}) (GQA)")

    paged = block_table is not None
    if paged:
        _check_tensor("block_table", block_table)
        if block_table.dim() != 2 or block_table.dtype != torch.int32 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must be int32 of shape (batch, max_blocks) = ({batch}, ...), got "
                             f"dtype {block_table.dtype} and shape {tuple(block_table.shape)}")
        if block_table.device != device:
            raise ValueError(f"block_table must be on q's device {device}, got {block_table.device}")
        if cache_len % 16 or cache_len == 0:
            raise ValueError(f"the page size (k_cache.shape[1] = {cache_len}) must be a positive multiple of 16")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx selects batch entries of a contiguous cache; with a block_table "
                             "the table itself maps sequences to pages")
        capacity = block_table.shape[1] * cache_len
        block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    else:
        capacity = cache_len
        if cache_batch_idx is None and cache_batch != batch:
            raise ValueError(f"the cache has {cache_batch} batch entries and q has {batch}: pass "
                             "cache_batch_idx to choose the entries")

    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    seqlen_new = 0
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            _check_tensor(name, x)
            if tuple(x.shape[:1]) + tuple(x.shape[2:]) != (batch, nheads_k, head_dim) or x.dim() != 4:
                raise ValueError(f"{name} must have shape (batch, seqlen_new, nheads_k, headdim) = ({batch}, "
                                 f"seqlen_new, {nheads_k}, {head_dim}), got {tuple(x.shape)}")
            if x.dtype != dtype or x.device != device:
                raise TypeError(f"{name} must have q's dtype {dtype} and device {device}, got {x.dtype} on "
                                f"{x.device}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        seqlen_new = k.shape[1]
        if seqlen_new > capacity:
            raise ValueError(f"{seqlen_new} new tokens do not fit the cache's {capacity} slots per sequence")
        k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))

    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin rotate the new k and q: pass k and v with them")
        for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            _check_tensor(name, x)
            if x.dim() != 2 or x.shape != rotary_cos.shape or not 0 < 2 * x.shape[1] <= head_dim:
                raise ValueError(f"{name} must have shape (seqlen_ro, rotary_dim / 2) with 2 <= rotary_dim <= "
                                 f"headdim = {head_dim}, both alike; got {tuple(rotary_cos.shape)} and "
                                 f"{tuple(rotary_sin.shape)}")
            if x.device != device or not x.is_floating_point():
                raise TypeError(f"{name} must be a float tensor on q's device {device}, got {x.dtype} on "
                                f"{x.device}")
        if rotary_cos.shape[0] < capacity:
            raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions; the cache holds "
                             f"{capacity} per sequence, and each needs one")
        rotary_cos, rotary_sin = (x if x.stride(1) == 1 else x.contiguous() for x in (rotary_cos, rotary_sin))
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {rotary_interleaved!r}")

    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens=None means the cache is full: there is no slot for k and v; "
                             "pass the lengths")
        cache_seqlens = capacity
    if not _is_int(cache_seqlens):
        _check_index("cache_seqlens", cache_seqlens, (batch,), device)
    if cache_batch_idx is not None:
        _check_index("cache_batch_idx", cache_batch_idx, (batch,), device)
    if cache_leftpad is not None:
        _check_index("cache_leftpad", cache_leftpad, (batch,), device)
    softmax_scale, causal, window_left, window_right = _check_scores(softmax_scale, causal, window_size, softcap,
                                                                     head_dim)
    if alibi_slopes is not None:
        _check_alibi(alibi_slopes, q, batch)
    if not _is_int(num_splits) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: chosen from the shape), got {num_splits!r}")
    if not isinstance(return_softmax_lse, bool):
        raise TypeError(f"return_softmax_lse must be a bool, got {return_softmax_lse!r}")
    backend = dispatch.select_backend(device)
    problems = capabilities.input_problems(dispatch.spec(backend), dtype, head_dim)
    if problems:
        raise (TypeError if dtype not in dispatch.spec(backend).dtypes else ValueError)("; ".join(problems))
    _check_values(cache_seqlens, seqlen_new, capacity, cache_leftpad, cache_batch_idx, cache_batch, block_table,
                  cache_len, cache_batch)

    with torch.no_grad():
        out, lse = custom_ops.kv_cache(
            q if q.stride(-1) == 1 else q.contiguous(), k_cache, v_cache, k, v, rotary_cos, rotary_sin,
            *((None, cache_seqlens) if _is_int(cache_seqlens) else (cache_seqlens, 0)), cache_leftpad, cache_batch_idx, block_table, softmax_scale, causal, window_left,
            window_right, float(softcap), alibi_slopes, rotary_interleaved, num_splits, backend)
    return (out, lse) if return_softmax_lse else out
