"""The error rule every numerical test uses (flash-attn's): compared with a float64 reference, our
error must stay within a small factor of the error of the same computation done the standard way in
the same dtype, plus one rounding unit of the dtype. A loose absolute tolerance would let real bugs
through at small magnitudes and fail honest kernels at large ones.
"""
import torch

# The one table of allowed factors.
ERROR_FACTORS = {"out": 2.0, "lse": 2.0, "dq": 3.0, "dk": 3.0, "dv": 3.0, "dbias": 3.0,
                 # the layers (flashattn.nn): attention weights returned, gradients of inputs and parameters.
                 # A parameter's gradient sums every token's share after the whole layer's backward, and
                 # which of two fp32 orders lands nearer float64 varies with the CPU's kernels: 3 held on
                 # an Intel Xeon, but on an AMD EPYC, over six seeds of each layer case, (ours - rounding)
                 # / same-dtype error reached 3.1 once (2.2 otherwise), at about ten fp32 units.
                 "weights": 2.0, "dinput": 3.0, "dparam": 4.0}


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference; infinities must coincide (rows that see no key)."""
    x, ref = x.double(), ref.double()
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(x), inf), "infinities differ from the reference"
    assert not torch.isnan(x).any(), "NaN in the result"
    if inf.all():
        return 0.0
    return (x[~inf] - ref[~inf]).abs().max().item() if x.numel() else 0.0


def fp32_accumulation(head_dim: int) -> float:
    """The kernels accumulate in fp32. Where the exact answer is 0 (the gradient through a single key:
    dP - delta cancels), what is left is the rounding of two head_dim-term fp32 dot products of unit
    scale, which grows like sqrt(head_dim); no kernel can do better."""
    return 4 * torch.finfo(torch.float32).eps * max(1.0, head_dim ** 0.5)


def rounding_unit(ref: torch.Tensor, dtype: torch.dtype, head_dim: int) -> float:
    """Twice the rounding error of `dtype` at the magnitude of `ref` (flash-attn's atol), and at
    least the fp32 accumulators' own rounding."""
    r = ref[torch.isfinite(ref)].to(dtype)
    unit = 2 * (r + 0.3 - 0.3 - r).abs().max().item() if r.numel() else 0.0
    return max(unit, fp32_accumulation(head_dim))


def summation_rounding(terms: torch.Tensor, n: int) -> float:
    """The rounding of an fp32 sum of n terms no larger than `terms`' largest, in an order the kernel
    chooses (tiles, atomics): about sqrt(n) rounding units of the terms' scale."""
    return 4 * torch.finfo(torch.float32).eps * n ** 0.5 * terms.abs().max().item()


def assert_within_factor(name: str, ours: torch.Tensor, same_dtype: torch.Tensor, ref64: torch.Tensor,
                         dtype: torch.dtype, head_dim: int, extra_floor: float = 0.0) -> None:
    err = max_error(ours, ref64)
    yardstick = max_error(same_dtype, ref64)
    floor = rounding_unit(ref64, dtype, head_dim) + extra_floor
    bound = ERROR_FACTORS[name] * yardstick + floor
    assert err <= bound, (f"{name}: error {err:.3g} > {ERROR_FACTORS[name]} x same-dtype error "
                          f"{yardstick:.3g} + rounding {floor:.3g}")
