"""torch.func's transforms through flashattn's autograd (flashattn/ops/custom_ops.py): torch.vmap of the
forward, torch.func.grad, per-sample gradients (vmap of grad; through the nn layers too) and jacrev,
each against the same calls made one by one; on both backends (the Triton kernels under their
interpreter on the CPU)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_CUDA
import flashattn
from flashattn import flash_attn_func, flash_attn_varlen_func

BACKENDS = ["triton", "reference"]
MAPPED = 3          # the size of the mapped dim


def _dtype():
    return torch.bfloat16 if HAS_CUDA else torch.float32


def _close(a, b):
    tol = dict(atol=2e-2, rtol=2e-2) if a.dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, **tol)


def _inputs():
    torch.manual_seed(0)
    q = torch.randn(MAPPED, 2, 17, 4, 16, device=DEVICE, dtype=_dtype())
    kv = torch.randn(2, MAPPED, 2, 21, 2, 16, device=DEVICE, dtype=_dtype())
    return q, kv[0], kv[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_forward_mapped_and_shared_inputs(backend, use_backend):
    use_backend(backend)
    q, k, v = _inputs()
    attend = lambda a, b, c: flash_attn_func(a, b, c, causal=True, softcap=5.0)     # noqa: E731
    _close(torch.vmap(attend)(q, k, v), torch.stack([attend(q[i], k[i], v[i]) for i in range(MAPPED)]))
    _close(torch.vmap(attend, in_dims=(0, None, None))(q, k[0], v[0]),
           torch.stack([attend(q[i], k[0], v[0]) for i in range(MAPPED)]))
    qt = q.transpose(2, 3)                                          # SDPA's layout, beside torch's own vmap
    ours = torch.vmap(lambda a: flashattn.scaled_dot_product_attention(a, a, a, is_causal=True))(qt)
    _close(ours, torch.vmap(lambda a: F.scaled_dot_product_attention(a, a, a, is_causal=True))(qt))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients(backend, use_backend):
    """vmap of grad, the per-sample gradients of a loss: q mapped, k and v shared (each call's own dk),
    and a bias shared by every call, whose per-call gradients come back separately."""
    use_backend(backend)
    q, k, v = _inputs()
    bias = torch.randn(1, 4, 17, 21, device=DEVICE, dtype=_dtype())

    def loss(a, b, c, bias):
        return flash_attn_func(a, b, c, attn_bias=bias).float().square().sum()

    grads = torch.vmap(torch.func.grad(loss, argnums=(0, 1, 3)), in_dims=(0, None, None, None))(q, k[0], v[0], bias)
    for i in range(MAPPED):
        leaves = [x.clone().requires_grad_() for x in (q[i], k[0], v[0], bias)]
        loss(*leaves).backward()
        for mapped, one in zip(grads, (leaves[0].grad, leaves[1].grad, leaves[3].grad)):
            _close(mapped[i], one)
    single = torch.func.grad(loss)(q[0], k[0], v[0], bias)
    _close(single, grads[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacrev_matches_autograd(backend, use_backend):
    use_backend(backend)
    q, k, v = (x[0, :1, :5, :2, :8].float() for x in _inputs())

    def attend(a):
        return flash_attn_func(a, k, v)
    _close(torch.func.jacrev(attend)(q), torch.autograd.functional.jacobian(attend, q))


def test_vmap_refusals(use_backend):
    use_backend("reference")
    q, k, v = _inputs()
    slopes = torch.rand(MAPPED, 4, device=DEVICE)
    with pytest.raises(NotImplementedError, match="option tensors"):
        torch.vmap(lambda a, s: flash_attn_func(a, a[..., :2, :], a[..., :2, :], alibi_slopes=s))(q, slopes)
    cu = torch.tensor([0, 7, 17], dtype=torch.int32, device=DEVICE)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        torch.vmap(lambda a: flash_attn_varlen_func(a, a, a, cu, cu, 10, 10))(q[:, 0])
    with pytest.raises(NotImplementedError, match="second derivative"):
        torch.func.grad(lambda a: torch.func.grad(lambda b: flash_attn_func(b, k[0], v[0]).sum())(a).sum())(q[0])


def test_per_sample_gradients_through_the_layers(use_backend):
    """torch.func.functional_call under vmap of grad, as per-sample-gradient training does, through
    flashattn.nn.FlashAttention and flashattn.nn.MultiheadAttention."""
    use_backend("reference")
    from flashattn.nn import FlashAttention, MultiheadAttention
    torch.manual_seed(0)
    x = torch.randn(MAPPED, 7, 32, device=DEVICE)
    for layer in (FlashAttention(32, 4, causal=True), MultiheadAttention(32, 4, batch_first=True)):
        layer = layer.to(DEVICE)
        self_attention = isinstance(layer, MultiheadAttention)

        def loss(params, xi):
            args = (xi[None],) * (3 if self_attention else 1)
            out = torch.func.functional_call(layer, params, args)
            return (out[0] if self_attention else out).square().sum()

        params = {n: p.detach() for n, p in layer.named_parameters()}
        grads = torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
        for i in range(MAPPED):
            layer.zero_grad()
            loss(dict(layer.named_parameters()), x[i]).backward()
            for n, p in layer.named_parameters():
                torch.testing.assert_close(grads[n][i], p.grad, atol=1e-4, rtol=1e-4)
