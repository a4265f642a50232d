"""Backend choice and the launch boundary shared by every backend.

Everything that is not specific to one kernel lives here once: which backend runs (and, on the
PyTorch path, whether torch's fused CPU kernel serves a plain call: flashattn/ops/cpu.py), packing the
options into one :class:`~flashattn.ops.variant.Variant`, the empty-tensor cases (no kernel launches
on zero-size grids), and making the last dim contiguous.
"""
from __future__ import annotations

import contextlib
import os

import torch

from flashattn.ops import capabilities, cpu, reference
from flashattn.ops.variant import KVCache, Variant, from_causal
from flashattn.sparse import BlockMask

Tensor = torch.Tensor
BACKENDS = ("triton", "reference")


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_backend(device: torch.device) -> str:
    """CUDA tensors -> Triton; other devices -> the PyTorch path, or Triton under TRITON_INTERPRET=1.

    FLASHATTN_BACKEND=triton|reference forces one.
    """
    forced = os.environ.get("FLASHATTN_BACKEND")
    if forced and (forced := forced.strip().lower()):
        if forced not in BACKENDS:
            raise ValueError(f"FLASHATTN_BACKEND={forced!r} is not one of {BACKENDS}")
        if forced == "triton" and device.type == "cpu" and not triton_interpreter():
            raise ValueError("FLASHATTN_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 "
                             "(the Triton interpreter); unset FLASHATTN_BACKEND to use the PyTorch path")
        return forced
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreter()):
        return "triton"
    return "reference"


def _no_autocast(x: Tensor):
    """A context in which torch.autocast is off for x's device, around the PyTorch path: it computes in
    the dtypes it is given (the public functions cast the inputs under autocast; its matmuls must not
    be cast again, its float32 accumulations not lowered). The Triton kernels and torch's fused CPU
    kernel are not autocast ops, and their host code has none."""
    device = x.device.type
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


def spec(backend: str) -> capabilities.KernelSpec:
    return capabilities.KERNELS[backend]


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_variant(batch: int, nheads: int, causal: bool, window_left: int, window_right: int,
                 softcap: float, alibi_slopes: Tensor | None, dropout_p: float, seed: Tensor | None,
                 attn_bias: Tensor | None, block_mask: Tensor | None, kv_num_blocks: Tensor | None,
                 kv_indices: Tensor | None, q_num_blocks: Tensor | None, q_indices: Tensor | None,
                 block_size: int, deterministic: bool, cu_seqlens_q: Tensor | None = None,
                 cu_seqlens_k: Tensor | None = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                 tile_size: int = 0) -> Variant:
    """Pack the custom operators' explicit arguments (already validated) into one Variant. `batch`
    is q's batch size; with packed sequences the number of sequences is taken from cu_seqlens_q."""
    if (alibi_slopes is None and dropout_p == 0.0 and attn_bias is None and block_mask is None
            and softcap == 0.0 and not deterministic and window_left == -1
            and window_right == (0 if causal else -1) and cu_seqlens_q is None and not tile_size):
        return from_causal(causal)   # the common call: no new Variant
    if cu_seqlens_q is not None:
        batch = cu_seqlens_q.numel() - 1
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(torch.float32).expand(batch, nheads)  # (H,) -> stride-0 view
    is_mask = attn_bias is not None and attn_bias.dtype == torch.bool
    return Variant(
        causal=causal, window_left=window_left, window_right=window_right, softcap=softcap,
        alibi_slopes=alibi_slopes, dropout_p=dropout_p,
        seed=int(seed.item()) if seed is not None and dropout_p > 0.0 else 0,
        bias=None if is_mask else attn_bias, mask=attn_bias if is_mask else None,
        block_mask=None if block_mask is None else BlockMask(
            block_mask, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_size),
        deterministic=deterministic, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, tile_size=tile_size,
    )


def _reference_tiles(variant: Variant) -> tuple[int, ...]:
    """The PyTorch path's (block_m, block_n): the caller's tile_size, or its defaults."""
    return (variant.tile_size, variant.tile_size) if variant.tile_size else ()


def forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, variant: Variant, backend: str,
            ) -> tuple[Tensor, Tensor]:
    """O (B, Sq, H, D) and lse (B, H, Sq), contiguous; O from torch's CPU kernel is in the layout
    torch.empty_like(q) gives instead (cpu.forward)."""
    batch, seqlen_q, nheads, _ = q.shape
    if q.numel() == 0 or k.shape[1] == 0:
        # No key at all: every row sees nothing, so O = 0 and lse = +inf (the kernel's convention).
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((batch, nheads, seqlen_q), float("inf"), dtype=lse_dtype(q.dtype), device=q.device)
        return out, lse
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if backend == "triton":
        from flashattn.ops.triton import forward as triton_forward
        return triton_forward.forward(q, k, v, softmax_scale, variant)
    if cpu.applies(q, k, variant):
        result = cpu.forward(q, k, v, softmax_scale, variant.causal)
        if result is not None:
            return result
    with _no_autocast(q):
        return reference.flash_attention_forward(q, k, v, softmax_scale, variant, *_reference_tiles(variant))


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             dlse: Tensor | None, softmax_scale: float, variant: Variant, bias_grad: bool, backend: str,
             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """dq, dk, dv, and dbias (shaped like variant.bias; None unless bias_grad)."""
    if q.numel() == 0 or k.numel() == 0:
        dbias = torch.zeros_like(variant.bias) if bias_grad else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    dout, out = _last_dim_contiguous(dout), _last_dim_contiguous(out)
    q, k, v, lse = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), lse.contiguous()
    if dlse is not None:
        dlse = dlse.to(lse.dtype).contiguous()
    if backend == "triton":
        from flashattn.ops.triton import backward as triton_backward
        return triton_backward.backward(dout, q, k, v, out, lse, softmax_scale, variant, dlse,
                                        bias_grad=bias_grad)
    if cpu.applies(q, k, variant, dlse):
        grads = cpu.backward(dout, q, k, v, out, lse, softmax_scale, variant.causal)
        if grads is not None:
            return (*grads, None)
    with _no_autocast(q):
        return reference.flash_attention_backward(dout, q, k, v, out, lse, softmax_scale, variant, dlse,
                                                  *_reference_tiles(variant), bias_grad=bias_grad)


def kv_cache_forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None, v: Tensor | None,
                     rotary_cos: Tensor | None, rotary_sin: Tensor | None, cache_seqlens: Tensor | None,
                     cache_seqlen: int, cache_leftpad: Tensor | None, cache_batch_idx: Tensor | None, block_table: Tensor | None,
                     softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
                     alibi_slopes: Tensor | None, rotary_interleaved: bool, num_splits: int, backend: str,
                     ) -> tuple[Tensor, Tensor]:
    """Append k, v to the cache (in place), then attend: O (B, Sq, H, D) and lse (B, H, Sq). The
    arguments are validated (flashattn/kvcache.py); the semantics are variant.KVCache's. Without
    cache_seqlens, every sequence holds cache_seqlen tokens."""
    batch, seqlen_q, nheads, _ = q.shape
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 0
    cache = KVCache(cache_seqlens if cache_seqlens is not None else cache_seqlen, k.shape[1] if k is not None else 0, cache_leftpad, cache_batch_idx,
                    block_table, page_size, block_table.shape[1] * page_size if paged else k_cache.shape[1])
    variant = make_variant(batch, nheads, causal, window_left, window_right, softcap, alibi_slopes, 0.0, None,
                           None, None, None, None, None, None, 0, False)
    # flash-attn's rule: with a causal or windowed mask each query row is its own position (cache
    # length + i); otherwise all of them are at the cache length.
    q_all_positions = window_left >= 0 or window_right >= 0
    if backend == "triton":
        from flashattn.ops.triton import decode
        q = decode.append(q, k_cache, v_cache, k, v, cache, rotary_cos, rotary_sin, rotary_interleaved,
                          q_all_positions)
        if q.numel() == 0:
            return torch.zeros_like(q), torch.full((batch, nheads, seqlen_q), float("inf"), dtype=lse_dtype(q.dtype),
                                                  device=q.device)
        return decode.forward(_last_dim_contiguous(q), k_cache, v_cache, softmax_scale, variant, cache, num_splits,
                              after_append=decode.appends(k, rotary_cos))
    with _no_autocast(q):
        q = reference.kv_cache_append(q, k_cache, v_cache, k, v, cache, rotary_cos, rotary_sin, rotary_interleaved,
                                      q_all_positions)
        return reference.kv_cache_forward(q, k_cache, v_cache, softmax_scale, variant, cache)
