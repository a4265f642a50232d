"""Public API, with flash-attn 2.x names and signatures: switching is a change of import.

All input validation happens here, once, with exceptions that name the observed value and what is
accepted. Below this layer nothing checks user input again.
"""
from __future__ import annotations

import math

import torch

from flashattn.ops import capabilities, custom_ops, dispatch, reference

Tensor = torch.Tensor


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _validate(q: Tensor, k: Tensor, v: Tensor, dropout_p, softmax_scale, causal, window_size,
              softcap, alibi_slopes) -> tuple[str, float]:
    """Check every argument; return the backend and the softmax scale to use."""
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
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(isinstance(w, int) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1: unbounded), got {window_size!r}")
    if not (isinstance(softcap, (int, float)) and softcap >= 0.0):
        raise ValueError(f"softcap must be a float >= 0 (0: off), got {softcap!r}")
    if alibi_slopes is not None:
        _check_tensor("alibi_slopes", alibi_slopes)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    elif not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")

    backend = dispatch.select_backend(q.device)
    spec = dispatch.spec(backend)
    problems = capabilities.input_problems(spec, q.dtype, head_dim)
    if problems:
        error = TypeError if q.dtype not in spec.dtypes else ValueError
        raise error("; ".join(problems))
    features = capabilities.requested_features(
        causal=causal, gqa=nheads != nheads_k, dropout_p=float(dropout_p), window_size=window_size,
        softcap=float(softcap), alibi_slopes=alibi_slopes)
    missing = capabilities.missing_features(spec, features)
    if missing:
        raise NotImplementedError(f"the {backend} kernel does not implement yet: {', '.join(missing)}")
    return backend, float(softmax_scale)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False):
    """Exact attention softmax(softmax_scale * q k^T) v, computed by FlashAttention.

    Args:
        q: (batch, seqlen_q, nheads, headdim).
        k, v: (batch, seqlen_k, nheads_k, headdim); nheads must be a multiple of nheads_k
            (MQA/GQA: query head h uses key/value head h // (nheads // nheads_k)).
        dropout_p: dropout probability; only 0.0 for now (NotImplementedError otherwise).
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: mask aligned to the bottom-right corner of the score matrix, so query i sees keys
            j <= i + seqlen_k - seqlen_q (flash-attn >= 2.1). Rows that see no key output 0.
        window_size, softcap, alibi_slopes: flash-attn options; only their neutral values
            ((-1, -1), 0.0, None) for now (NotImplementedError otherwise).
        deterministic: the backward is currently always deterministic; accepted for compatibility.
        return_attn_probs: also return the log-sum-exp (batch, nheads, seqlen_q) float32 and the
            attention probabilities (batch, nheads, seqlen_q, seqlen_k). The probabilities cost
            O(N^2) memory: a debugging aid, never for production.

    Dtypes: float16, bfloat16 and float32 (float32 products are exact fp32, not tf32); on the
    PyTorch path float64 too. Head dims 1 to 256. CUDA tensors run the Triton kernels, other
    devices the PyTorch implementation of the same algorithm; FLASHATTN_BACKEND=triton|reference
    forces one, and TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors.

    Returns:
        out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, attn_probs) when
        return_attn_probs. softmax_lse is +inf for rows that see no key.
    """
    backend, scale = _validate(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                               alibi_slopes)
    out, lse = custom_ops.attention_forward(q, k, v, scale, causal, backend)
    if not return_attn_probs:
        return out
    with torch.no_grad():
        probs = reference.attention_probs(q, k, scale, causal)
    return out, lse, probs


def _check_packed(name: str, x, dim: int, count: int) -> None:
    _check_tensor(name, x)
    if x.dim() != 5 or x.shape[dim] != count:
        layout = "(batch, seqlen, 3, nheads, headdim)" if count == 3 else "(batch, seqlen_k, 2, nheads_k, headdim)"
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                              softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                              deterministic: bool = False, return_attn_probs: bool = False):
    """flash_attn_func with q, k, v packed as qkv (batch, seqlen, 3, nheads, headdim).

    The three are strided views of qkv, not copies; the gradient arrives as one (batch, seqlen, 3,
    nheads, headdim) tensor. Same options and return values as flash_attn_func.
    """
    _check_packed("qkv", qkv, 2, 3)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0,
                             softmax_scale: float | None = None, causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False):
    """flash_attn_func with k, v packed as kv (batch, seqlen_k, 2, nheads_k, headdim).

    Same options and return values as flash_attn_func.
    """
    _check_packed("kv", kv, 2, 2)
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)
