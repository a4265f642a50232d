"""Backend choice and the launch boundary shared by every backend.

Everything that is not specific to one kernel lives here once: which backend runs, the empty-tensor
cases (no kernel launches on zero-size grids), and making the last dim contiguous.
"""
from __future__ import annotations

import os

import torch

from flashattn.ops import capabilities, reference

Tensor = torch.Tensor
BACKENDS = ("triton", "reference")


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_backend(device: torch.device) -> str:
    """CUDA tensors -> Triton; other devices -> the PyTorch path, or Triton under TRITON_INTERPRET=1.

    FLASHATTN_BACKEND=triton|reference forces one.
    """
    forced = os.environ.get("FLASHATTN_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FLASHATTN_BACKEND={forced!r} is not one of {BACKENDS}")
        if forced == "triton" and device.type == "cpu" and not triton_interpreter():
            raise ValueError("FLASHATTN_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 "
                             "(the Triton interpreter); unset FLASHATTN_BACKEND to use the PyTorch path")
        return forced
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreter()):
        return "triton"
    return "reference"


def spec(backend: str) -> capabilities.KernelSpec:
    return capabilities.KERNELS[backend]


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool, backend: str,
            ) -> tuple[Tensor, Tensor]:
    """O (B, Sq, H, D) contiguous and lse (B, H, Sq)."""
    batch, seqlen_q, nheads, _ = q.shape
    if q.numel() == 0 or k.shape[1] == 0:
        # No key at all: every row sees nothing, so O = 0 and lse = +inf (the kernel's convention).
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((batch, nheads, seqlen_q), float("inf"), dtype=lse_dtype(q.dtype), device=q.device)
        return out, lse
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    if backend == "triton":
        from flashattn.ops.triton import forward as triton_forward
        return triton_forward.forward(q, k, v, softmax_scale, causal)
    return reference.flash_attention_forward(q, k, v, softmax_scale, causal)


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             dlse: Tensor | None, softmax_scale: float, causal: bool, backend: str,
             ) -> tuple[Tensor, Tensor, Tensor]:
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dout, q, k, v, out = (_last_dim_contiguous(x) for x in (dout, q, k, v, out))
    lse = lse.contiguous()
    if dlse is not None:
        dlse = dlse.to(lse.dtype).contiguous()
    if backend == "triton":
        from flashattn.ops.triton import backward as triton_backward
        return triton_backward.backward(dout, q, k, v, out, lse, softmax_scale, causal, dlse)
    return reference.flash_attention_backward(dout, q, k, v, out, lse, softmax_scale, causal, dlse)
