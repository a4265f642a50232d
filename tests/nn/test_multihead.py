"""flashattn.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same state_dict: outputs,
attention weights and gradients (inputs, parameters, float masks) within the error rule, for every
mask torch takes (key_padding_mask and attn_mask, bool and float, 2-D and 3-D, the is_causal hint),
need_weights averaged or per head, batch_first both ways, bias_k/bias_v, the zero key, kdim/vdim,
unbatched inputs; torch checkpoints load with strict=True; bad inputs raise naming what was seen."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from errors import assert_within_factor, summation_rounding
from flashattn.nn import MultiheadAttention

E, H = 16, 2                  # head dim 8
N, L, S = 3, 7, 9             # batch, queries, keys (cross-attention: L != S)
KDIM, VDIM = 12, 20


@pytest.fixture(autouse=True)
def _reference_by_default(use_backend):
    """The PyTorch path unless a test picks the Triton kernels (which run under the interpreter on a
    CPU, slowly: only a few representative cases do)."""
    use_backend("reference")


def _modules(seed: int = 0, **config):
    """(ours, torch's, torch's in float64): torch's module with random weights (biases, bias_k and
    bias_v too), its state_dict loaded into ours with strict=True."""
    torch.manual_seed(seed)
    theirs = torch.nn.MultiheadAttention(E, H, **config).to(DEVICE)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.3)
    ours = MultiheadAttention(E, H, **config).to(DEVICE)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs, copy.deepcopy(theirs).double()


def _masks(kind: str, tgt_len: int = L, src_len: int = S, batch: int = N):
    """(key_padding_mask, attn_mask, is_causal) in torch's conventions (bool True = may not attend).
    Key 0 stays open to every query in the bool masks, so that no row sees no key (torch gives NaN
    there, this library 0)."""
    kpm = attn = None
    causal = False
    for part in kind.split("+"):
        if part == "kpm-bool":
            kpm = torch.rand(batch, src_len, device=DEVICE) < 0.4
            kpm[:, 0] = False
        elif part == "kpm-float":
            kpm = torch.randn(batch, src_len, device=DEVICE).requires_grad_()
        elif part.startswith("attn-"):
            shape = (tgt_len, src_len) if part.endswith("2d") else (batch * H, tgt_len, src_len)
            if "bool" in part:
                attn = torch.rand(shape, device=DEVICE) < 0.4
                attn[..., 0] = False
            else:
                attn = torch.randn(shape, device=DEVICE).requires_grad_()
        elif part == "causal":
            attn = torch.ones(tgt_len, src_len, dtype=torch.bool, device=DEVICE).triu(1)   # top-left causal
            causal = True
        elif part != "none":
            raise ValueError(part)
    return kpm, attn, causal


def _inputs(batch_first: bool, self_attention: bool, kdim: int = E, vdim: int = E, batched: bool = True):
    """query, key, value as leaves in the module's layout; self-attention passes one tensor thrice."""
    def leaf(length, dim):
        x = torch.randn(N, length, dim, device=DEVICE)
        x = x if batch_first else x.transpose(0, 1).contiguous()
        return (x if batched else x[:, 0].clone() if not batch_first else x[0].clone()).requires_grad_()
    query = leaf(L, E)
    if self_attention:
        return query, query, query
    return query, leaf(S, kdim), leaf(S, vdim)


def _as_double(values: list) -> list:
    """float64 leaves with the same values; a tensor passed several times stays one tensor."""
    seen = {}
    out = []
    for x in values:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            if id(x) not in seen:
                seen[id(x)] = x.detach().double().requires_grad_(x.requires_grad)
            x = seen[id(x)]
        out.append(x)
    return out


def _check(ours, theirs, theirs64, query, key, value, kpm, attn, **kwargs):
    """Our outputs, weights and gradients against torch's (float32: the yardstick; float64: the
    reference), with the loss through the weights too when they are returned."""
    args = [query, key, value, kpm, attn]
    out, weights = ours(query, key, value, key_padding_mask=kpm, attn_mask=attn, **kwargs)
    ref = theirs(query, key, value, key_padding_mask=kpm, attn_mask=attn, **kwargs)
    args64 = _as_double(args)
    ref64 = theirs64(*args64[:3], key_padding_mask=args64[3], attn_mask=args64[4], **kwargs)
    head_dim = E // H
    assert out.shape == ref[0].shape
    assert_within_factor("out", out, ref[0], ref64[0], torch.float32, head_dim)
    if not kwargs.get("need_weights", True):
        assert weights is None and ref[1] is None
    else:
        assert weights.shape == ref[1].shape and weights.dtype == ref[1].dtype
        assert_within_factor("weights", weights, ref[1], ref64[1], torch.float32, head_dim)

    dout = torch.randn_like(out)
    dweights = torch.randn_like(weights) if weights is not None else None

    def loss(o, w, dtype):
        total = (o * dout.to(dtype)).sum()
        return total + (w * dweights.to(dtype)).sum() if w is not None else total

    def leaves(values, module):
        """The tensors to differentiate by (each once) and their error-rule names: inputs, float
        masks, parameters."""
        found = {}
        for i, x in enumerate(values):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                found.setdefault(id(x), (x, "dinput" if i < 3 else "dbias"))
        found = list(found.values()) + [(p, "dparam") for _, p in module.named_parameters()]
        return [x for x, _ in found], [name for _, name in found]

    (ours_wrt, names), (theirs_wrt, _), (wrt64, _) = leaves(args, ours), leaves(args, theirs), leaves(args64, theirs64)
    grads = torch.autograd.grad(loss(out, weights, torch.float32), ours_wrt)
    grads32 = torch.autograd.grad(loss(*ref, torch.float32), theirs_wrt)
    grads64 = torch.autograd.grad(loss(*ref64, torch.float64), wrt64)
    for name, a, b, c in zip(names, grads, grads32, grads64):
        # The inputs' and parameters' gradients also pass through the width-E projections (in_proj,
        # out_proj), whose fp32 sums add their own rounding at the gradient's scale.
        projections = summation_rounding(c, E) if name in ("dinput", "dparam") else 0.0
        assert_within_factor(name, a, b, c, torch.float32, head_dim, extra_floor=projections)


MASKS = ["none", "kpm-bool", "kpm-float", "attn-bool-2d", "attn-float-2d", "attn-bool-3d", "attn-float-3d",
         "kpm-bool+attn-bool-2d", "kpm-bool+attn-float-3d", "kpm-float+attn-bool-3d", "causal", "kpm-bool+causal"]
WEIGHTS = {"no-weights": dict(need_weights=False), "averaged": dict(need_weights=True),
           "per-head": dict(need_weights=True, average_attn_weights=False)}


@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_masks_match_torch(batch_first, mask, weights):
    ours, theirs, theirs64 = _modules(batch_first=batch_first)
    kpm, attn, causal = _masks(mask)
    _check(ours, theirs, theirs64, *_inputs(batch_first, self_attention=False), kpm, attn, is_causal=causal,
           **WEIGHTS[weights])


CONFIGS = {
    "bias-kv": dict(add_bias_kv=True),
    "zero-attn": dict(add_zero_attn=True),
    "bias-kv+zero-attn": dict(add_bias_kv=True, add_zero_attn=True),
    "kdim-vdim": dict(kdim=KDIM, vdim=VDIM),
    "kdim-vdim+bias-kv+zero-attn": dict(kdim=KDIM, vdim=VDIM, add_bias_kv=True, add_zero_attn=True),
    "no-bias": dict(bias=False),
}


@pytest.mark.parametrize("weights", ["no-weights", "per-head"])
@pytest.mark.parametrize("mask", ["kpm-bool+attn-float-3d", "causal"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_configs_match_torch(config, mask, weights):
    """bias_k/bias_v and the zero key add key columns open to every query, as torch pads the masks;
    with the is_causal hint and no weights, torch drops the mask and those columns lie past the
    top-left causal band: the same here."""
    options = CONFIGS[config]
    batch_first = "kdim" in config
    ours, theirs, theirs64 = _modules(batch_first=batch_first, **options)
    kpm, attn, causal = _masks(mask)
    inputs = _inputs(batch_first, False, options.get("kdim", E), options.get("vdim", E))
    _check(ours, theirs, theirs64, *inputs, kpm, attn, is_causal=causal, **WEIGHTS[weights])


@pytest.mark.parametrize("weights", ["no-weights", "averaged"])
@pytest.mark.parametrize("mask", ["none", "kpm-bool", "causal"])
def test_self_attention_matches_torch(mask, weights):
    """query is key is value: one fused input projection, as torch's."""
    ours, theirs, theirs64 = _modules(batch_first=True, add_bias_kv=True)
    kpm, attn, causal = _masks(mask, L, L)
    _check(ours, theirs, theirs64, *_inputs(True, self_attention=True), kpm, attn, is_causal=causal,
           **WEIGHTS[weights])


@pytest.mark.parametrize("case", [
    ("kpm-bool+attn-float-3d", "averaged", False, {}),
    ("causal", "no-weights", True, {}),
    ("kpm-bool", "per-head", True, dict(add_bias_kv=True, add_zero_attn=True)),
], ids=["masks-weights", "causal-hint", "bias-kv-zero-attn"])
def test_triton_kernels_match_torch(case, use_backend):
    use_backend("triton")
    mask, weights, batch_first, options = case
    ours, theirs, theirs64 = _modules(batch_first=batch_first, **options)
    kpm, attn, causal = _masks(mask)
    _check(ours, theirs, theirs64, *_inputs(batch_first, False), kpm, attn, is_causal=causal, **WEIGHTS[weights])


@pytest.mark.parametrize("mask", ["kpm-bool+attn-bool-3d", "attn-float-2d"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_unbatched_inputs_match_torch(batch_first, mask):
    ours, theirs, theirs64 = _modules(batch_first=batch_first)
    kpm, attn, _ = _masks(mask, batch=1)
    kpm = None if kpm is None else kpm[0]                                  # (S,)
    _check(ours, theirs, theirs64, *_inputs(batch_first, False, batched=False), kpm, attn,
           average_attn_weights=False)


def test_torch_checkpoints_load_and_round_trip():
    for config in (dict(), dict(kdim=KDIM, vdim=VDIM, add_bias_kv=True), dict(bias=False)):
        theirs = torch.nn.MultiheadAttention(E, H, **config)
        ours = MultiheadAttention(E, H, **config)
        assert isinstance(ours, torch.nn.MultiheadAttention)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict(), strict=True)
        back = torch.nn.MultiheadAttention(E, H, **config)
        back.load_state_dict(ours.state_dict(), strict=True)
        for (name, a), b in zip(theirs.state_dict().items(), back.state_dict().values()):
            assert torch.equal(a, b), name


def test_dropout_in_training_only_and_weights_are_what_produced_the_output():
    ours, theirs, _ = _modules(dropout=0.5, batch_first=True)
    query, key, value = (x.detach() for x in _inputs(True, False))
    kpm, _, _ = _masks("kpm-bool")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        evaluated, _ = ours(query, key, value, key_padding_mask=kpm, need_weights=False)
        torch.testing.assert_close(evaluated, theirs(query, key, value, key_padding_mask=kpm)[0],
                                   atol=1e-5, rtol=1e-5)
        ours.train()
        torch.manual_seed(3)
        out, weights = ours(query, key, value, key_padding_mask=kpm, average_attn_weights=False)
        torch.manual_seed(3)
        again, _ = ours(query, key, value, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out, again, atol=0, rtol=0)                 # reproducible from torch's seed
    assert not torch.allclose(out, evaluated)
    # torch's convention: the weights after dropout, kept ones scaled by 1 / (1 - p), dropped ones 0;
    # and they are the weights the output was computed with.
    open_ = ~kpm[:, None, None, :].expand_as(weights)          # the keys padding leaves visible
    assert 0.3 < (weights == 0)[open_].float().mean() < 0.7
    w_v = ours.in_proj_weight.chunk(3)[2]
    b_v = ours.in_proj_bias.chunk(3)[2]
    v = F.linear(value, w_v, b_v).view(N, S, H, E // H)
    manual = torch.einsum("nhls,nshd->nlhd", weights, v).reshape(N, L, E)
    torch.testing.assert_close(out, ours.out_proj(manual), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(embed_dim=10, num_heads=3), ValueError, r"embed_dim \(10\) must be a multiple of num_heads \(3\)"),
    (dict(embed_dim=1024, num_heads=2), ValueError, "head dims up to 256"),
    (dict(embed_dim=16, num_heads=2, dropout=1.0), ValueError, r"\[0, 1\), got 1.0"),
    (dict(embed_dim=16, num_heads=2, kdim=0), ValueError, "kdim must be None or an int >= 1, got 0"),
])
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiheadAttention(**kwargs)


def test_rejects_bad_inputs():
    ours, _, _ = _modules()
    q = torch.randn(L, N, E, device=DEVICE)
    k = torch.randn(S, N, E, device=DEVICE)
    cases = [
        (dict(query=q[None]), ValueError, r"query must be 3-D .*\(L, N, E\).*got shape \(1, 7, 3, 16\)"),
        (dict(key=k[:, 0]), ValueError, "key and value must have query's 3 dims"),
        (dict(query=q[..., :8]), ValueError, r"query's last dim must be 16 \(the module's embed_dim\)"),
        (dict(key=k[:, :2], value=k[:, :2]), ValueError, "different batch sizes"),
        (dict(value=k[:5]), ValueError, "key and value must agree"),
        (dict(query=q.double()), TypeError, "parameters' dtype torch.float32"),
        (dict(key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool, device=DEVICE)), ValueError,
         r"key_padding_mask must have shape \(3, 9\).*got \(3, 10\)"),
        (dict(key_padding_mask=torch.zeros(N, S, dtype=torch.int64, device=DEVICE)), TypeError,
         "key_padding_mask must be bool"),
        (dict(attn_mask=torch.zeros(N, L, S, dtype=torch.bool, device=DEVICE)), ValueError,
         r"\(L, S\) = \(7, 9\) or \(N \* num_heads, L, S\) = \(6, 7, 9\), got \(3, 7, 9\)"),
        (dict(is_causal=True), ValueError, "needs attn_mask"),
        (dict(need_weights=1), TypeError, "need_weights must be a bool"),
    ]
    for override, error, match in cases:
        kwargs = {**dict(query=q, key=k, value=k), **override}
        with pytest.raises(error, match=match):
            ours(**kwargs)
