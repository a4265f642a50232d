"""What each attention kernel supports, declared in one place.

The public functions ask :func:`input_problems` and :func:`missing_features` before dispatching,
and an unsupported call raises one exception that lists every reason at once (the xformers habit),
instead of failing on the first check or, worse, silently ignoring an option.
Tests build their parameter grids from these declarations too, so a capability added here is a
capability tested.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelSpec:
    """Declaration of one kernel family."""

    name: str
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int
    # Options (ALL_FEATURES) that this kernel implements. Anything else must be at its neutral
    # value (dropout_p=0, window_size=(-1, -1), softcap=0, alibi_slopes=None, attn_bias=None,
    # block_mask=None, deterministic=False).
    features: frozenset[str]
    min_head_dim: int = 1


# The options of the public functions, one name each:
#   causal        causal=True (or window_size=(-1, 0), the same thing)
#   gqa           nheads_k < nheads (MQA/GQA)
#   dropout       dropout_p > 0
#   window        window_size other than (-1, -1) and (-1, 0)
#   softcap       softcap > 0
#   alibi         alibi_slopes given
#   bias          attn_bias given as a float tensor
#   mask          attn_bias given as a bool tensor
#   block_sparse  block_mask given
#   deterministic deterministic=True (a kernel whose backward is always deterministic declares it)
ALL_FEATURES = ("causal", "gqa", "dropout", "window", "softcap", "alibi", "bias", "mask", "block_sparse",
                "deterministic")
EVERY_FEATURE = frozenset(ALL_FEATURES)   # a kernel declaring all of them needs no per-call feature check

TRITON = KernelSpec(
    name="triton",
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    max_head_dim=256,
    # Every option, in every combination (constexpr flags of the kernels, flashattn/ops/triton/common.py).
    # Two backwards add with atomics: Hopper's one-pass backward of plain calls (dQ; deterministic=True
    # orders the adds) and a bias gradient that broadcasts over batch or heads (deterministic=True
    # computes it without them).
    features=EVERY_FEATURE,
)

# The PyTorch implementation of the same tiled algorithm; it also takes float64, which makes it
# usable as a high-precision check of the algorithm itself. It implements every option, in every
# combination, and is always deterministic.
REFERENCE = KernelSpec(
    name="reference",
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    max_head_dim=256,
    features=EVERY_FEATURE,
)

KERNELS = {spec.name: spec for spec in (TRITON, REFERENCE)}


def requested_features(
    *, causal: bool, gqa: bool, dropout_p: float, window_size: tuple[int, int],
    softcap: float, alibi_slopes: torch.Tensor | None, attn_bias: torch.Tensor | None = None,
    block_mask=None, deterministic: bool = False,
) -> set[str]:
    """The set of non-neutral options in a call (window_size already combined with causal)."""
    used = set()
    if causal or tuple(window_size) == (-1, 0):
        used.add("causal")
    if gqa:
        used.add("gqa")
    if dropout_p > 0.0:
        used.add("dropout")
    if tuple(window_size) not in ((-1, -1), (-1, 0)):
        used.add("window")
    if softcap != 0.0:
        used.add("softcap")
    if alibi_slopes is not None:
        used.add("alibi")
    if attn_bias is not None:
        used.add("mask" if attn_bias.dtype == torch.bool else "bias")
    if block_mask is not None:
        used.add("block_sparse")
    if deterministic:
        used.add("deterministic")
    return used


def input_problems(spec: KernelSpec, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Every reason why `spec` cannot take tensors of this dtype and head dim; empty when it can."""
    problems = []
    if dtype not in spec.dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in spec.dtypes)
        problems.append(f"dtype {dtype} is not supported by the {spec.name} kernel (use one of: {names})")
    if not spec.min_head_dim <= head_dim <= spec.max_head_dim:
        problems.append(f"head dim {head_dim} is outside [{spec.min_head_dim}, {spec.max_head_dim}] "
                        f"for the {spec.name} kernel")
    return problems


def missing_features(spec: KernelSpec, features: set[str]) -> list[str]:
    """The requested options that `spec` does not implement, sorted."""
    return sorted(features - spec.features)
