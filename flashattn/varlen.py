"""Packed batches (varlen), with flash-attn 2.x's names and signatures: sequences of different
lengths concatenated without padding, described by cumulative sequence lengths.

A thin layer over the dense path: the packed tensors travel as one batch entry, (1, total, H, D), and
the kernels run one grid over the sequences, as long as the longest, each program reading its
sequence's bounds from cu_seqlens (flashattn/ops/variant.py, "Packed sequences"). Time follows the
real work: no sequence is padded to the longest. flashattn.bert_padding turns a padded batch and its
key-padding mask into this layout and back.
"""
from __future__ import annotations

import weakref

import torch

from flashattn.interface import (_attend, _autocast, _check_packed, _check_tensor, _check_traced, _is_int,
                                 _validate)

Tensor = torch.Tensor


# cu_seqlens tensors already read, by id: (a weak reference to the tensor, its version, its values).
# A model passes one cu_seqlens to every layer: its values are read (a device sync, which stalls the
# host until the GPU's queue drains) at the first layer only. The version counter moves with every
# in-place write through torch, so a rewritten tensor is read again; inference tensors keep no
# version counter and are read at every call.
_READ: dict[int, tuple[weakref.ref, int, list[int]]] = {}
_READ_MAX = 64


def _values(cu: Tensor) -> list[int]:
    """cu's values as a list, read from the device unless this very tensor, unchanged, was read before."""
    if cu.is_inference():
        return cu.tolist()
    entry = _READ.get(id(cu))
    if entry is not None and entry[0]() is cu and entry[1] == cu._version:
        return entry[2]
    values = cu.tolist()
    if len(_READ) >= _READ_MAX:
        _READ.clear()
    _READ[id(cu)] = (weakref.ref(cu), cu._version, values)
    return values


def _check_cu_seqlens(name: str, cu, total: int | None, max_seqlen, max_name: str, device: torch.device) -> None:
    """cu_seqlens: int32 (B + 1,) on q's device, from 0, non-decreasing, ending at the total (any end
    where total is None); its longest sequence within max_seqlen. The values are read on the host (one
    device sync, once per tensor: _values) except while a CUDA graph is being captured or torch.compile
    traces, where they cannot be."""
    _check_tensor(name, cu)
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be an int32 tensor of shape (batch + 1,) with batch >= 1, got "
                         f"dtype {cu.dtype} and shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")
    if not _is_int(max_seqlen):
        raise ValueError(f"{max_name} must be an int >= 0, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        # Traced, max_seqlen may have been read from a tensor (int(t.max())): a data-dependent value,
        # which `if` cannot branch on; _check_traced asserts it when the graph runs instead.
        _check_traced(max_seqlen >= 0)
        return
    if max_seqlen < 0:
        raise ValueError(f"{max_name} must be an int >= 0, got {max_seqlen!r}")
    if cu.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    values = _values(cu)
    lengths = [b - a for a, b in zip(values, values[1:])]
    problems = []
    if values[0] != 0:
        problems.append(f"it starts at {values[0]}, not 0")
    if any(n < 0 for n in lengths):
        b = next(i for i, n in enumerate(lengths) if n < 0)
        problems.append(f"it decreases at entry {b + 1} ({values[b]} -> {values[b + 1]})")
    if total is not None and values[-1] != total:
        problems.append(f"it ends at {values[-1]}, but the packed tensor has {total} rows")
    if max(lengths) > max_seqlen:
        problems.append(f"its longest sequence has {max(lengths)} rows, more than {max_name}={max_seqlen}")
    if problems:
        raise ValueError(f"{name} = {values if len(values) <= 16 else str(values[:16])[:-1] + ', ...]'} "
                         f"is not a cumulative length list: {'; '.join(problems)}")


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Tensor | None = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: Tensor | None = None, *,
                           tile_size: int | None = None):
    """Exact attention over packed sequences: sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1]
    of q against rows cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v.

    Args:
        q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim) (MQA/GQA as in
            flash_attn_func).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), cumulative lengths from 0 to total_q /
            total_k, on q's device. Checked on the host outside graph capture: a device sync the
            first time a tensor is passed (not again while it is unchanged, so the layers of a
            model that share one cu_seqlens sync once).
        max_seqlen_q, max_seqlen_k: the longest sequence of each side (the grid's size).
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic: as in
            flash_attn_func, applied within each sequence: causal and windows are aligned to the
            bottom-right corner of each sequence's own score matrix; alibi_slopes (nheads,) or
            (batch, nheads) with batch the number of sequences; dropout's counters use the
            sequence index as the batch index.
        return_attn_probs: also return the log-sum-exp (nheads, total_q) float32 and the
            probabilities (batch, nheads, max_seqlen_q, max_seqlen_k), zero past each sequence
            (O(N^2): a debugging aid).
        block_table: int32 (batch, max_blocks): k and v are then a paged KV cache, a pool of pages
            (num_pages, page_size, nheads_k, headdim) with page_size a multiple of 16, as in
            flash_attn_with_kvcache; sequence b's keys are its first cu_seqlens_k[b + 1] -
            cu_seqlens_k[b] slots, and its queries the last of them (chunked prefill). Inference:
            no gradient, and neither dropout, return_attn_probs nor tile_size.
        tile_size: keyword only, beyond flash-attn: the square tiles of flash_attn_func's tile_size.

    Returns:
        out (total_q, nheads, headdim), or (out, softmax_lse, attn_probs) when return_attn_probs.
    """
    paged = block_table is not None
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
        dims, layout = ((4, "(num_pages, page_size, nheads_k, headdim), a paged cache") if paged and name != "q"
                        else (3, "(total_tokens, nheads, headdim)"))
        if x.dim() != dims:
            raise ValueError(f"{name} must have {dims} dims {layout}, got shape {tuple(x.shape)}")
    if paged:
        unsupported = [what for what, on in (("dropout", dropout_p != 0.0), ("return_attn_probs", return_attn_probs),
                                             ("tile_size", tile_size is not None)) if on]
        if unsupported:
            raise NotImplementedError(f"flash_attn_varlen_func over a paged KV cache (block_table) is for "
                                      f"inference and takes no {', '.join(unsupported)}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q", q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, None if paged else k.shape[0], max_seqlen_k, "max_seqlen_k",
                      q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    if paged:
        return _paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, block_table, softmax_scale, causal,
                      window_size, softcap, alibi_slopes)
    n_seq = cu_seqlens_q.numel() - 1
    q, k, v = _autocast(q, k, v)
    q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)       # (1, total, H, D)
    call = _validate(q4, k4, v4, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                     deterministic, return_attn_probs, None, None, n_seq=n_seq,
                     max_seqlens=(max_seqlen_q, max_seqlen_k), tile_size=tile_size)
    result = _attend(q4, k4, v4, call, dropout_p, softcap, alibi_slopes, deterministic, return_attn_probs,
                     packed=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    if not return_attn_probs:
        return result[0]                                               # (total_q, H, D)
    out, lse, probs = result
    return out[0], lse[0], probs


def _paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
           max_seqlen_q: int, block_table: Tensor, softmax_scale, causal, window_size, softcap,
           alibi_slopes) -> Tensor:
    """Packed queries against a paged KV cache, through flash_attn_with_kvcache: sequence b's rows go
    to the end of a (batch, max_seqlen_q) query block, so that its bottom-right alignment (query row i
    of L_q against L_k keys sees keys j <= i + L_k - L_q) is the cache function's, and come back to
    their packed rows; the rows in front see no key and are dropped. No host read: the row maps are
    built on the device."""
    from flashattn.kvcache import flash_attn_with_kvcache

    batch, total, nheads, head_dim = cu_seqlens_q.numel() - 1, q.shape[0], q.shape[1], q.shape[2]
    lengths_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]                                      # (batch,)
    seq = torch.repeat_interleave(torch.arange(batch, device=q.device), lengths_q, output_size=total)  # (total,)
    # Packed row r, position r - cu_seqlens_q[b] of sequence b, goes to row max_seqlen_q - L_q + that.
    rows = (torch.arange(total, device=q.device) - cu_seqlens_q[seq] + max_seqlen_q - lengths_q[seq]
            + seq * max_seqlen_q)                                                        # (total,)
    padded = q.new_zeros(batch * max_seqlen_q, nheads, head_dim).index_copy(0, rows, q)
    with torch.no_grad():
        out = flash_attn_with_kvcache(padded.view(batch, max_seqlen_q, nheads, head_dim), k_cache, v_cache,
                                      cache_seqlens=cu_seqlens_k[1:] - cu_seqlens_k[:-1], block_table=block_table,
                                      softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                      softcap=softcap, alibi_slopes=alibi_slopes)
    return out.view(batch * max_seqlen_q, nheads, head_dim).index_select(0, rows)       # (total, H, D)


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
                                     softmax_scale: float | None = None, causal: bool = False,
                                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                     alibi_slopes: Tensor | None = None, deterministic: bool = False,
                                     return_attn_probs: bool = False):
    """flash_attn_varlen_func with q, k, v packed as qkv (total, 3, nheads, headdim) (strided views,
    not copies; the gradient arrives as one tensor) and one cu_seqlens for both sides."""
    _check_packed("qkv", qkv, "(total, 3, nheads, headdim)", 1, 3)
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen,
                                  max_seqlen, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                                    softmax_scale: float | None = None, causal: bool = False,
                                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                    alibi_slopes: Tensor | None = None, deterministic: bool = False,
                                    return_attn_probs: bool = False):
    """flash_attn_varlen_func with k, v packed as kv (total_k, 2, nheads_k, headdim)."""
    _check_packed("kv", kv, "(total_k, 2, nheads_k, headdim)", 1, 2)
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)
