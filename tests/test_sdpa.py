"""flashattn.scaled_dot_product_attention against torch's own function: same signature, layout and
results (outputs and gradients, masks included), on both backends."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_CUDA
from flashattn import scaled_dot_product_attention

BACKENDS = ["triton", "reference"]
# (L, S): equal, more queries than keys, fewer queries than keys (top-left causal needs a mask then).
LENGTHS = [(33, 33), (40, 17), (9, 50)]
MASKS = ["none", "causal", "bool", "float"]


def _dtype():
    return torch.bfloat16 if HAS_CUDA else torch.float32


def _tolerance(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: f"L{x[0]}-S{x[1]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch(backend, lengths, mask, use_backend):
    use_backend(backend)
    torch.manual_seed(0)
    L, S = lengths
    dtype = _dtype()
    batch, heads, heads_kv, dim = 2, 4, 2, 32
    q = torch.randn(batch, heads, L, dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, heads_kv, S, dim, device=DEVICE, dtype=dtype)
    v = torch.randn_like(k)
    kwargs = dict(enable_gqa=True, scale=0.3)
    if mask == "causal":
        kwargs["is_causal"] = True
    elif mask == "bool":
        keep = torch.rand(batch, 1, L, S, device=DEVICE) > 0.3
        keep[0, 0, 1] = False                               # a row that may attend to nothing: 0
        kwargs["attn_mask"] = keep
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(1, heads, L, S, device=DEVICE, dtype=dtype, requires_grad=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ours = scaled_dot_product_attention(*leaves, **kwargs)
    torch_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    theirs = F.scaled_dot_product_attention(*torch_leaves, **kwargs)
    tol = _tolerance(dtype)
    # A row that may attend to nothing: ours is 0 (the library's rule); torch's result there depends
    # on its backend (0 on the CPU, not on every CUDA backend), so those rows are compared to 0.
    empty = ~kwargs["attn_mask"].any(-1, keepdim=True) if mask == "bool" else torch.zeros((), dtype=torch.bool)
    assert not ours.masked_select(empty.to(DEVICE)).any()
    ours, theirs = (x.masked_fill(empty.to(DEVICE), 0.0) for x in (ours, theirs))
    torch.testing.assert_close(ours, theirs, **tol)
    do = torch.randn_like(ours).masked_fill(empty.to(DEVICE), 0.0)
    wrt = leaves + ([kwargs["attn_mask"]] if mask == "float" else [])
    torch_wrt = torch_leaves + ([kwargs["attn_mask"]] if mask == "float" else [])
    for a, b in zip(torch.autograd.grad(ours, wrt, do), torch.autograd.grad(theirs, torch_wrt, do)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keeps_the_expectation_and_zero_dropout_is_exact(backend, use_backend):
    """torch's dropout draws other random numbers: compare the mean over many draws instead."""
    use_backend(backend)
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 16, device=DEVICE) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, dropout_p=0.0), exact, atol=1e-5, rtol=1e-5)
    mean = torch.stack([scaled_dot_product_attention(q, k, v, dropout_p=0.2) for _ in range(200)]).mean(0)
    assert (mean - exact).abs().mean() < 0.05


def test_refuses_what_torch_refuses_and_what_it_cannot_do():
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    kv = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="enable_gqa"):
        scaled_dot_product_attention(q, kv, kv)
    with pytest.raises(ValueError, match="both given"):
        scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool, device=DEVICE),
                                     is_causal=True)
    with pytest.raises(ValueError, match="at least one head"):
        scaled_dot_product_attention(q, kv[:, :0], kv[:, :0], enable_gqa=True)
    with pytest.raises(ValueError, match="at least 2 dims"):
        scaled_dot_product_attention(q[0, 0, 0], q[0, 0, 0], q[0, 0, 0])
    with pytest.raises(ValueError, match="do not broadcast"):
        scaled_dot_product_attention(q.expand(3, 4, 8, 16), q.expand(2, 4, 8, 16), q.expand(2, 4, 8, 16))
    with pytest.raises(ValueError, match="divide"):
        scaled_dot_product_attention(q, kv, torch.randn(1, 3, 8, 16, device=DEVICE), enable_gqa=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q[None].expand(2, 1, 4, 8, 16), q[None], q[None],
                                     attn_mask=torch.ones(3, 1, 1, 8, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(NotImplementedError, match="head dim"):
        scaled_dot_product_attention(q, q, torch.randn(1, 4, 8, 32, device=DEVICE))


# (query, key, value, mask) shapes torch takes beyond (batch, heads, L, E) with one batch and head count:
# fewer or more leading dims, batch dims that broadcast, one key/value head broadcast without enable_gqa,
# and under enable_gqa key and value head counts that differ.
LEADING = [
    ("3-dim", (4, 9, 16), (4, 12, 16), (4, 12, 16), None, False),
    ("2-dim", (9, 16), (12, 16), (12, 16), (9, 12), False),
    ("5-dim", (2, 3, 4, 9, 16), (2, 3, 2, 12, 16), (2, 3, 2, 12, 16), (3, 1, 9, 12), True),
    ("5-dim-mask-batch", (2, 3, 2, 9, 16), (2, 3, 2, 12, 16), (2, 3, 2, 12, 16), (2, 1, 1, 1, 12), False),
    ("batch-broadcast", (1, 4, 9, 16), (3, 4, 12, 16), (3, 4, 12, 16), None, False),
    ("key-batch-broadcast", (2, 3, 4, 9, 16), (3, 4, 12, 16), (1, 3, 4, 12, 16), (2, 1, 4, 9, 12), False),
    ("mqa-by-broadcast", (2, 4, 9, 16), (2, 1, 12, 16), (2, 1, 12, 16), None, False),
    ("query-head-broadcast", (2, 1, 9, 16), (2, 4, 12, 16), (2, 1, 12, 16), None, False),
    ("gqa-key-value-heads-differ", (2, 6, 9, 16), (2, 2, 12, 16), (2, 3, 12, 16), None, True),
    ("gqa-value-one-head", (2, 4, 9, 16), (2, 2, 12, 16), (2, 1, 12, 16), (2, 4, 9, 12), True),
]


@pytest.mark.parametrize("case", LEADING, ids=[c[0] for c in LEADING])
@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_broadcasting_match_torch(backend, case, use_backend):
    use_backend(backend)
    _, q_shape, k_shape, v_shape, mask_shape, gqa = case
    torch.manual_seed(0)
    dtype = _dtype()
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=dtype) for shape in (q_shape, k_shape, v_shape))
    mask = None if mask_shape is None else torch.randn(mask_shape, device=DEVICE, dtype=dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ours = scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=gqa)
    torch_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    theirs = F.scaled_dot_product_attention(*torch_leaves, attn_mask=mask, enable_gqa=gqa)
    assert ours.shape == theirs.shape
    tol = _tolerance(dtype)
    torch.testing.assert_close(ours, theirs, **tol)
    do = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, leaves, do), torch.autograd.grad(theirs, torch_leaves, do)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.skipif(HAS_CUDA, reason="float64 on the PyTorch path: the shapes, not the kernels, are under test")
@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])    # the backend, set once for all
@given(st.data())
def test_random_shapes_match_torch(use_backend, data):
    """Any leading dims, batch and head dims that broadcast, GQA with any dividing key/value head counts,
    masks of any broadcastable shape, L != S: outputs and gradients equal torch's wherever torch
    computes the call (float64, the PyTorch path)."""
    use_backend("reference")
    draw = lambda strategy, label: data.draw(strategy, label=label)       # noqa: E731
    batch = draw(st.lists(st.integers(1, 3), max_size=3), "batch dims")
    gqa = draw(st.booleans(), "enable_gqa")
    heads = draw(st.sampled_from([1, 2, 4, 6]), "query heads")
    dividers = [h for h in range(1, heads + 1) if heads % h == 0]
    heads_k, heads_v = (draw(st.sampled_from(dividers if gqa else [1, heads]), name) for name in ("key heads",
                                                                                                  "value heads"))
    L, S, E = draw(st.integers(1, 12), "L"), draw(st.integers(1, 12), "S"), draw(st.sampled_from([8, 16]), "E")

    def shape(h: int, n: int) -> list[int]:      # some batch dims broadcast (1), leading ones dropped
        dims = [d if draw(st.booleans(), "kept") else 1 for d in batch]
        return dims[draw(st.integers(0, len(dims)), "dropped"):] + [h, n, E]
    q, k, v = (torch.randn(shape(h, n), dtype=torch.float64) for h, n in ((heads, L), (heads_k, S), (heads_v, S)))
    kind = draw(st.sampled_from(["none", "causal", "bool", "float"]), "mask")
    mask = None
    if kind in ("bool", "float"):
        full = [*batch, heads, L, S]
        dims = [d if draw(st.booleans(), "mask dim kept") else 1 for d in full[:-1]] + [S]
        dims = dims[draw(st.integers(0, len(dims) - 1), "mask dims dropped"):]
        mask = torch.rand(dims) > 0.3 if kind == "bool" else torch.randn(dims, dtype=torch.float64)
    kwargs = dict(attn_mask=mask, is_causal=kind == "causal", enable_gqa=gqa)
    torch_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    try:
        theirs = F.scaled_dot_product_attention(*torch_leaves, **kwargs)
    except (RuntimeError, IndexError):
        return                           # a call torch refuses (some broadcasts it does not implement)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ours = scaled_dot_product_attention(*leaves, **kwargs)
    assert ours.shape == theirs.shape
    seen = theirs.isfinite()             # torch's rows that may attend to no key are NaN; ours are 0
    torch.testing.assert_close(ours[seen], theirs[seen])
    do = torch.randn_like(ours).masked_fill(~seen, 0.0)
    for a, b in zip(torch.autograd.grad(ours, leaves, do), torch.autograd.grad(theirs.masked_fill(~seen, 0.0),
                                                                              torch_leaves, do)):
        torch.testing.assert_close(a, b)


def test_autocast_as_torch(use_backend):
    """Under torch.autocast the drop-in computes in the autocast dtype, as torch's function does, mixed
    input dtypes included (the Triton kernels on a GPU; on the CPU the PyTorch path: the interpreter
    takes no bfloat16)."""
    use_backend("triton" if HAS_CUDA else "reference")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 17, 16, device=DEVICE) for _ in range(3))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ours = scaled_dot_product_attention(q, k.bfloat16(), v, is_causal=True)
        theirs = F.scaled_dot_product_attention(q, k.bfloat16(), v, is_causal=True)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)
