"""Tile shapes per GPU architecture, head dim and dtype: a table, so a new shape never waits on autotuning.

Shapes for the CPU interpreter are small, so that
the tests at tiny sequence lengths still cross several tiles and the causal diagonal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Under TRITON_INTERPRET=1 the kernels run on CPU tensors; BLOCK_M != BLOCK_N exercises the diagonal.
INTERPRETER = TileConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)


def _bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


# (head dim bucket, 16-bit?, causal) -> config, measured on an H100 with benchmarks/sweep.py (bf16,
# 16k tokens, seqlen 2k and 8k; benchmarks/results/ holds the sweep). Other GPUs reuse them: correct
# everywhere, untuned elsewhere.
_FWD = {
    (64, True, False): TileConfig(128, 64, 8, 3),
    (64, True, True): TileConfig(128, 64, 8, 3),
    (128, True, False): TileConfig(128, 64, 8, 3),
    (128, True, True): TileConfig(128, 64, 8, 3),
    (256, True, False): TileConfig(64, 64, 4, 3),
    (256, True, True): TileConfig(64, 64, 4, 3),
    # fp32 runs true fp32 products (no tensor cores): small tiles keep the spills down.
    (64, False, False): TileConfig(64, 32, 4, 2),
    (64, False, True): TileConfig(64, 32, 4, 2),
    (128, False, False): TileConfig(32, 32, 4, 2),
    (128, False, True): TileConfig(32, 32, 4, 2),
    (256, False, False): TileConfig(32, 16, 4, 2),
    (256, False, True): TileConfig(32, 16, 4, 2),
}
# Backward: block_m = query rows per inner step, block_n = keys owned by one program (dK/dV kernel);
# the dQ kernel swaps the roles (block_m queries owned, block_n keys per step).
_BWD = {
    (64, True, False): TileConfig(64, 64, 4, 2),
    (64, True, True): TileConfig(32, 64, 4, 3),
    (128, True, False): TileConfig(64, 64, 4, 2),
    (128, True, True): TileConfig(64, 64, 4, 2),
    (256, True, False): TileConfig(64, 32, 4, 2),
    (256, True, True): TileConfig(64, 32, 4, 2),
    (64, False, False): TileConfig(32, 64, 4, 2),
    (64, False, True): TileConfig(32, 64, 4, 2),
    (128, False, False): TileConfig(32, 32, 4, 2),
    (128, False, True): TileConfig(32, 32, 4, 2),
    (256, False, False): TileConfig(16, 32, 4, 1),
    (256, False, True): TileConfig(16, 32, 4, 1),
}


def _lookup(table: dict, head_dim: int, dtype: torch.dtype, causal: bool, device: torch.device,
            ) -> TileConfig:
    if device.type != "cuda":
        return INTERPRETER
    return table[(_bucket(head_dim), dtype != torch.float32, causal)]


def forward_config(head_dim: int, dtype: torch.dtype, causal: bool, device: torch.device) -> TileConfig:
    return _lookup(_FWD, head_dim, dtype, causal, device)


def backward_config(head_dim: int, dtype: torch.dtype, causal: bool, device: torch.device) -> TileConfig:
    return _lookup(_BWD, head_dim, dtype, causal, device)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products: a tf32 dot would be 1000x less precise than the
    fp32 math users compare against. 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
