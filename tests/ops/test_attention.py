"""Forward, LSE and gradients of every backend against a float64 reference, on odd shapes.

Cases are built from the kernels' declarations (flashattn/ops/capabilities.py). Without CUDA, the
Triton kernels run under the interpreter at small sizes; with CUDA, the `gpu` cases run at full size.
"""
from __future__ import annotations

import math

import pytest
import torch

from errors import assert_within_factor
from shapes import Shape, random_inputs as _inputs
from flashattn import flash_attn_func
from flashattn.ops import capabilities
from flashattn.ops.reference import attention_standard

from conftest import DEVICE, HAS_CUDA


# Odd sizes on purpose: seqlen 1, lengths that are not multiples of any block, seqlen_q != seqlen_k
# both ways (with causal, q > k leaves rows that see no key), MQA/GQA, head dims that are not powers
# of two. The interpreter's tiles are 32 x 16, so even these small shapes cross several of them.
CPU_SHAPES = [
    Shape(1, 1, 1, 1, 1, 64),
    Shape(2, 17, 33, 4, 2, 40),
    Shape(1, 65, 17, 2, 1, 16),
    Shape(1, 48, 48, 2, 2, 80),
    Shape(1, 33, 100, 3, 3, 96),
    Shape(1, 40, 40, 1, 1, 128),
    Shape(1, 20, 25, 2, 1, 160),
    Shape(1, 24, 19, 1, 1, 192),
    Shape(1, 18, 18, 1, 1, 256),
    Shape(1, 1025, 1025, 1, 1, 32),
]
GPU_SHAPES = [
    Shape(1, 1, 1, 1, 1, 64),
    Shape(2, 1025, 1025, 8, 2, 128),
    Shape(1, 2048, 4096, 4, 4, 64),
    Shape(1, 4097, 1023, 2, 1, 96),
    Shape(2, 512, 512, 16, 16, 256),
    Shape(3, 129, 257, 6, 3, 192),
    Shape(1, 333, 333, 2, 2, 160),
    Shape(2, 1, 1000, 8, 1, 128),
    Shape(1, 777, 555, 4, 2, 40),
    Shape(1, 300, 301, 2, 2, 80),
    Shape(1, 8192, 8192, 2, 1, 128),
]


def _dtypes(spec: capabilities.KernelSpec) -> list[torch.dtype]:
    dtypes = [d for d in spec.dtypes if d != torch.float64]
    if spec.name == "triton" and not HAS_CUDA:
        # The interpreter's tl.dot gives wrong results on bf16 operands: bf16 is tested on the GPU.
        dtypes.remove(torch.bfloat16)
    return dtypes


# On the GPU the PyTorch path is checked on a few shapes only: the CPU runs check it everywhere.
GPU_SHAPES_REFERENCE = GPU_SHAPES[:4]


def _cases():
    marks = [pytest.mark.gpu] if HAS_CUDA else []
    for spec in capabilities.KERNELS.values():
        shapes = CPU_SHAPES if not HAS_CUDA else GPU_SHAPES_REFERENCE if spec.name == "reference" else GPU_SHAPES
        for dtype in _dtypes(spec):
            for shape in shapes:
                if shape.head_dim > spec.max_head_dim:
                    continue
                if shape.nheads != shape.nheads_k and "gqa" not in spec.features:
                    continue
                for causal in (False, True):
                    name = f"{spec.name}-{str(dtype)[6:]}-{shape.id}-{'causal' if causal else 'full'}"
                    yield pytest.param(spec.name, dtype, shape, causal, id=name, marks=marks)


def _run_standard(q, k, v, do, scale, causal, dtype):
    """attention_standard on copies of the inputs in `dtype`: (out, lse, dq, dk, dv).

    The float64 reference is computed one query head at a time, dK and dV summed over each key
    head's group: heads are independent, and one head's dense graph at a time keeps the long cases'
    memory within what the GPU run's processes, sharing one GPU, can all hold at once. The
    same-dtype yardstick stays the standard computation over all heads at once."""
    if dtype == torch.float64 and q.shape[2] > 1:
        group = q.shape[2] // k.shape[2]
        heads = [_run_standard(q[:, :, h:h + 1], k[:, :, h // group:h // group + 1],
                               v[:, :, h // group:h // group + 1], do[:, :, h:h + 1], scale, causal, dtype)
                 for h in range(q.shape[2])]
        out, lse, dq, dk, dv = (torch.cat(parts, dim=1 if i == 1 else 2) for i, parts in enumerate(zip(*heads)))
        dk, dv = (x.unflatten(2, (k.shape[2], group)).sum(3) for x in (dk, dv))
        return out, lse, dq, dk, dv
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = attention_standard(*leaves, scale, causal)
    grads = torch.autograd.grad(out, leaves, do.to(dtype))
    return (out, lse, *grads)


@pytest.fixture(autouse=True)
def _release_cached_memory():
    """Each test gives its process's cached device memory back when it ends: the GPU run spreads these
    tests over 15 processes on one GPU, and torch's caching allocator keeps a process's peak until the
    process ends, where no other process can use it. Kept, the dense references' caches can exhaust
    the GPU's memory, and whichever test asks next fails with CUDA out of memory."""
    yield
    if HAS_CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("backend, dtype, shape, causal", list(_cases()))
def test_matches_float64_reference(backend, dtype, shape, causal, use_backend):
    use_backend(backend)
    torch.manual_seed(0)
    q, k, v, do = _inputs(shape, dtype)
    scale = 1.0 / math.sqrt(shape.head_dim)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse, _ = flash_attn_func(*leaves, causal=causal, return_attn_probs=True)
    dq, dk, dv = torch.autograd.grad(out, leaves, do)

    ref64 = _run_standard(q, k, v, do, scale, causal, torch.float64)
    same = _run_standard(q, k, v, do, scale, causal, dtype)
    for name, ours, s, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), same, ref64):
        assert ours.shape == r.shape and ours.dtype == (torch.float32 if name == "lse" else dtype)
        assert_within_factor(name, ours, s, r, dtype, shape.head_dim)


def _nan_padded(x: torch.Tensor) -> torch.Tensor:
    """A view equal to x inside a NaN-filled buffer that pads the seq and head dims (non-contiguous)."""
    b, s, h, d = x.shape
    buf = torch.full((b, s + 7, h + 2, d), float("nan"), dtype=x.dtype, device=x.device)
    view = buf[:, 3:3 + s, 1:1 + h]
    view.copy_(x)
    return view


NAN_CASES = [CPU_SHAPES[1], CPU_SHAPES[2], CPU_SHAPES[4]] if not HAS_CUDA else [GPU_SHAPES[3], GPU_SHAPES[5]]


@pytest.mark.parametrize("backend", list(capabilities.KERNELS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", NAN_CASES, ids=lambda s: s.id)
def test_nan_padding_is_never_read(backend, causal, shape, use_backend):
    """Strided inputs inside NaN padding give bit-identical results to contiguous ones: no kernel
    reads past a tensor's rows or heads, in the forward or the backward."""
    use_backend(backend)
    torch.manual_seed(1)
    q, k, v, do = _inputs(shape, torch.float16)
    results = []
    for wrap in (lambda x: x.clone(), _nan_padded):
        leaves = [wrap(x).requires_grad_() for x in (q, k, v)]
        out, lse, _ = flash_attn_func(*leaves, causal=causal, return_attn_probs=True)
        grads = torch.autograd.grad(out, leaves, wrap(do))
        results.append((out, lse, *grads))
    for contiguous, padded in zip(*results):
        assert torch.equal(contiguous, padded)
        assert not torch.isnan(padded).any()


# The warp-specialized forward (in production: Hopper, plain calls, head dims 64, 128 and 256 from
# 1k-8k tokens, configs._FWD_WS) forced on for every shape: under the interpreter (which runs its TMA
# loads and ignores the specialization) at odd head dims too; on the GPU at head dims 64, 128 and 256
# with ragged ends, seqlen_q != seqlen_k both ways and GQA.
WS_SHAPES = ([Shape(2, 50, 50, 2, 1, 32), Shape(1, 33, 70, 2, 2, 40), Shape(1, 70, 33, 2, 2, 64),
              Shape(1, 1, 17, 1, 1, 16)] if not HAS_CUDA else
             [Shape(2, 2048, 2048, 8, 2, 128), Shape(1, 1025, 3000, 4, 4, 128), Shape(1, 3001, 1000, 2, 1, 128),
              Shape(1, 1, 2048, 2, 2, 128), Shape(1, 4100, 4200, 4, 2, 64), Shape(2, 1000, 1100, 4, 2, 256)])
WS_DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def _only_kernel(monkeypatch, kernel: str, choices: dict, refused: list[tuple[object, str]]) -> None:
    """Answer configs' choice functions named in `choices` with the given values, and make the
    launchers in `refused` ((module, name) pairs) fail: every call must take `kernel`."""
    from flashattn.ops.triton import configs

    def other_kernel(*args, **kwargs):
        raise AssertionError(f"the call left the {kernel}")

    for name, answer in choices.items():
        monkeypatch.setattr(configs, name, lambda *args, answer=answer, **kwargs: answer)
    for module, name in refused:
        monkeypatch.setattr(module, name, other_kernel)


@pytest.fixture
def warp_specialized(monkeypatch, use_backend):
    """Every plain forward takes the warp-specialized kernel; the other forward kernel may not run."""
    from flashattn.ops.triton import configs, forward

    use_backend("triton")
    _only_kernel(monkeypatch, "warp-specialized kernel", dict(warp_specialized=True, ping_pong_forward=False),
                 [(forward, "_launch_fwd")])
    # Shapes for the GPU table's head dims without an entry of their own (head dim 64 causal).
    table = configs._TABLES[(9, 0)]["fwd_ws"]
    for key in [(64, True, True)]:
        if key not in table:
            monkeypatch.setitem(table, key, configs.TileConfig(128, 64, 4, 2))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", WS_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", WS_SHAPES, ids=lambda s: s.id)
def test_warp_specialized_forward(shape, dtype, causal, warp_specialized):
    """Output and LSE against float64, and NaN padding around strided inputs never read."""
    _check_plain_forward(shape, dtype, causal)


def _check_plain_forward(shape, dtype, causal):
    """The Triton forward's output and LSE against float64 within the same-dtype bound, and equal
    with NaN padding around strided inputs."""
    from flashattn.ops import dispatch
    from flashattn.ops.variant import from_causal

    torch.manual_seed(0)
    q, k, v, _ = _inputs(shape, dtype)
    scale = 1.0 / math.sqrt(shape.head_dim)
    ref64 = _run_standard(q, k, v, torch.zeros_like(q), scale, causal, torch.float64)
    same = _run_standard(q, k, v, torch.zeros_like(q), scale, causal, dtype)
    out, lse = dispatch.forward(q, k, v, scale, from_causal(causal), "triton")
    for name, ours, s, r in zip(("out", "lse"), (out, lse), same, ref64):
        assert_within_factor(name, ours, s, r, dtype, shape.head_dim)
    padded = dispatch.forward(*map(_nan_padded, (q, k, v)), scale, from_causal(causal), "triton")
    assert torch.equal(padded[0], out) and torch.equal(padded[1], lse)


def test_warp_specialized_forward_needs_tma_alignment():
    """A base or a stride that is not whole 16 bytes, or a broadcast sequence dim, cannot be a TMA
    descriptor: those calls take the other kernel (tma_ready says no)."""
    from flashattn.ops.triton.common import tma_ready

    x = torch.zeros(2, 64, 4, 128, dtype=torch.float16, device=DEVICE)
    assert tma_ready(x, x[:, 1:], x[:, :, 1:])
    flat = torch.zeros(2 * 64 * 4 * 128 + 1, dtype=torch.float16, device=DEVICE)
    assert not tma_ready(flat[1:].view(2, 64, 4, 128))                     # base 2 bytes off
    assert not tma_ready(torch.zeros(2, 64, 4, 132, dtype=torch.float16, device=DEVICE)[..., :128])
    assert not tma_ready(x[:, :1].expand(2, 64, 4, 128))                  # one row broadcast over the sequence


# The ping-pong forward (Hopper, Gluon: flashattn/ops/triton/forward_sm90.py; in production plain
# fp16/bf16 calls at head dims 64, 128 and 256, configs._FWD_PINGPONG) forced on for every shape: odd
# lengths, seqlen_q != seqlen_k both ways (with causal, rows that see no key), seqlen_q 1, GQA and MQA.
# Gluon has no interpreter: GPU only (sm_90); tests/ops/test_sm90_compile.py compiles it anywhere.
HAS_SM90 = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
PING_PONG_SHAPES = [Shape(2, 1025, 1025, 8, 2, 128), Shape(1, 17, 300, 2, 1, 128), Shape(1, 300, 17, 2, 2, 64),
                    Shape(1, 1, 129, 2, 2, 256), Shape(2, 513, 700, 6, 2, 64), Shape(1, 2048, 2048, 4, 4, 256),
                    Shape(1, 777, 1500, 8, 1, 128), Shape(3, 200, 64, 2, 1, 256)]


@pytest.fixture(params=[True, False], ids=["persistent", "program-per-tile"])
def ping_pong(request, monkeypatch, use_backend):
    """Every plain fp16/bf16 forward takes the ping-pong kernel, with either grid; the other forward
    kernels may not run."""
    from flashattn.ops.triton import forward

    use_backend("triton")
    _only_kernel(monkeypatch, "ping-pong kernel", dict(ping_pong_forward=True, ping_pong_persistent=request.param),
                 [(forward, "_launch_fwd"), (forward, "_launch_fwd_ws")])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SM90, reason="the ping-pong forward is a Hopper (sm_90) kernel")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", PING_PONG_SHAPES, ids=lambda s: s.id)
def test_ping_pong_forward(shape, dtype, causal, ping_pong):
    """Output and LSE against float64, and NaN padding around strided inputs never read."""
    _check_plain_forward(shape, dtype, causal)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SM90, reason="the ping-pong forward is a Hopper (sm_90) kernel")
def test_persistent_tile_counter_is_kept_per_stream_and_reset_by_each_launch(monkeypatch):
    """The persistent grid's tile counter, kept per (device, stream), is 0 after every launch: calls of
    two sizes in turn on one stream, and on two streams at once, give bit for bit what a lone call
    gives; a call captured in a CUDA graph gets a counter of its own and replays."""
    from flashattn.ops.triton import configs, forward_sm90

    monkeypatch.setattr(configs, "ping_pong_persistent", lambda *args: True)
    big = [torch.randn(2, 1000, 8, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    small = [x[:1, :300, :2] for x in big]
    expected = [forward_sm90.forward(*qkv, 0.1, True)[0] for qkv in (big, small)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    outs = []
    for stream in streams:
        with torch.cuda.stream(stream):
            outs += [forward_sm90.forward(*qkv, 0.1, True)[0] for _ in range(3) for qkv in (big, small)]
    torch.cuda.synchronize()
    for i, out in enumerate(outs):
        assert torch.equal(out, expected[i % 2]), i
    assert len(forward_sm90.tile_counters) >= 3 and all(c.item() == 0 for c in forward_sm90.tile_counters.values())

    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward_sm90.forward(*big, 0.1, True)          # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    kept = dict(forward_sm90.tile_counters)
    with torch.cuda.graph(graph):
        captured, _ = forward_sm90.forward(*big, 0.1, True)
    assert forward_sm90.tile_counters.keys() == kept.keys()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, expected[0])


# The one-pass backward (Hopper, Gluon: flashattn/ops/triton/backward_sm90.py; in production plain
# fp16/bf16 calls at head dims 64, 128 and 256 from configs._BWD_ONEPASS's lengths) forced on for every
# shape: odd lengths, seqlen_q != seqlen_k both ways (with causal, rows that see no key), seqlen_q 1,
# GQA and MQA.
# Gluon has no interpreter: GPU only (sm_90); tests/ops/test_sm90_compile.py compiles it anywhere.
ONE_PASS_SHAPES = [Shape(2, 1025, 1025, 8, 2, 128), Shape(1, 17, 300, 2, 1, 128), Shape(1, 300, 17, 2, 2, 128),
                   Shape(1, 1, 129, 2, 2, 64), Shape(2, 513, 700, 6, 2, 64), Shape(1, 2048, 2048, 4, 4, 128),
                   Shape(1, 777, 1500, 8, 1, 64), Shape(2, 300, 700, 4, 2, 256), Shape(1, 129, 65, 2, 2, 256)]


@pytest.fixture
def one_pass(monkeypatch, use_backend):
    """Every plain fp16/bf16 backward takes the one-pass kernel; the portable kernels may not run."""
    from flashattn.ops.triton import backward

    use_backend("triton")
    _only_kernel(monkeypatch, "one-pass kernel", dict(one_pass_backward=True), [(backward, "_launch_bwd")])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SM90, reason="the one-pass backward is a Hopper (sm_90) kernel")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", ONE_PASS_SHAPES, ids=lambda s: s.id)
def test_one_pass_backward(shape, dtype, causal, one_pass):
    """dQ, dK, dV against float64, and NaN padding around strided inputs never read: dK and dV
    bit-identical (no atomics in them), dQ within the same bound (its adds come in any order)."""
    torch.manual_seed(0)
    q, k, v, do = _inputs(shape, dtype)
    scale = 1.0 / math.sqrt(shape.head_dim)
    ref64 = _run_standard(q, k, v, do, scale, causal, torch.float64)[2:]
    same = _run_standard(q, k, v, do, scale, causal, dtype)[2:]
    results = []
    for wrap in (lambda x: x.clone(), _nan_padded):
        leaves = [wrap(x).requires_grad_() for x in (q, k, v)]
        out = flash_attn_func(*leaves, causal=causal)
        results.append(torch.autograd.grad(out, leaves, wrap(do)))
    for padded_run in (False, True):
        for name, ours, s, r in zip(("dq", "dk", "dv"), results[padded_run], same, ref64):
            assert_within_factor(name, ours, s, r, dtype, shape.head_dim)
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])


def _deterministic_twice(q, k, v, do, causal: bool) -> list[tuple]:
    """Two backwards with deterministic=True, asserted bit-identical; the gradients of both."""
    runs = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = flash_attn_func(*leaves, causal=causal, deterministic=True)
        runs.append(torch.autograd.grad(out, leaves, do))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    return runs


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SM90, reason="the one-pass backward is a Hopper (sm_90) kernel")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [ONE_PASS_SHAPES[0], ONE_PASS_SHAPES[2], ONE_PASS_SHAPES[6], ONE_PASS_SHAPES[7]],
                         ids=lambda s: s.id)
def test_one_pass_backward_deterministic(shape, causal, one_pass):
    """deterministic=True: the adds into dQ in a fixed order, so two runs give bit-identical
    gradients, within the same bound against float64."""
    torch.manual_seed(0)
    q, k, v, do = _inputs(shape, torch.bfloat16)
    scale = 1.0 / math.sqrt(shape.head_dim)
    runs = _deterministic_twice(q, k, v, do, causal)
    ref64 = _run_standard(q, k, v, do, scale, causal, torch.float64)[2:]
    same = _run_standard(q, k, v, do, scale, causal, torch.bfloat16)[2:]
    for name, ours, s, r in zip(("dq", "dk", "dv"), runs[0], same, ref64):
        assert_within_factor(name, ours, s, r, torch.bfloat16, shape.head_dim)


@pytest.mark.parametrize("backend", list(capabilities.KERNELS))
def test_backward_is_deterministic(backend, use_backend):
    use_backend(backend)
    shape = GPU_SHAPES[1] if HAS_CUDA else CPU_SHAPES[1]
    q, k, v, do = _inputs(shape, torch.float16)
    _deterministic_twice(q, k, v, do, causal=True)


@pytest.mark.parametrize("backend", list(capabilities.KERNELS))
def test_gradient_through_lse(backend, use_backend):
    """The log-sum-exp is an output like any other: a loss that uses it gets the right gradients."""
    use_backend(backend)
    torch.manual_seed(2)
    shape = Shape(2, 300, 400, 4, 2, 64) if HAS_CUDA else Shape(1, 33, 40, 2, 1, 32)
    dtype = torch.float16
    q, k, v, do = _inputs(shape, dtype)
    dlse = torch.randn(shape.batch, shape.nheads, shape.seqlen_q, device=DEVICE)
    scale = 1.0 / math.sqrt(shape.head_dim)

    def grads(fn, cast):
        leaves = [x.detach().to(cast).requires_grad_() for x in (q, k, v)]
        out, lse = fn(leaves)
        loss = (out * do.to(cast)).sum() + (lse * dlse.to(lse.dtype)).sum()
        return torch.autograd.grad(loss, leaves)

    ours = grads(lambda t: flash_attn_func(*t, causal=True, return_attn_probs=True)[:2], dtype)
    ref64 = grads(lambda t: attention_standard(*t, scale, True), torch.float64)
    same = grads(lambda t: attention_standard(*t, scale, True), dtype)
    for name, a, s, r in zip(("dq", "dk", "dv"), ours, same, ref64):
        assert_within_factor(name, a, s, r, dtype, shape.head_dim)


@pytest.mark.parametrize("backend", list(capabilities.KERNELS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attn_probs_match_output(backend, causal, use_backend):
    """return_attn_probs gives the probabilities the output was made of: P V == O."""
    use_backend(backend)
    shape = CPU_SHAPES[2]
    q, k, v, _ = _inputs(shape, torch.float32)
    out, lse, probs = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert probs.shape == (shape.batch, shape.nheads, shape.seqlen_q, shape.seqlen_k)
    v_heads = v.repeat_interleave(shape.nheads // shape.nheads_k, dim=2).transpose(1, 2)
    torch.testing.assert_close(probs @ v_heads, out.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(9, 3), softcap=5.0)],
                         ids=["causal", "window-softcap"])
def test_wide_offsets_give_the_same_results(options, monkeypatch, use_backend):
    """The portable kernels' WIDE builds (tiles from 64-bit bases, for tensors whose offsets within a
    sequence pass 2^31; common.py) give bit for bit what the 32-bit offsets give, forward and backward,
    dense and packed: here forced on small shapes (tests/test_large.py runs them past 2^31 on a GPU)."""
    from flashattn import flash_attn_varlen_func
    from flashattn.ops.triton import backward, common, configs, forward

    use_backend("triton")
    # The portable kernels only: the Hopper ones address by TMA descriptors or 64-bit bases always.
    for name in ("ping_pong_forward", "warp_specialized", "one_pass_backward"):
        monkeypatch.setattr(configs, name, lambda *args, **kwargs: False)
    torch.manual_seed(3)
    shape = Shape(2, 300, 400, 4, 2, 64) if HAS_CUDA else Shape(2, 33, 40, 2, 1, 32)
    q, k, v, do = _inputs(shape, torch.float16)
    cu_q = torch.tensor([0, shape.seqlen_q, 2 * shape.seqlen_q], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, shape.seqlen_k, 2 * shape.seqlen_k], dtype=torch.int32, device=DEVICE)

    def run():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = flash_attn_func(*leaves, **options)
        packed = [x.flatten(0, 1).clone().requires_grad_() for x in (q, k, v)]
        out_packed = flash_attn_varlen_func(*packed, cu_q, cu_k, shape.seqlen_q, shape.seqlen_k, **options)
        return (out, *torch.autograd.grad(out, leaves, do), out_packed,
                *torch.autograd.grad(out_packed, packed, do.flatten(0, 1)))

    narrow = run()
    for module in (forward, backward):
        monkeypatch.setattr(module, "wide", lambda *args: True)
    assert common.wide(shape.seqlen_k, k) is False
    wide = run()
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)
