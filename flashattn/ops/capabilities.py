"""What each attention kernel supports, declared in one place.

The public functions ask :func:`unsupported_reasons` before dispatching, and an unsupported call
raises one exception that lists every reason at once (the xformers habit), instead of failing on
the first check or, worse, silently ignoring an option.
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
    # Options from flash-attn's signature that this kernel implements. Anything else must be at
    # its neutral value (dropout_p=0, window_size=(-1, -1), softcap=0, alibi_slopes=None).
    features: frozenset[str]
    min_head_dim: int = 1


# Option names as they appear in the public signature.
ALL_FEATURES = ("causal", "gqa", "dropout", "window", "softcap", "alibi")

TRITON = KernelSpec(
    name="triton",
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    max_head_dim=256,
    features=frozenset({"causal", "gqa"}),
)

# The PyTorch implementation of the same tiled algorithm; it also takes float64, which makes it
# usable as a high-precision check of the algorithm itself.
REFERENCE = KernelSpec(
    name="reference",
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    max_head_dim=256,
    features=frozenset({"causal", "gqa"}),
)

KERNELS = {spec.name: spec for spec in (TRITON, REFERENCE)}


def requested_features(
    *, causal: bool, gqa: bool, dropout_p: float, window_size: tuple[int, int],
    softcap: float, alibi_slopes: torch.Tensor | None,
) -> set[str]:
    """The set of non-neutral options in a call."""
    used = set()
    if causal:
        used.add("causal")
    if gqa:
        used.add("gqa")
    if dropout_p > 0.0:
        used.add("dropout")
    if tuple(window_size) != (-1, -1):
        used.add("window")
    if softcap != 0.0:
        used.add("softcap")
    if alibi_slopes is not None:
        used.add("alibi")
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
