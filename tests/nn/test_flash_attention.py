"""flashattn.nn.FlashAttention against the same layer written in plain PyTorch (same weights): outputs,
attention probabilities and gradients (inputs and parameters) within the error rule, with GQA, rotary
embeddings, causal masking and padded batches (right, left, all padding); a padded batch gives what
each sequence gives alone; bad arguments raise before any kernel runs.

(The module is flashattn/nn/flash_attention.py, and this file is not named test_attention.py: pytest
imports test files by basename, and tests/ops/test_attention.py has that one.)"""
import pytest
import torch

from conftest import DEVICE
from errors import assert_within_factor
from flashattn.nn import FlashAttention
from flashattn.nn import flash_attention as module

BATCH, SEQLEN, HIDDEN = 3, 13, 32
# Real tokens per row: right padding (row 0), left padding (row 1), none (row 2); "empty": a row of
# padding only; "holes": real tokens with padding between them.
MASKS = {
    "right": [[1] * 9 + [0] * 4, [1] * 13, [1] * 2 + [0] * 11],
    "left": [[0] * 4 + [1] * 9, [1] * 13, [0] * 12 + [1]],
    "mixed-empty": [[1] * 6 + [0] * 7, [0] * 13, [0] * 3 + [1] * 10],
    "holes": [[1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1], [1] * 13, [0, 1] * 6 + [1]],
}


@pytest.fixture(autouse=True)
def _reference_by_default(use_backend):
    """The PyTorch path unless a test picks the Triton kernels (which run under the interpreter on a
    CPU, slowly: only a few representative cases do)."""
    use_backend("reference")


def _mask(name: str) -> torch.Tensor:
    return torch.tensor(MASKS[name], dtype=torch.bool, device=DEVICE)


def _layer(seed: int = 0, **kwargs) -> FlashAttention:
    torch.manual_seed(seed)
    kwargs.setdefault("num_heads", 4)
    layer = FlashAttention(HIDDEN, **kwargs).to(DEVICE)
    with torch.no_grad():                      # biases too, so that their gradients are checked
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    return layer


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def plain_layer(layer: FlashAttention, x: torch.Tensor, real: torch.Tensor | None, dtype: torch.dtype):
    """The layer in plain PyTorch, in `dtype`, on the padded batch: keys at padding masked, causal by
    padded position (the real tokens' order), rotary by each token's index among its sequence's real
    tokens (Hugging Face's rotate_half form), output 0 at padding. Returns (out, probs)."""
    batch, seqlen, _ = x.shape
    h, hk, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    x = x.to(dtype)
    qkv = torch.nn.functional.linear(x, layer.Wqkv.weight.to(dtype),
                                     None if layer.Wqkv.bias is None else layer.Wqkv.bias.to(dtype))
    q, k, v = qkv.split([h * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(batch, seqlen, h, d), k.view(batch, seqlen, hk, d), v.view(batch, seqlen, hk, d)
    if real is None:
        real = torch.ones(batch, seqlen, dtype=torch.bool, device=x.device)
    if layer.rotary:
        positions = (real.long().cumsum(1) - 1).to(torch.float64)                     # (B, S)
        inv_freq = layer.rotary_base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
        angles = positions[..., None] * inv_freq                                     # (B, S, D / 2)
        cos = torch.cat((angles.cos(), angles.cos()), -1)[:, :, None].to(dtype)     # (B, S, 1, D)
        sin = torch.cat((angles.sin(), angles.sin()), -1)[:, :, None].to(dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = k.repeat_interleave(h // hk, dim=2), v.repeat_interleave(h // hk, dim=2)
    scale = layer.softmax_scale if layer.softmax_scale is not None else d ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    allowed = real[:, None, None, :] & real[:, None, :, None]                       # (B, 1, S, S)
    if layer.causal:
        allowed = allowed & torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(-1, keepdim=True)                                           # padding rows
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seqlen, h * d)
    out = torch.nn.functional.linear(out, layer.out_proj.weight.to(dtype),
                                     None if layer.out_proj.bias is None else layer.out_proj.bias.to(dtype))
    return out * real[..., None], probs


def _check_against_plain(layer, x, real, check_grads=True, probs=False):
    result = layer(x, attention_mask=real, return_attention=probs)
    ours = result[0] if probs else result
    refs = {dtype: plain_layer(layer, x, real, dtype) for dtype in (torch.float32, torch.float64)}
    assert_within_factor("out", ours, refs[torch.float32][0], refs[torch.float64][0], x.dtype, layer.head_dim)
    if probs:
        assert_within_factor("weights", result[1], refs[torch.float32][1], refs[torch.float64][1], x.dtype,
                             layer.head_dim)
    if not check_grads:
        return
    dout = torch.randn_like(ours)
    wrt = [x, *layer.parameters()]
    grads = {"ours": torch.autograd.grad(ours, wrt, dout)}
    for dtype, (out, _) in refs.items():
        grads[dtype] = torch.autograd.grad(out, wrt, dout.to(dtype))
    for i, name in enumerate(["dinput"] + ["dparam"] * (len(wrt) - 1)):
        assert_within_factor(name, grads["ours"][i], grads[torch.float32][i], grads[torch.float64][i], x.dtype,
                             layer.head_dim)


# (layer options, mask): the representative cases run on both backends, the rest on the PyTorch path.
BOTH = {
    "dense-causal-gqa-rotary": (dict(causal=True, num_kv_heads=2, rotary=True), None),
    "padded-causal-gqa-rotary": (dict(causal=True, num_kv_heads=2, rotary=True), "mixed-empty"),
}
REFERENCE_ONLY = {
    "dense-plain": (dict(), None),
    "dense-mqa-scale-nobias": (dict(num_kv_heads=1, softmax_scale=0.4, bias=False), None),
    "right-rotary": (dict(rotary=True, rotary_base=500.0), "right"),
    "left-causal-rotary": (dict(causal=True, rotary=True), "left"),
    "holes-causal-gqa": (dict(causal=True, num_kv_heads=2, rotary=True), "holes"),
}


@pytest.mark.parametrize("backend, case", [("triton", case) for case in BOTH]
                         + [("reference", case) for case in [*BOTH, *REFERENCE_ONLY]])
def test_matches_plain_pytorch(backend, case, use_backend):
    use_backend(backend)
    options, mask = {**BOTH, **REFERENCE_ONLY}[case]
    layer = _layer(**options)
    x = torch.randn(BATCH, SEQLEN, HIDDEN, device=DEVICE, requires_grad=True)
    _check_against_plain(layer, x, None if mask is None else _mask(mask))


@pytest.mark.parametrize("mask", ["right", "left", "mixed-empty"])
def test_padded_batch_equals_each_sequence_alone(mask):
    """Each row's real tokens, run alone without padding, give the padded batch's rows at those
    positions (rotary positions counted within the sequence, left padding included); padding gives 0."""
    layer = _layer(causal=True, num_kv_heads=2, rotary=True)
    real = _mask(mask)
    x = torch.randn(BATCH, SEQLEN, HIDDEN, device=DEVICE)
    with torch.no_grad():
        out = layer(x, attention_mask=real)
        for b in range(BATCH):
            assert not out[b][~real[b]].any(), "padding positions must be exactly 0"
            if real[b].any():
                alone = layer(x[b][real[b]][None])[0]                            # (n_b, hidden)
                torch.testing.assert_close(out[b][real[b]], alone, atol=1e-5, rtol=1e-5)
        # Hugging Face passes 0/1 integer masks: the same result.
        torch.testing.assert_close(layer(x, attention_mask=real.long()), out, atol=0, rtol=0)


@pytest.mark.parametrize("mask", [None, "left"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_return_attention(backend, mask, use_backend):
    use_backend(backend)
    layer = _layer(causal=True, num_kv_heads=2, rotary=True)
    real = None if mask is None else _mask(mask)
    x = torch.randn(BATCH, SEQLEN, HIDDEN, device=DEVICE)
    with torch.no_grad():
        _check_against_plain(layer, x, real, check_grads=False, probs=True)
        out, probs = layer(x, attention_mask=real, return_attention=True)
    assert probs.shape == (BATCH, layer.num_heads, SEQLEN, SEQLEN) and probs.dtype == torch.float32
    torch.testing.assert_close(out, layer(x, attention_mask=real))           # the same output either way
    rows = probs.sum(-1)
    expected = torch.ones_like(rows) if real is None else real[:, None, :].expand_as(rows).float()
    torch.testing.assert_close(rows, expected)                               # real rows sum to 1, padding's to 0
    assert (probs.triu(1) == 0).all(), "causal"


def test_dropout_only_in_training():
    layer = _layer(dropout=0.3, num_kv_heads=2)
    x = torch.randn(BATCH, SEQLEN, HIDDEN, device=DEVICE)
    real = _mask("right")
    layer.eval()
    reference = _layer(num_kv_heads=2).eval()                                # same seed: the same weights
    with torch.no_grad():
        for mask in (None, real):
            torch.testing.assert_close(layer(x, attention_mask=mask), reference(x, attention_mask=mask), atol=0,
                                       rtol=0)
        layer.train()
        torch.manual_seed(5)
        first, probs = layer(x, attention_mask=real, return_attention=True)
        torch.manual_seed(5)
        again = layer(x, attention_mask=real)
    torch.testing.assert_close(first, again, atol=0, rtol=0)                 # reproducible from torch's seed
    assert not torch.allclose(first, reference(x, attention_mask=real))      # and it does drop
    assert torch.signbit(probs).any(), "dropped entries are negated in the returned probabilities"


def test_parameters_follow_flash_attn_layout():
    layer = FlashAttention(64, 8, num_kv_heads=2, bias=False)
    assert layer.head_dim == 8
    assert dict((k, tuple(v.shape)) for k, v in layer.state_dict().items()) == {
        "Wqkv.weight": ((8 + 2 * 2) * 8, 64), "out_proj.weight": (64, 64)}
    assert "num_kv_heads=2" in repr(layer)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(hidden_size=30, num_heads=4), ValueError, "multiple of num_heads"),
    (dict(hidden_size=32, num_heads=0), ValueError, "num_heads must be an int >= 1, got 0"),
    (dict(hidden_size=32, num_heads=4, num_kv_heads=3), ValueError, "divides num_heads .4.*got 3"),
    (dict(hidden_size=32, num_heads=4, block_size=48), ValueError, "power of two from 16 to 256.*got 48"),
    (dict(hidden_size=32, num_heads=4, block_size=512), ValueError, "got 512"),
    (dict(hidden_size=32, num_heads=4, block_size=True), ValueError, "got True"),
    (dict(hidden_size=32, num_heads=4, dropout=1.0), ValueError, r"\[0, 1\), got 1.0"),
    (dict(hidden_size=32, num_heads=4, causal=1), TypeError, "causal must be a bool"),
    (dict(hidden_size=30, num_heads=2, rotary=True), ValueError, "15 must be even"),
    (dict(hidden_size=1024, num_heads=2), ValueError, "head dims up to 256"),
    (dict(hidden_size=32, num_heads=4, softmax_scale=float("nan")), ValueError, "softmax_scale"),
])
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FlashAttention(**kwargs)


def test_rejects_bad_inputs():
    layer = _layer()
    x = torch.randn(2, 5, HIDDEN, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(batch, seqlen, hidden_size=32\), got \(5, 32\)"):
        layer(x[0])
    with pytest.raises(ValueError, match=r"got \(2, 5, 16\)"):
        layer(x[..., :16])
    with pytest.raises(TypeError, match="torch.float64 but the layer's parameters are torch.float32"):
        layer(x.double())
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor"):
        layer(x.tolist())
    with pytest.raises(ValueError, match=r"\(batch, seqlen\) = \(2, 5\).*got shape \(2, 4\)"):
        layer(x, attention_mask=torch.ones(2, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="attention_mask must be bool or an integer dtype.*float32"):
        layer(x, attention_mask=torch.ones(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="only 0 and 1.*e.g. 2"):
        layer(x, attention_mask=torch.full((2, 5), 2, device=DEVICE))
    with pytest.raises(TypeError, match="return_attention must be a bool"):
        layer(x, return_attention=1)


def test_block_size_is_validated_against_shared_memory(monkeypatch):
    # The estimate: 3 tiles of block_size x width forward; K, V, Q, dO and P, dS backward.
    assert module.tile_shared_memory(64, 64, torch.bfloat16) == 2 * 3 * 64 * 64
    assert module.tile_shared_memory(64, 40, torch.float32, backward=True) == 4 * (4 * 64 * 64 + 2 * 64 * 64)
    assert module.block_size_problem(128, 128, torch.bfloat16, 227 * 1024, "H100", backward=False) is None
    problem = module.block_size_problem(128, 128, torch.bfloat16, 48 * 1024, "old GPU", backward=True)
    assert "block_size=128 needs about 192 KiB" in problem and "old GPU holds 48 KiB" in problem
    assert "block sizes that fit: 16, 32" in problem

    layer = FlashAttention(HIDDEN, 4, block_size=256).to(DEVICE)
    x = torch.randn(1, 5, HIDDEN, device=DEVICE)
    if not x.is_cuda:
        assert layer(x).shape == x.shape                 # no shared-memory limit off CUDA: any valid size
    # A device whose shared memory does not hold the tile: refused at the forward, naming what fits.
    monkeypatch.setattr(module, "_shared_memory_limit", lambda device: (16 * 1024, "a small GPU"))
    layer._tiles_checked.clear()
    with torch.no_grad(), pytest.raises(ValueError, match=r"block_size=256 .*\(forward, head dim 8.*fit: 16, 32, 64;"):
        layer(x)
    with pytest.raises(ValueError, match=r"forward and backward.*fit: 16, 32;"):
        layer(x)
