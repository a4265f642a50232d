"""flashattn.bert_padding: flash-attn's padding helpers (unpad_input, pad_input, index_first_axis,
index_put_first_axis): values against hand computations, round trips on random masks, gradients
against torch.autograd.gradcheck, and every rejected input. CPU only, small sizes."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashattn import bert_padding
from flashattn.bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]

# batch 4, seqlen 5: a row with a hole in the middle, an all-padding row, an all-real row, a
# left-padded row with a hole.
MASK = torch.tensor([[1, 0, 1, 1, 0],
                     [0, 0, 0, 0, 0],
                     [1, 1, 1, 1, 1],
                     [0, 1, 0, 0, 1]], dtype=torch.bool)
MASK_SEQLENS = [3, 0, 5, 2]
MASK_CU = [0, 3, 3, 8, 10]
MASK_INDICES = [0, 2, 3, 10, 11, 12, 13, 14, 16, 19]     # row-major positions in the 4 x 5 batch


def _x(batch, seqlen, *rest, dtype=torch.float32, requires_grad=False):
    x = torch.randn(batch, seqlen, *rest, dtype=dtype)
    return x.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------- values


def test_unpad_input_against_hand_computation():
    x = _x(4, 5, 3)
    x_unpad, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, MASK)
    assert indices.dtype == torch.int64 and indices.tolist() == MASK_INDICES
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == MASK_CU
    assert type(max_seqlen) is int and max_seqlen == 5
    assert seqused.dtype == torch.int32 and seqused.tolist() == MASK_SEQLENS
    assert x_unpad.shape == (10, 3)
    assert torch.equal(x_unpad, x.reshape(20, 3)[MASK_INDICES])
    for b in range(4):   # sequence b's tokens, in their original order
        assert torch.equal(x_unpad[MASK_CU[b]:MASK_CU[b + 1]], x[b][MASK[b]])


def test_returns_five_values_in_flash_attn_2_7_order():
    out = unpad_input(_x(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    assert len(out) == 5
    x_unpad, indices, cu_seqlens, max_seqlen, seqused = out
    assert x_unpad.shape == (6, 4) and indices.shape == (6,) and cu_seqlens.shape == (3,)
    assert max_seqlen == 3 and seqused.tolist() == [3, 3]


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_integer_mask_same_as_bool(dtype):
    x = _x(4, 5, 2)
    ref = unpad_input(x, MASK)
    got = unpad_input(x, MASK.to(dtype))
    for r, g in zip(ref, got):
        assert torch.equal(r, g) if isinstance(r, torch.Tensor) else r == g


@pytest.mark.parametrize("rest", [(), (3,), (2, 3, 4)])
def test_any_trailing_shape(rest):
    """hidden_states (batch, seqlen, ...): no feature dim, one, or several (e.g. nheads, headdim)."""
    x = _x(4, 5, *rest)
    x_unpad, indices, *_ = unpad_input(x, MASK)
    assert x_unpad.shape == (10, *rest)
    assert torch.equal(pad_input(x_unpad, indices, 4, 5), x * MASK.view(4, 5, *([1] * len(rest))))


def test_non_contiguous_hidden_states():
    qkv = _x(4, 5, 3, 2, 8)                           # (batch, seqlen, 3, nheads, headdim)
    k = qkv[:, :, 1]                                  # a strided view
    k_unpad, indices, *_ = unpad_input(k, MASK)
    assert torch.equal(k_unpad, k.contiguous().reshape(20, 2, 8)[MASK_INDICES])
    tr = _x(5, 4, 6).transpose(0, 1)                  # (batch 4, seqlen 5, 6), not mergeable as a view
    assert torch.equal(unpad_input(tr, MASK)[0], tr.reshape(20, 6)[MASK_INDICES])


def test_batch_one_and_empty():
    x = _x(1, 6, 2)
    mask = torch.tensor([[0, 1, 1, 0, 1, 0]])
    x_unpad, indices, cu, max_seqlen, seqused = unpad_input(x, mask)
    assert indices.tolist() == [1, 2, 4] and cu.tolist() == [0, 3] and max_seqlen == 3
    assert torch.equal(pad_input(x_unpad, indices, 1, 6), x * mask[..., None])
    # All padding, zero-length sequences, an empty batch: empty results, max_seqlen 0.
    for batch, seqlen in ((3, 4), (2, 0), (0, 4)):
        x = _x(batch, seqlen, 2)
        x_unpad, indices, cu, max_seqlen, seqused = unpad_input(x, torch.zeros(batch, seqlen, dtype=torch.bool))
        assert x_unpad.shape == (0, 2) and indices.shape == (0,) and max_seqlen == 0
        assert cu.tolist() == [0] * (batch + 1) and seqused.tolist() == [0] * batch
        assert torch.equal(pad_input(x_unpad, indices, batch, seqlen), torch.zeros(batch, seqlen, 2))


def test_unused_mask():
    """Allocated-but-unused tokens are packed and counted in cu_seqlens and max_seqlen, not in
    seqused; they follow each row's real tokens."""
    used = torch.tensor([[1, 1, 0, 0, 0],
                         [0, 1, 0, 1, 0],
                         [0, 0, 0, 0, 0]])
    unused = torch.tensor([[0, 0, 1, 1, 0],
                           [0, 0, 0, 0, 1],
                           [1, 1, 0, 0, 0]], dtype=torch.bool)
    x = _x(3, 5, 2)
    x_unpad, indices, cu, max_seqlen, seqused = unpad_input(x, used, unused)
    assert indices.tolist() == [0, 1, 2, 3, 6, 8, 9, 10, 11]
    assert cu.tolist() == [0, 4, 7, 9] and max_seqlen == 4
    assert seqused.dtype == torch.int32 and seqused.tolist() == [2, 2, 0]
    assert torch.equal(x_unpad, x.reshape(15, 2)[indices])
    # An integer unused_mask gives the same.
    got = unpad_input(x, used.bool(), unused.long())
    assert got[1].tolist() == indices.tolist() and got[4].tolist() == [2, 2, 0]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_round_trip_random_masks(data):
    """pad_input(unpad_input(x)) == x * mask, for any mask pattern, as bool or int."""
    batch = data.draw(st.integers(1, 4), label="batch")
    seqlen = data.draw(st.integers(0, 7), label="seqlen")
    rows = data.draw(st.lists(st.lists(st.booleans(), min_size=seqlen, max_size=seqlen),
                              min_size=batch, max_size=batch), label="mask")
    mask = torch.tensor(rows, dtype=torch.bool).reshape(batch, seqlen)
    if data.draw(st.booleans(), label="int mask"):
        mask = mask.to(data.draw(st.sampled_from(INT_DTYPES), label="dtype"))
    x = _x(batch, seqlen, 3)
    x_unpad, indices, cu, max_seqlen, seqused = unpad_input(x, mask)
    keep = mask.bool()
    lengths = keep.sum(1).tolist()
    assert cu.tolist() == [sum(lengths[:b]) for b in range(batch + 1)]
    assert max_seqlen == max(lengths) and seqused.tolist() == lengths
    assert indices.tolist() == [b * seqlen + s for b in range(batch) for s in range(seqlen) if rows[b][s]]
    for b in range(batch):
        assert torch.equal(x_unpad[cu[b]:cu[b + 1]], x[b][keep[b]])
    assert torch.equal(pad_input(x_unpad, indices, batch, seqlen), x * keep[..., None])


def test_index_first_axis_and_put_are_inverse():
    x = torch.randn(7, 2, 3)
    idx = torch.tensor([5, 0, 3])
    assert torch.equal(index_first_axis(x, idx), x[idx])
    assert torch.equal(index_first_axis(x, idx.int()), x[idx])
    put = index_put_first_axis(x[idx], idx, 7)
    expected = torch.zeros(7, 2, 3)
    expected[idx] = x[idx]
    assert torch.equal(put, expected)
    assert torch.equal(index_first_axis(torch.arange(7.0), idx), torch.tensor([5.0, 0.0, 3.0]))   # 1-D


def test_nonzero_fallback(monkeypatch):
    """Where torch.nonzero_static has no kernel for the device, plain nonzero gives the same."""
    def missing(*args, **kwargs):
        raise NotImplementedError("no kernel")
    monkeypatch.setattr(torch, "nonzero_static", missing)
    x = _x(4, 5, 2)
    assert unpad_input(x, MASK)[1].tolist() == MASK_INDICES


# ---------------------------------------------------------------------------------- gradients


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, fast_mode=False)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-8)


def test_grad_index_first_axis():
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda t: index_first_axis(t, torch.tensor([4, 1, 5])), x)
    _gradcheck(lambda t: index_first_axis(t, torch.tensor([4, 1, 5], dtype=torch.int32)), x)
    # Repeated indices: the gradient sums over the repeats, as x[indices]'s does.
    _gradcheck(lambda t: index_first_axis(t, torch.tensor([2, 0, 2, 2])), x)
    g = torch.randn(4, 2, 3, dtype=torch.float64)
    idx = torch.tensor([2, 0, 2, 2])
    (ours,) = torch.autograd.grad(index_first_axis(x, idx), x, g)
    (ref,) = torch.autograd.grad(x[idx], x, g)
    assert torch.equal(ours, ref)


def test_grad_index_put_first_axis():
    values = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda t: index_put_first_axis(t, torch.tensor([6, 0, 2]), 7), values)


def test_grad_unpad_and_pad():
    x = torch.randn(4, 5, 2, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda t: unpad_input(t, MASK)[0], x)
    _, indices, *_ = unpad_input(x, MASK)
    x_unpad = torch.randn(10, 2, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda t: pad_input(t, indices, 4, 5), x_unpad)
    _gradcheck(lambda t: pad_input(unpad_input(t, MASK.int())[0], indices, 4, 5), x)
    # The gradient of the padding is zero: pad(unpad(x)) is x * mask.
    (g,) = torch.autograd.grad(pad_input(unpad_input(x, MASK)[0], indices, 4, 5).sum(), x)
    assert torch.equal(g, MASK[..., None].expand(4, 5, 2).double())


# ---------------------------------------------------------------------------------- errors

X = torch.randn(4, 5, 3)
IDX = torch.tensor([0, 2])


@pytest.mark.parametrize("call, error, words", [
    # unpad_input: hidden_states
    (lambda: unpad_input(X.numpy(), MASK), TypeError, "hidden_states must be a torch.Tensor, got ndarray"),
    (lambda: unpad_input(torch.randn(20), MASK.flatten()), ValueError, "at least 2 dims"),
    # attention_mask: type, dtype, rank, shape
    (lambda: unpad_input(X, MASK.tolist()), TypeError, "attention_mask must be a torch.Tensor, got list"),
    (lambda: unpad_input(X, MASK.float()), TypeError, "bool or an integer dtype .* got torch.float32"),
    (lambda: unpad_input(X, MASK.flatten()), ValueError, r"2-D \(batch, seqlen\), got shape \(20,\)"),
    (lambda: unpad_input(X, MASK[None]), ValueError, r"2-D \(batch, seqlen\), got shape \(1, 4, 5\)"),
    (lambda: unpad_input(X, MASK[:, :4]), ValueError,
     r"attention_mask of shape \(4, 4\) does not match hidden_states of shape \(4, 5, 3\).*\(4, 5\)"),
    (lambda: unpad_input(X, MASK.T), ValueError, r"shape \(5, 4\) does not match"),
    (lambda: unpad_input(X, MASK.to("meta")), ValueError,
     "must be on hidden_states' device cpu, got meta"),
    # attention_mask values
    (lambda: unpad_input(X, MASK.long() * 2), ValueError,
     r"only 0 and 1 .* 10 other value\(s\), e.g. 2 at \(batch 0, position 0\)"),
    (lambda: unpad_input(X, -MASK.int()), ValueError, r"e.g. -1 at \(batch 0, position 0\)"),
    # unused_mask
    (lambda: unpad_input(X, MASK, MASK.float()), TypeError, "unused_mask must be bool or an integer"),
    (lambda: unpad_input(X, MASK, MASK[:3]), ValueError, r"unused_mask of shape \(3, 5\) does not match"),
    (lambda: unpad_input(X, MASK, torch.full((4, 5), 3)), ValueError, "unused_mask must hold only 0 and 1"),
    (lambda: unpad_input(X, MASK, MASK), ValueError,
     r"unused_mask overlaps attention_mask at 10 token\(s\), e.g. \(batch 0, position 0\).*& ~attention_mask"),
    (lambda: unpad_input(X, MASK, ~MASK), ValueError, "in row 0, real token 2 comes after an unused one"),
    # index_first_axis
    (lambda: index_first_axis([1, 2], IDX), TypeError, "x must be a torch.Tensor, got list"),
    (lambda: index_first_axis(torch.tensor(1.0), IDX), ValueError, "at least 1 dim"),
    (lambda: index_first_axis(X, [0, 2]), TypeError, "indices must be a torch.Tensor, got list"),
    (lambda: index_first_axis(X, IDX[None]), ValueError, r"indices must be 1-D \(total_nnz,\), got shape \(1, 2\)"),
    (lambda: index_first_axis(X, IDX.float()), TypeError, "int64 .* or int32, got torch.float32"),
    (lambda: index_first_axis(X, MASK.flatten()), TypeError, "got torch.bool"),
    (lambda: index_first_axis(X, IDX.to("meta")), ValueError, "indices must be on x's device cpu, got meta"),
    # index_put_first_axis
    (lambda: index_put_first_axis(X[0], IDX, 4), ValueError,
     r"values has 5 rows \(shape \(5, 3\)\) but indices has 2 entries"),
    (lambda: index_put_first_axis(X[0, :2], IDX, -1), ValueError, "first_axis_dim must be an int >= 0, got -1"),
    (lambda: index_put_first_axis(X[0, :2], IDX, 4.0), ValueError, "first_axis_dim must be an int >= 0, got 4.0"),
    (lambda: index_put_first_axis(torch.tensor(1.0), IDX, 4), ValueError, "at least 1 dim"),
    # pad_input
    (lambda: pad_input(X[0], IDX, 2, 3), ValueError, r"hidden_states has 5 rows .* indices has 2 entries"),
    (lambda: pad_input(X[0, :2], IDX, 2.0, 3), ValueError, "batch must be an int >= 0, got 2.0"),
    (lambda: pad_input(X[0, :2], IDX, 2, True), ValueError, "seqlen must be an int >= 0, got True"),
    (lambda: pad_input(X[0, :2], IDX, 1, 1), ValueError, r"2 rows, more than batch x seqlen = 1 x 1 = 1"),
    (lambda: pad_input(X[0, :2], IDX.double(), 2, 3), TypeError, "indices must be int64"),
    (lambda: pad_input(None, IDX, 2, 3), TypeError, "hidden_states must be a torch.Tensor, got NoneType"),
])
def test_bad_input_raises(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_public_names():
    assert bert_padding.__all__ == ["index_first_axis", "index_put_first_axis", "unpad_input", "pad_input"]
    import inspect
    assert list(inspect.signature(unpad_input).parameters) == ["hidden_states", "attention_mask", "unused_mask"]
    assert list(inspect.signature(pad_input).parameters) == ["hidden_states", "indices", "batch", "seqlen"]
    assert list(inspect.signature(index_first_axis).parameters) == ["x", "indices"]
    assert list(inspect.signature(index_put_first_axis).parameters) == ["values", "indices", "first_axis_dim"]
    assert re.search("2.7", unpad_input.__doc__)
