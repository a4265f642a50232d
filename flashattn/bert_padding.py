"""flash-attn's `flash_attn.bert_padding` helpers, under the same names: from a padded batch and its
key-padding mask to the packed (varlen) layout that `flash_attn_varlen_func` takes, and back.

    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, attention_mask)
    out_unpad = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens,
                                       max_seqlen, max_seqlen)
    out = pad_input(out_unpad, indices, batch, seqlen)       # zeros at the padding

Written from flash-attn's documented behaviour (2.7+: `unpad_input` returns five values). The
validation happens here, at the boundary, with exceptions that give the observed values.
"""
from __future__ import annotations

import torch

from flashattn.interface import _check_tensor, _check_traced, _is_int

Tensor = torch.Tensor

__all__ = ["index_first_axis", "index_put_first_axis", "unpad_input", "pad_input"]

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_indices(indices, name_x: str, x: Tensor, count_dim: int | None = None) -> None:
    """indices: 1-D int64/int32 on x's device; with count_dim, as many entries as x.shape[0]."""
    _check_tensor("indices", indices)
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D (total_nnz,), got shape {tuple(indices.shape)}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"indices must be int64 (as unpad_input returns) or int32, got {indices.dtype}")
    if indices.device != x.device:
        raise ValueError(f"indices must be on {name_x}'s device {x.device}, got {indices.device}")
    if count_dim is not None and indices.shape[0] != x.shape[0]:
        raise ValueError(f"{name_x} has {x.shape[0]} rows (shape {tuple(x.shape)}) but indices has "
                         f"{indices.shape[0]} entries: they must match, one index per row")


class _IndexFirstAxis(torch.autograd.Function):
    """x[indices] along dim 0. The backward adds the gradient rows into zeros with index_add_
    (a plain scatter when the indices are distinct, a sum where they repeat), instead of the
    sort-based accumulation that the backward of advanced indexing runs."""

    @staticmethod
    def forward(ctx, x: Tensor, indices: Tensor) -> Tensor:
        ctx.save_for_backward(indices)
        ctx.first_axis_dim = x.shape[0]
        return x.index_select(0, indices)                                  # (nnz, ...)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (indices,) = ctx.saved_tensors
        grad_x = grad_out.new_zeros((ctx.first_axis_dim, *grad_out.shape[1:]))  # (N, ...)
        grad_x.index_add_(0, indices, grad_out)
        return grad_x, None


class _IndexPutFirstAxis(torch.autograd.Function):
    """zeros(first_axis_dim, ...) with values' rows at indices (distinct). The backward gathers."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, first_axis_dim: int) -> Tensor:
        ctx.save_for_backward(indices)
        # Out of place, a purely functional graph: filled in place (index_copy_ into new zeros), this
        # output's gradient reached torch 2.11's compiled backward on CUDA as zeros
        # (tests/test_compile.py::test_unpad_varlen_pad_round_trip).
        return values.new_zeros((first_axis_dim, *values.shape[1:])).index_copy(0, indices, values)  # (N, ...)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (indices,) = ctx.saved_tensors
        return grad_out.index_select(0, indices), None, None               # (nnz, ...)


def index_first_axis(x: Tensor, indices: Tensor) -> Tensor:
    """x[indices] along the first axis, differentiable, with an efficient backward.

    Args:
        x: (N, ...) any dtype, any strides.
        indices: (nnz,) int64 (or int32) on x's device, each in [0, N). They may repeat; the
            gradient then sums over the repeats, as x[indices]'s does. Bounds are not checked here
            (that would cost a device sync): an index out of range raises in index_select on the
            CPU and is a device-side assert on CUDA.

    Returns:
        (nnz, ...), a new tensor (not a view). Its gradient with respect to x is a scatter of the
        incoming gradient into zeros of x's shape.
    """
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim (N, ...), got a 0-dim tensor")
    _check_indices(indices, "x", x)
    return _IndexFirstAxis.apply(x, indices)


def index_put_first_axis(values: Tensor, indices: Tensor, first_axis_dim: int) -> Tensor:
    """The inverse of index_first_axis: zeros of shape (first_axis_dim, ...) with values[i] at row
    indices[i]; differentiable with respect to values (the gradient gathers rows at indices).

    Args:
        values: (nnz, ...).
        indices: (nnz,) int64 (or int32) on values' device, distinct, each in [0, first_axis_dim).
            With a repeated index, which value lands there is unspecified (as for x[indices] = v).
            Neither property is checked here (it would cost a device sync).
        first_axis_dim: int >= 0, the number of rows of the result.

    Returns:
        (first_axis_dim, ...) of values' dtype and device.
    """
    _check_tensor("values", values)
    if values.dim() < 1:
        raise ValueError("values must have at least 1 dim (nnz, ...), got a 0-dim tensor")
    _check_indices(indices, "values", values, count_dim=0)
    if not (_is_int(first_axis_dim) and first_axis_dim >= 0):
        raise ValueError(f"first_axis_dim must be an int >= 0, got {first_axis_dim!r}")
    return _IndexPutFirstAxis.apply(values, indices, first_axis_dim)


def _check_mask(name: str, mask, hidden_states: Tensor) -> None:
    _check_tensor(name, mask)
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"{name} must be bool or an integer dtype with values 0/1 (1 = keep), got "
                        f"{mask.dtype}; for a float mask pass mask > 0.5 or mask.bool()")
    if mask.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, seqlen), got shape {tuple(mask.shape)}")
    if tuple(mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not match hidden_states of shape "
                         f"{tuple(hidden_states.shape)}: it must be (batch, seqlen) = "
                         f"{tuple(hidden_states.shape[:2])}")
    if mask.device != hidden_states.device:
        raise ValueError(f"{name} must be on hidden_states' device {hidden_states.device}, got "
                         f"{mask.device}")


def _first_position(flags: Tensor) -> tuple[int, int]:
    """(row, column) of the first True in a 2-D bool tensor (only called to word an error)."""
    flat = int(torch.nonzero(flags.flatten())[0, 0])
    return divmod(flat, flags.shape[1])


def _nonzero_static(flags: Tensor, size: int) -> Tensor:
    """torch.nonzero with its count known on the host (no second sync); plain nonzero where the
    device has no nonzero_static kernel."""
    try:
        return torch.nonzero_static(flags, size=size).flatten()
    except NotImplementedError:
        return torch.nonzero(flags).flatten()


def unpad_input(hidden_states: Tensor, attention_mask: Tensor, unused_mask: Tensor | None = None):
    """Pack the real tokens of a padded batch, for the varlen functions (flash-attn 2.7+'s
    convention: five return values; flash-attn before 2.7 returned the first four).

    Args:
        hidden_states: (batch, seqlen, ...), any dtype.
        attention_mask: (batch, seqlen), bool or integer with values 0/1 (1 = real token), on
            hidden_states' device. Any pattern: left-, right-padded or with holes; rows may be all
            padding or all real.
        unused_mask: optional, (batch, seqlen) like attention_mask: tokens allocated but unused (a
            static buffer's tail). They are packed too, counted in cu_seqlens and max_seqlen but not
            in seqused. It must not overlap attention_mask, and in each row its tokens must come
            after all the row's real tokens, so that the first seqused[b] packed tokens of sequence
            b are its real ones (what a kernel taking seqused reads).

    Returns:
        (hidden_states_unpad, indices, cu_seqlens, max_seqlen_in_batch, seqused):
        hidden_states_unpad: (total_nnz, ...), the kept tokens, sequence by sequence, each
            sequence's tokens in their original order. Differentiable (see index_first_axis).
        indices: (total_nnz,) int64, each kept token's position in the flattened (batch * seqlen)
            input, ascending: what pad_input takes back.
        cu_seqlens: (batch + 1,) int32, cumulative kept tokens per sequence from 0: sequence b is
            hidden_states_unpad[cu_seqlens[b]:cu_seqlens[b + 1]].
        max_seqlen_in_batch: Python int, the most kept tokens in one sequence (0 when none).
        seqused: (batch,) int32, the real tokens per sequence (attention_mask's count, unused ones
            excluded; this is what flash-attn's code returns, although its docstring's wording
            says "attention_mask + unused_mask"). Equal to the sequence lengths without unused_mask.
        The index tensors are on the mask's device.

    Cost: one device synchronisation, to read max_seqlen_in_batch as a Python int (as flash-attn
    does; the same read brings back the token count and the masks' checks, so the packing itself
    needs none where torch.nonzero_static exists for the device).

    Under torch.compile (or torch.export) no value is read while tracing: max_seqlen_in_batch is then
    seqlen, the padded length (an upper bound of every sequence, which the varlen functions accept:
    their grid is that long), the masks' values are not checked (nonzero = a token), and the number
    of tokens, hence the first dim of hidden_states_unpad and indices, is a data-dependent size (the
    nonzero that finds the tokens still synchronises a GPU when the graph runs, and a CUDA graph
    cannot hold it): one graph with torch.compile(fullgraph=True) (torch 2.13 captures such sizes
    then) or with torch._dynamo.config.capture_dynamic_output_shape_ops = True; otherwise a graph
    break at the packing. flashattn.nn.FlashAttention avoids packing there altogether (static shapes,
    no synchronisation: see its forward).

    Raises:
        TypeError / ValueError for a mask of the wrong type, dtype, shape or device, an integer mask
        with a value other than 0 or 1, or an unused_mask that overlaps attention_mask or precedes
        a real token in its row.
    """
    _check_tensor("hidden_states", hidden_states)
    if hidden_states.dim() < 2:
        raise ValueError(f"hidden_states must have at least 2 dims (batch, seqlen, ...), got shape "
                         f"{tuple(hidden_states.shape)}")
    _check_mask("attention_mask", attention_mask, hidden_states)
    if unused_mask is not None:
        _check_mask("unused_mask", unused_mask, hidden_states)
    batch, seqlen = hidden_states.shape[:2]
    device = attention_mask.device

    used = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0    # (b, s)
    kept = used if unused_mask is None else used | (unused_mask != 0)                      # (b, s)
    seqlens = kept.sum(dim=-1, dtype=torch.int32)                                          # (b,)
    seqused = used.sum(dim=-1, dtype=torch.int32) if unused_mask is not None else seqlens  # (b,)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))  # (b + 1,)
    flat = hidden_states.reshape(batch * seqlen, *hidden_states.shape[2:])   # (b * s, ...)

    if torch.compiler.is_compiling():
        # Traced: no host read (see the docstring); the token count is a data-dependent size.
        indices = torch.nonzero(kept.flatten()).flatten()                 # (total_nnz,) int64
        return index_first_axis(flat, indices), indices, cu_seqlens, seqlen, seqused

    # Everything the host needs, read back in one transfer (the one synchronisation).
    checks = {}
    if attention_mask.dtype != torch.bool:
        checks["attention_mask"] = (used & (attention_mask != 1))
    if unused_mask is not None:
        unused = unused_mask != 0
        if unused_mask.dtype != torch.bool:
            checks["unused_mask"] = unused & (unused_mask != 1)
        checks["overlap"] = used & unused
        checks["order"] = used & (torch.cumsum(unused, dim=-1) > 0)   # a real token after an unused one
    zero = torch.zeros((), dtype=torch.int64, device=device)
    stats = torch.stack([seqlens.max().long() if batch else zero, seqlens.sum(dtype=torch.int64),
                         *(flags.sum(dtype=torch.int64) for flags in checks.values())]).tolist()
    max_seqlen, total = stats[0], stats[1]
    bad = {name: count for name, count in zip(checks, stats[2:]) if count}
    for name in ("attention_mask", "unused_mask"):
        if name in bad:
            mask = attention_mask if name == "attention_mask" else unused_mask
            b, s = _first_position(checks[name])
            raise ValueError(f"{name} must hold only 0 and 1 (1 = keep), got {bad[name]} other "
                             f"value(s), e.g. {mask[b, s].item()} at (batch {b}, position {s}); "
                             f"pass {name} != 0 (or .bool()) if any nonzero means keep")
    if "overlap" in bad:
        b, s = _first_position(checks["overlap"])
        raise ValueError(f"unused_mask overlaps attention_mask at {bad['overlap']} token(s), e.g. "
                         f"(batch {b}, position {s}): a token is real or allocated-but-unused, not "
                         "both; pass unused_mask & ~attention_mask")
    if "order" in bad:
        b, s = _first_position(checks["order"])
        raise ValueError(f"in row {b}, real token {s} comes after an unused one: unused_mask's tokens "
                         "must follow every real token of their row, so that seqused counts a prefix "
                         "of each packed sequence")

    indices = _nonzero_static(kept.flatten(), total)                   # (total_nnz,) int64
    return index_first_axis(flat, indices), indices, cu_seqlens, int(max_seqlen), seqused


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """The inverse of unpad_input: put the packed tokens back in a padded batch.

    Args:
        hidden_states: (total_nnz, ...), e.g. the output of flash_attn_varlen_func.
        indices: (total_nnz,) int64 (or int32), as unpad_input returned: distinct positions in the
            flattened (batch * seqlen) batch (not checked: it would cost a device sync).
        batch, seqlen: ints >= 0, the padded shape.

    Returns:
        (batch, seqlen, ...) with hidden_states' rows at their positions and zeros at the padding.
        Differentiable with respect to hidden_states (see index_put_first_axis).
    """
    _check_tensor("hidden_states", hidden_states)
    if hidden_states.dim() < 1:
        raise ValueError("hidden_states must have at least 1 dim (total_nnz, ...), got a 0-dim tensor")
    for name, n in (("batch", batch), ("seqlen", seqlen)):
        if not (_is_int(n) and n >= 0):
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    _check_indices(indices, "hidden_states", hidden_states, count_dim=0)
    if torch.compiler.is_compiling():
        # The row count may be a data-dependent size there (unpad_input's): a runtime assertion, no guard.
        _check_traced(hidden_states.shape[0] <= batch * seqlen)
    elif hidden_states.shape[0] > batch * seqlen:
        raise ValueError(f"hidden_states has {hidden_states.shape[0]} rows, more than batch x seqlen = "
                         f"{batch} x {seqlen} = {batch * seqlen} positions")
    out = _IndexPutFirstAxis.apply(hidden_states, indices, batch * seqlen)   # (b * s, ...)
    return out.view(batch, seqlen, *hidden_states.shape[1:])                 # (b, s, ...)
