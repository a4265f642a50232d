"""What is measured: the grid of attention shapes, and the FLOPs each shape is credited with.

GPU grid (FlashAttention-2 paper, section 4.1): batch * seqlen = 16k tokens and model dim 2048,
so head dim 64 runs 32 heads, 128 runs 16 and 256 runs 8; bf16; seqlen 512 to 16k; causal or not;
forward and backward. The CPU grid is small: B=1, H=8, D=64, float32, seqlen 256 to 2k.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("fwd", "bwd")
MEMORY_PASS = "fwd+bwd"


@dataclass(frozen=True)
class Case:
    """One attention call: q, k, v all have `batch` x `seqlen` x `nheads` x `headdim` elements."""

    dtype: str
    batch: int
    nheads: int
    seqlen: int
    headdim: int
    causal: bool
    pass_: str  # "fwd", "bwd", or "fwd+bwd" (memory section)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def flops(self) -> float:
        """Forward 4 B H N^2 D (two matmuls), halved when causal; backward 2.5 x forward."""
        forward = 4.0 * self.batch * self.nheads * self.seqlen ** 2 * self.headdim
        if self.causal:
            forward /= 2
        return {"fwd": forward, "bwd": 2.5 * forward, MEMORY_PASS: 3.5 * forward}[self.pass_]

    @property
    def group(self) -> tuple[str, int, bool, str]:
        """The cases that share a table section and a plot panel differ only in seqlen."""
        return self.dtype, self.headdim, self.causal, self.pass_

    def label(self) -> str:
        mask = "causal" if self.causal else "full"
        return (f"{self.dtype} d={self.headdim} {mask} {self.pass_} "
                f"B={self.batch} H={self.nheads} N={format_seqlen(self.seqlen)}")

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "batch": self.batch, "nheads": self.nheads,
                "seqlen": self.seqlen, "headdim": self.headdim, "causal": self.causal,
                "pass": self.pass_, "flops": self.flops}


@dataclass(frozen=True)
class Grid:
    """A cartesian product of settings; batch and heads follow from `tokens` and `model_dim`."""

    dtypes: tuple[str, ...]
    head_dims: tuple[int, ...]
    seqlens: tuple[int, ...]
    causal: tuple[bool, ...]
    passes: tuple[str, ...]
    tokens: int | None = None     # batch = tokens // seqlen when set, else batch = 1
    model_dim: int | None = None  # nheads = model_dim // headdim when set, else `nheads`
    nheads: int = 8

    def shape(self, seqlen: int, headdim: int) -> tuple[int, int]:
        batch = max(1, self.tokens // seqlen) if self.tokens else 1
        nheads = max(1, self.model_dim // headdim) if self.model_dim else self.nheads
        return batch, nheads

    def cases(self) -> list[Case]:
        """Ordered like the table: dtype, head dim, causal, pass, then seqlen."""
        out = []
        for dtype in self.dtypes:
            for headdim in self.head_dims:
                for causal in self.causal:
                    for pass_ in self.passes:
                        for seqlen in self.seqlens:
                            batch, nheads = self.shape(seqlen, headdim)
                            out.append(Case(dtype, batch, nheads, seqlen, headdim, causal, pass_))
        return out

    def override(self, **fields) -> Grid:
        """This grid with the given fields replaced; None values keep the default."""
        return replace(self, **{k: v for k, v in fields.items() if v is not None})


GPU_GRID = Grid(dtypes=("bf16",), head_dims=(64, 128, 256),
                seqlens=(512, 1024, 2048, 4096, 8192, 16384), causal=(False, True),
                passes=PASSES, tokens=16384, model_dim=2048)
GPU_QUICK = GPU_GRID.override(head_dims=(64, 128), seqlens=(1024, 4096, 16384))

CPU_GRID = Grid(dtypes=("fp32",), head_dims=(64,), seqlens=(256, 512, 1024, 2048),
                causal=(False, True), passes=PASSES, nheads=8)
CPU_QUICK = CPU_GRID.override(seqlens=(256, 1024))


@dataclass(frozen=True)
class MemoryGrid:
    """Peak memory of one forward + backward at B=1, H=16, D=128, causal, long sequences."""

    seqlens: tuple[int, ...] = (1024, 4096, 16384, 65536, 131072)
    batch: int = 1
    nheads: int = 16
    headdim: int = 128
    causal: bool = True

    def cases(self, dtype: str) -> list[Case]:
        return [Case(dtype, self.batch, self.nheads, n, self.headdim, self.causal, MEMORY_PASS)
                for n in self.seqlens]


MEMORY_GRID = MemoryGrid()
MEMORY_QUICK = MemoryGrid(seqlens=(16384, 65536))


def parse_seqlen(text: str) -> int:
    """'512' -> 512, '4k' -> 4096, '128K' -> 131072."""
    text = text.strip().lower()
    value = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    if value <= 0:
        raise ValueError(f"sequence length must be positive, got {text!r}")
    return value


def format_seqlen(n: int) -> str:
    """512 -> '512', 4096 -> '4k', 1536 -> '1536'."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
