"""Graph capture (issue 17, item 4): torch.compile(fullgraph=True) through every public function and
layer with no graph break and no host read, forward and backward equal to eager; torch.export of
models that use the layer or call flash_attn_func (inference); CUDA graph capture of a training step
and of a decode step (GPU only, at the end).

On the CPU the compiled tests run the PyTorch path (FLASHATTN_BACKEND=reference: the custom operators
wrap whichever backend runs, and the Triton interpreter is slow) under the "aot_eager" backend, which
runs Dynamo, AOTAutograd (fake tensors, functionalisation, the joint forward/backward graph) and then
the traced graphs eagerly: everything of torch.compile but code generation. Inductor, the default
backend, compiles a layer and a decode step too. On a CUDA machine the whole file runs on the GPU's
Triton kernels (marked gpu there).
"""
from __future__ import annotations

import contextlib
import io
import shutil

import pytest
import torch
import torch._dynamo.testing
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

import flashattn
from flashattn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                       flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache,
                       scaled_dot_product_attention)
from flashattn.bert_padding import pad_input, unpad_input

from conftest import DEVICE, HAS_CUDA

pytestmark = [pytest.mark.gpu] if HAS_CUDA else []
HAS_CXX = any(shutil.which(c) for c in ("c++", "g++", "clang++"))   # inductor's CPU code needs one
# fp32 throughout. Compiled and eager run the same kernels, so they agree to rounding; the layer's masked
# path under tracing (a dense call with a mask) and its packed eager path add in other orders.
TOL = dict(rtol=2e-4, atol=2e-5)
FORWARD_OP, BACKWARD_OP, CACHE_OP = ("flashattn.attention_forward.default", "flashattn.attention_backward.default",
                                     "flashattn.kv_cache_attention.default")


@pytest.fixture(autouse=True)
def _fresh(use_backend):
    if not HAS_CUDA:
        use_backend("reference")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Recorder:
    """A torch.compile backend: "aot_eager" that records what it was given. `graphs` counts the graphs
    Dynamo hands over (one per compiled function when nothing breaks the graph and nothing recompiles);
    `ops` lists the call_function targets of AOTAutograd's forward and backward graphs (the backward's
    once a backward ran)."""

    def __init__(self):
        self.graphs = 0
        self.ops: list[str] = []
        self.host_reads: list[str] = []

    def _record(self, gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            self.ops.append(str(node.target))
            if "auto_functionalized" in str(node.target):       # a mutating operator, functionalised
                self.ops.append(str(node.args[0]))
            if _reads_device_values(node):
                self.host_reads.append(str(node.target))
        return make_boxed_func(gm.forward)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return aot_autograd(fw_compiler=self._record, bw_compiler=self._record)(gm, example_inputs)

    def check(self, *expected_ops: str) -> None:
        """One graph; the flashattn operators expected in it; nothing that reads a value on the host."""
        assert self.graphs == 1, f"{self.graphs} graphs: a graph break or a recompilation"
        for op in expected_ops:
            assert op in self.ops, f"{op} not in the traced graphs: {sorted(set(self.ops))}"
        assert not self.host_reads, f"host reads in the graph: {self.host_reads}"


def _is_seed(node) -> bool:
    """Whether a graph node is dropout's seed: an int64 scalar drawn on the CPU (philox.draw_seed), which
    return_attn_probs reads to recompute the probabilities (no device involved)."""
    return getattr(node, "target", None) is torch.ops.aten.randint.low


def _reads_device_values(node) -> bool:
    """A tensor's value read on the host (other than dropout's seed), or a tensor whose size depends on
    values (nonzero, boolean indexing): a device synchronisation on a GPU, and no static shapes."""
    if node.target is torch.ops.aten._local_scalar_dense.default:
        return not _is_seed(node.args[0])
    values = node.meta.get("val")
    tensors = [x for x in (values if isinstance(values, (tuple, list)) else (values,)) if isinstance(x, torch.Tensor)]
    return any(free_unbacked_symbols(x.shape) for x in tensors)


def _fresh_copy(x):
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().clone().requires_grad_(x.requires_grad)


def _outputs(result) -> list[torch.Tensor]:
    return [x for x in (result if isinstance(result, (tuple, list)) else (result,)) if isinstance(x, torch.Tensor)]


def _loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    """A loss with a fixed random output gradient (the same for the compiled and the eager run)."""
    gen = torch.Generator().manual_seed(7)
    return sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in outputs
               if o.requires_grad and o.is_floating_point())


def compare(fn, make_args, params=(), backward=True, trials=2, **tol):
    """Compile fn (fullgraph=True) and check it against eager on `trials` fresh inputs of the same
    shapes (new values: the later trials must not recompile): the outputs, and with `backward` the
    gradients of every input that requires one and of `params`. make_args(trial) -> args tuple.
    Returns the Recorder."""
    recorder = Recorder()
    compiled = torch.compile(fn, fullgraph=True, backend=recorder)
    for trial in range(trials):
        args = make_args(trial)
        runs = []
        for run in (compiled, fn):
            inputs = [_fresh_copy(x) for x in args]
            for p in params:
                p.grad = None
            torch.manual_seed(1234 + trial)            # dropout's seed: the same draw for both runs
            outs = _outputs(run(*inputs))
            grads = []
            if backward:
                _loss(outs).backward()
                grads = [x.grad for x in (*inputs, *params) if isinstance(x, torch.Tensor) and x.requires_grad]
            runs.append(([o.detach() for o in outs], grads))
        (outs_c, grads_c), (outs_e, grads_e) = runs
        assert len(outs_c) == len(outs_e)
        for c, e in zip(outs_c, outs_e):
            torch.testing.assert_close(c, e, **(tol or TOL))
        for c, e in zip(grads_c, grads_e):
            assert c is not None and e is not None
            torch.testing.assert_close(c, e, **(tol or TOL))
    recorder.check(FORWARD_OP, *((BACKWARD_OP,) if backward else ()))
    return recorder


def _randn(*shape, grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_(grad)


# -- the functions ------------------------------------------------------------------------------------

B, SQ, SK, H, HK, D = 2, 9, 11, 2, 1, 16          # GQA, seqlen_q != seqlen_k, lengths off the tile sizes
BLOCK_MASK = None


def _block_mask():
    global BLOCK_MASK
    if BLOCK_MASK is None:
        dense = torch.rand(1, H, 3, 3, generator=torch.Generator().manual_seed(3)) < 0.6
        dense[..., 0] = True
        BLOCK_MASK = flashattn.BlockMask.from_dense(dense, block_size=16).to(DEVICE)
    return BLOCK_MASK


# name: (call(q, k, v, extra), extra(trial) or None, (seqlen_q, seqlen_k))
FUNC_CASES = {
    "plain": (lambda q, k, v, x: flash_attn_func(q, k, v), None, (SQ, SK)),
    "causal": (lambda q, k, v, x: flash_attn_func(q, k, v, causal=True), None, (SQ, SK)),
    "causal-square": (lambda q, k, v, x: flash_attn_func(q, k, v, causal=True), None, (SK, SK)),
    "window": (lambda q, k, v, x: flash_attn_func(q, k, v, window_size=(4, 2)), None, (SQ, SK)),
    "softcap": (lambda q, k, v, x: flash_attn_func(q, k, v, softcap=3.0, softmax_scale=0.5), None, (SQ, SK)),
    "alibi": (lambda q, k, v, x: flash_attn_func(q, k, v, causal=True, alibi_slopes=x),
              lambda t: torch.rand(B, H, generator=torch.Generator().manual_seed(t)).to(DEVICE), (SQ, SK)),
    "dropout": (lambda q, k, v, x: flash_attn_func(q, k, v, 0.3, causal=True), None, (SQ, SK)),
    "float-bias-grad": (lambda q, k, v, x: flash_attn_func(q, k, v, attn_bias=x), lambda t: _randn(B, 1, 1, SK, seed=t),
                        (SQ, SK)),
    "bool-mask": (lambda q, k, v, x: flash_attn_func(q, k, v, attn_bias=x),
                  lambda t: torch.rand(B, 1, SQ, SK, generator=torch.Generator().manual_seed(t)).to(DEVICE) > 0.3,
                  (SQ, SK)),
    "block-mask": (lambda q, k, v, x: flash_attn_func(q, k, v, block_mask=BLOCK_MASK), None, (40, 40)),
    "deterministic": (lambda q, k, v, x: flash_attn_func(q, k, v, causal=True, deterministic=True), None, (SQ, SK)),
    "return-attn-probs": (lambda q, k, v, x: flash_attn_func(q, k, v, 0.2, causal=True, return_attn_probs=True),
                          None, (SQ, SK)),
    "every-option": (lambda q, k, v, x: flash_attn_func(q, k, v, 0.2, causal=True, window_size=(30, 0), softcap=4.0,
                                                        alibi_slopes=torch.ones(H, device=DEVICE) / 4, attn_bias=x,
                                                        block_mask=BLOCK_MASK),
                     lambda t: _randn(1, H, 40, 40, seed=t), (40, 40)),
}


@pytest.mark.parametrize("case", FUNC_CASES)
def test_flash_attn_func(case):
    call, extra, (sq, sk) = FUNC_CASES[case]
    _block_mask()                                     # built before tracing: the traced code reads it
    compare(call, lambda t: (_randn(B, sq, H, D, seed=10 * t), _randn(B, sk, HK, D, seed=10 * t + 1),
                             _randn(B, sk, HK, D, seed=10 * t + 2), extra(t) if extra else None))


def test_packed_forms():
    compare(lambda qkv: flash_attn_qkvpacked_func(qkv, causal=True), lambda t: (_randn(B, SQ, 3, H, D, seed=t),))
    torch._dynamo.reset()
    compare(lambda q, kv: flash_attn_kvpacked_func(q, kv, window_size=(3, 3)),
            lambda t: (_randn(B, SQ, H, D, seed=t), _randn(B, SK, 2, HK, D, seed=t + 5)))


def _cu(*lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def test_varlen():
    """cu_seqlens are tensors read by the kernels, never on the host under tracing (their host check is
    skipped there: no host read in the graph), so other lengths of the same totals reuse the graph."""
    lengths_q, lengths_k = [(4, 9), (7, 6)], [(9, 8), (3, 14)]
    compare(lambda q, k, v, cu_q, cu_k: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 14, causal=True),
            lambda t: (_randn(13, H, D, seed=t), _randn(17, HK, D, seed=t + 1), _randn(17, HK, D, seed=t + 2),
                       _cu(*lengths_q[t]), _cu(*lengths_k[t])))


def test_varlen_packed_forms():
    compare(lambda qkv, cu: flash_attn_varlen_qkvpacked_func(qkv, cu, 9, causal=True),
            lambda t: (_randn(13, 3, H, D, seed=t), _cu(*[(4, 9), (9, 4)][t])))
    torch._dynamo.reset()
    compare(lambda q, kv, cu_q, cu_k: flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 9, 9, softcap=2.0),
            lambda t: (_randn(13, H, D, seed=t), _randn(15, 2, HK, D, seed=t + 1), _cu(4, 9), _cu(9, 6)))


def test_varlen_check_skipped_under_compile():
    """What eager checks on the host (one sync), the traced function does not read: a cu_seqlens that
    does not end at the packed length raises in eager and traces without a host read."""
    q = _randn(13, H, D, grad=False)
    bad = _cu(4, 8)
    with pytest.raises(ValueError, match="ends at 12"):
        flash_attn_varlen_func(q, q, q, bad, bad, 9, 9)
    recorder = Recorder()
    torch.compile(lambda q, cu: flash_attn_varlen_func(q, q * 2, q * 3, cu, cu, 9, 9), fullgraph=True,
                  backend=recorder)(q, _cu(4, 9))
    recorder.check(FORWARD_OP)


SDPA_CASES = {
    "bool-mask": (lambda q, k, v, m: scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                  lambda t: torch.rand(B, 1, SQ, SK, generator=torch.Generator().manual_seed(t)).to(DEVICE) > 0.4),
    "float-mask-grad": (lambda q, k, v, m: scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                        lambda t: _randn(SQ, SK, seed=t)),
    "is-causal-top-left": (lambda q, k, v, m: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                           None),
    "dropout-scale": (lambda q, k, v, m: scaled_dot_product_attention(q, k, v, dropout_p=0.2, scale=0.3,
                                                                      enable_gqa=True), None),
}


@pytest.mark.parametrize("case", SDPA_CASES)
def test_scaled_dot_product_attention(case):
    call, extra = SDPA_CASES[case]
    compare(call, lambda t: (_randn(B, H, SQ, D, seed=t), _randn(B, HK, SK, D, seed=t + 1),
                             _randn(B, HK, SK, D, seed=t + 2), extra(t) if extra else None))


def test_one_tensor_as_q_k_v():
    compare(lambda x: flash_attn_func(x, x, x, causal=True), lambda t: (_randn(B, SQ, H, D, seed=t),))


# -- the layers ---------------------------------------------------------------------------------------

def _key_padding(trial: int, dtype=torch.bool) -> torch.Tensor:
    """(4, 7): a full row, right padding, left padding or holes, and a row of padding only."""
    rows = [[1] * 7, [1] * 4 + [0] * 3, [0] * 3 + [1] * 4, [0] * 7] if trial == 0 else \
        [[1] * 6 + [0], [1, 0, 1, 1, 0, 1, 1], [1] * 7, [0] * 7]
    return torch.tensor(rows, device=DEVICE).to(dtype)


LAYER_CASES = {
    "no-mask": (dict(causal=True, rotary=True, num_kv_heads=2), None, False),
    "bool-mask": (dict(causal=True, rotary=True, num_kv_heads=2), torch.bool, False),
    "int-mask-bidirectional": (dict(num_kv_heads=1), torch.int64, False),
    "mask-return-attention": (dict(causal=True, rotary=True), torch.bool, True),
    "block-size": (dict(causal=True, block_size=16), torch.bool, False),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_flash_attention_layer(case):
    """With a key-padding mask, eager packs the real tokens (one host read) and the traced layer attends
    the padded batch with the mask (no host read, static shapes); the results agree, gradients too,
    and other masks of the same shape reuse the graph."""
    kwargs, mask_dtype, return_attention = LAYER_CASES[case]
    torch.manual_seed(0)
    layer = flashattn.nn.FlashAttention(32, 4, device=DEVICE, **kwargs)

    def run(x, mask):
        return layer(x, mask, return_attention=return_attention)

    batch = 4 if mask_dtype is not None else 2
    compare(run, lambda t: (_randn(batch, 7, 32, seed=t), _key_padding(t, mask_dtype) if mask_dtype else None),
            params=list(layer.parameters()))


MHA_CASES = {
    "self": (dict(batch_first=True), dict(need_weights=False)),
    "key-padding-mask": (dict(batch_first=True), dict(need_weights=False, key_padding_mask=True)),
    "float-attn-mask-weights": (dict(batch_first=True), dict(attn_mask=True, average_attn_weights=False)),
    "is-causal": (dict(batch_first=True), dict(need_weights=False, is_causal=True)),
    "cross-kdim-seq-first": (dict(kdim=24, vdim=24, add_bias_kv=True), dict(key_padding_mask=True)),
}


@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention(case):
    module_kwargs, call_kwargs = MHA_CASES[case]
    torch.manual_seed(0)
    mha = flashattn.nn.MultiheadAttention(32, 4, device=DEVICE, **module_kwargs)
    cross = "kdim" in module_kwargs
    batch, length = 2, 7

    def run(x, mem, kpm, attn_mask):
        kwargs = {k: v for k, v in call_kwargs.items() if k not in ("key_padding_mask", "attn_mask")}
        key = mem if cross else x
        return mha(x, key, key, key_padding_mask=kpm, attn_mask=attn_mask, **kwargs)

    def make(t):
        x = _randn(*((batch, length) if mha.batch_first else (length, batch)), 32, seed=t)
        mem = _randn(5, batch, 24, seed=t + 1) if cross else None
        src = 5 if cross else length
        kpm = torch.tensor([[False] * src, [False] * (src - 2 - t) + [True] * (2 + t)], device=DEVICE) \
            if call_kwargs.get("key_padding_mask") else None
        if call_kwargs.get("is_causal"):
            attn_mask = torch.nn.Transformer.generate_square_subsequent_mask(length, device=DEVICE)
        elif call_kwargs.get("attn_mask"):
            attn_mask = _randn(length, src, seed=t + 2)
        else:
            attn_mask = None
        return x, mem, kpm, attn_mask

    compare(run, make, params=list(mha.parameters()))


# -- inference against a KV cache: a mutating operator --------------------------------------------

def _decode_case(paged: bool, rotary: bool):
    """(k_cache, v_cache, cache_seqlens, block_table, rotary_cos, rotary_sin) for B sequences of 32 slots
    each (two pages of 16 when paged), holding 5 and 17 tokens."""
    gen = torch.Generator().manual_seed(5)
    rand = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)     # noqa: E731
    if paged:
        k_cache, v_cache = rand(5, 16, HK, D), rand(5, 16, HK, D)
        block_table = torch.tensor([[3, 0], [4, 1]], dtype=torch.int32, device=DEVICE)
    else:
        k_cache, v_cache = rand(B, 32, HK, D), rand(B, 32, HK, D)
        block_table = None
    cos, sin = (torch.cos(rand(32, D // 2)), torch.sin(rand(32, D // 2))) if rotary else (None, None)
    seqlens = torch.tensor([5, 17], dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, seqlens, block_table, cos, sin


@pytest.mark.parametrize("paged, rotary", [(False, False), (True, True)], ids=["contiguous", "paged-rotary"])
def test_kvcache_updates_the_cache_in_place(paged, rotary):
    """Two decode steps through the compiled function: each writes its token into the caller's cache
    (a mutating custom operator: functionalised while traced, written back in place) and attends to
    it; cache and output equal eager's; the lengths are a device tensor, so the second step reuses
    the graph."""
    k_cache, v_cache, seqlens, block_table, cos, sin = _decode_case(paged, rotary)

    def step(q, k_cache, v_cache, k, v, seqlens):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=seqlens,
                                       block_table=block_table, causal=True, rotary_interleaved=False,
                                       return_softmax_lse=True)

    recorder = Recorder()
    compiled = torch.compile(step, fullgraph=True, backend=recorder)
    caches = {"compiled": (k_cache.clone(), v_cache.clone()), "eager": (k_cache.clone(), v_cache.clone())}
    for t in range(2):
        q, k, v = (_randn(B, 1, heads, D, grad=False, seed=20 * t + i) for i, heads in enumerate((H, HK, HK)))
        lengths = seqlens + t
        out_c = compiled(q, *caches["compiled"], k, v, lengths)
        out_e = step(q, *caches["eager"], k, v, lengths)
        for c, e in zip(out_c, out_e):
            torch.testing.assert_close(c, e, **TOL)
        for c, e in zip(caches["compiled"], caches["eager"]):
            assert torch.equal(c, e)
    assert not torch.equal(caches["compiled"][0], k_cache)       # written in place, the two new tokens
    recorder.check(CACHE_OP)


def test_kvcache_int_lengths():
    """An int cache_seqlens (one length for every sequence, a launch argument) is a constant of the
    graph; three new tokens each, written in place as in eager."""
    k_cache, v_cache, _, _, _, _ = _decode_case(False, False)
    q, k, v = (_randn(B, 3, heads, D, grad=False, seed=i) for i, heads in enumerate((H, HK, HK)))
    step = lambda q, kc, vc, k, v: flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=9, causal=True)  # noqa: E731
    recorder = Recorder()
    kc, vc = k_cache.clone(), v_cache.clone()
    out = torch.compile(step, fullgraph=True, backend=recorder)(q, kc, vc, k, v)
    kc_e, vc_e = k_cache.clone(), v_cache.clone()
    torch.testing.assert_close(out, step(q, kc_e, vc_e, k, v), **TOL)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)
    recorder.check(CACHE_OP)


# -- packing under torch.compile -------------------------------------------------------------------

def test_unpad_varlen_pad_round_trip():
    """bert_padding under tracing: no host read (max_seqlen is the padded length, an upper bound), the
    token count a data-dependent size; one graph through unpad_input, flash_attn_varlen_func and
    pad_input, for masks with other token counts too."""
    def attend(x, mask):
        x_packed, indices, cu_seqlens, max_seqlen, _ = unpad_input(x, mask)
        q = x_packed.unflatten(-1, (H, D))
        out = flash_attn_varlen_func(q, q * 0.5, q * 2.0, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        return pad_input(out.flatten(-2), indices, x.shape[0], x.shape[1])

    recorder = Recorder()
    compiled = torch.compile(attend, fullgraph=True, backend=recorder)
    for t in range(2):
        x, mask = _randn(4, 7, H * D, seed=t), _key_padding(t)
        x_e = _fresh_copy(x)
        out_c, out_e = compiled(x, mask), attend(x_e, mask)
        torch.testing.assert_close(out_c, out_e, **TOL)
        _loss([out_c]).backward()
        _loss([out_e]).backward()
        torch.testing.assert_close(x.grad, x_e.grad, **TOL)
    assert recorder.graphs == 1 and FORWARD_OP in recorder.ops and BACKWARD_OP in recorder.ops


def test_varlen_max_seqlen_read_in_graph():
    """max_seqlen computed from cu_seqlens inside the compiled function (int(t.max())): a value only
    the running graph knows, asserted there (torch._check_value) rather than branched on."""
    def attend(q, cu):
        longest = int((cu[1:] - cu[:-1]).max())
        return flash_attn_varlen_func(q, q * 0.5, q * 2.0, cu, cu, longest, longest, causal=True)

    q = _randn(13, H, D)
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    for cu in (_cu(4, 9), _cu(11, 2)):
        torch.testing.assert_close(compiled(q, cu), attend(q, cu), **TOL)


def test_dynamic_shapes():
    """torch.compile(dynamic=True): one graph for every batch and length."""
    layer = flashattn.nn.FlashAttention(32, 4, causal=True, rotary=True, device=DEVICE)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=counter)
    for batch, length in ((2, 5), (3, 9), (1, 12)):
        x = _randn(batch, length, 32, grad=False)
        mask = torch.rand(batch, length, device=DEVICE) > 0.3
        torch.testing.assert_close(compiled(x, mask), layer(x, mask), **TOL)
        torch.testing.assert_close(compiled(x), layer(x), **TOL)


# -- inductor -----------------------------------------------------------------------------------------

inductor = pytest.mark.skipif(not HAS_CUDA and not HAS_CXX, reason="inductor's CPU code needs a C++ compiler")


@inductor
def test_inductor_layer_forward_backward():
    """The default backend (code generation around the custom operators, whose outputs' layouts it
    checks against their fake implementations)."""
    torch.manual_seed(0)
    layer = flashattn.nn.FlashAttention(32, 4, causal=True, rotary=True, num_kv_heads=2, device=DEVICE)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    for t in range(2):
        x, mask = _randn(4, 7, 32, seed=t), _key_padding(t)
        x_e = _fresh_copy(x)
        results = []
        for run, inp in ((compiled, x), (layer, x_e)):
            layer.zero_grad()
            out = run(inp, mask)
            _loss([out]).backward()
            results.append((out.detach(), inp.grad, *(p.grad.clone() for p in layer.parameters())))
        for c, e in zip(*results):
            torch.testing.assert_close(c, e, **TOL)
        y = _randn(2, 7, 32, grad=False, seed=t)            # no mask: the plain kernels (torch's fused CPU ones)
        with torch.no_grad():
            torch.testing.assert_close(compiled(y), layer(y), **TOL)
    assert counter.frame_count == 2                          # with and without a mask: two graphs, no recompilation


@inductor
def test_inductor_kvcache_in_place():
    k_cache, v_cache, seqlens, block_table, cos, sin = _decode_case(True, False)
    step = lambda q, kc, vc, k, v, s: flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=s,  # noqa: E731
                                                              block_table=block_table, causal=True)
    q, k, v = (_randn(B, 1, heads, D, grad=False, seed=i) for i, heads in enumerate((H, HK, HK)))
    kc, vc, kc_e, vc_e = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    out = torch.compile(step, fullgraph=True)(q, kc, vc, k, v, seqlens)
    torch.testing.assert_close(out, step(q, kc_e, vc_e, k, v, seqlens), **TOL)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e) and not torch.equal(kc, k_cache)


# -- torch.export (inference) -------------------------------------------------------------------------

class _Classifier(torch.nn.Module):
    """A model using the layer: attention, then a linear head."""

    def __init__(self):
        super().__init__()
        self.attn = flashattn.nn.FlashAttention(32, 4, causal=True, rotary=True, num_kv_heads=2, device=DEVICE)
        self.head = torch.nn.Linear(32, 5, device=DEVICE)

    def forward(self, x, mask=None):
        return self.head(self.attn(x, mask))


class _Direct(torch.nn.Module):
    """A model that calls flash_attn_func itself."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 3 * 32, device=DEVICE)

    def forward(self, x):
        q, k, v = self.proj(x).unflatten(-1, (3, 4, 8)).unbind(2)
        return flash_attn_func(q, k, v, causal=True, window_size=(3, 0)).flatten(-2)


def _exported_ops(program) -> list[str]:
    return [str(node.target) for node in program.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_model_with_layer(strict):
    """The layer exports (its custom operator in the program, nothing read on the host), with and
    without a mask; the program runs like the model, also after a save/load round trip."""
    torch.manual_seed(0)
    model = _Classifier().eval()
    x, mask = _randn(4, 7, 32, grad=False), _key_padding(0)
    with torch.no_grad():
        for args in ((x,), (x, mask)):
            program = torch.export.export(model, args, strict=strict)
            assert FORWARD_OP in _exported_ops(program)
            nodes = [node for node in program.graph.nodes if node.op == "call_function"]
            assert not [node for node in nodes if _reads_device_values(node)]
            torch.testing.assert_close(program.module()(*args), model(*args), **TOL)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        buffer.seek(0)
        loaded = torch.export.load(buffer)
        other = _key_padding(1)
        torch.testing.assert_close(loaded.module()(x, other), model(x, other), **TOL)


def test_export_direct_call_dynamic_shapes():
    """A model calling flash_attn_func, exported with a symbolic batch and length: one program for
    every shape."""
    torch.manual_seed(0)
    model = _Direct().eval()
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=2, max=4096)
    with torch.no_grad():
        program = torch.export.export(model, (_randn(2, 7, 32, grad=False),), dynamic_shapes=({0: batch, 1: length},))
        assert FORWARD_OP in _exported_ops(program)
        for shape in ((2, 7), (3, 20), (1, 2)):
            x = _randn(*shape, 32, grad=False)
            torch.testing.assert_close(program.module()(x), model(x), **TOL)


# -- CUDA graphs (GPU only) ---------------------------------------------------------------------------

def cuda_only(test):
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA GPU")(test))


@contextlib.contextmanager
def _sync_errors():
    """Any host synchronisation inside raises (torch.cuda.set_sync_debug_mode)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _assert_near(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Relative error in norm: bf16 results of two kernels (or of one with atomic adds) differ by
    roundings, which an elementwise rule trips on near zero."""
    assert got.shape == want.shape and got.dtype == want.dtype
    error = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)
    assert error <= rel, f"relative error {error:.2e} > {rel:.0e}"


def _capture(step):
    """Warm `step` up on a side stream (the Triton kernels compile on their first launch), then capture
    one call into a CUDA graph with host synchronisation made an error. Returns (graph, its outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with _sync_errors():
            outputs = step()
    return graph, outputs


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_training_step(dtype):
    """Forward and backward of flash_attn_func (GQA, causal, a float bias with its gradient) captured
    once and replayed on new inputs copied into the static tensors: the same results as eager."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(2, 300, 8, 64), (2, 300, 2, 64), (2, 300, 2, 64), (1, 8, 300, 300)]
    static = [torch.randn(s, device="cuda", dtype=dtype, generator=gen).requires_grad_() for s in shapes]
    dout = torch.randn(shapes[0], device="cuda", dtype=dtype, generator=gen)

    def step():
        q, k, v, bias = static
        out = flash_attn_func(q, k, v, causal=True, attn_bias=bias)
        return (out, *torch.autograd.grad(out, static, dout))

    graph, outputs = _capture(step)
    for _ in range(2):
        with torch.no_grad():
            for x in static:
                x.copy_(torch.randn(x.shape, device="cuda", dtype=dtype, generator=gen))
        graph.replay()
        expected = step()
        for got, want in zip(outputs, expected):
            _assert_near(got, want, 1e-2)                 # the same kernels; dbias's atomic adds may reorder sums


@cuda_only
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-padding-mask"])
def test_cuda_graph_layer_training_step(masked):
    """The layer's forward and backward (parameters' gradients included) captured and replayed. With a
    key-padding mask the captured layer takes the masked dense path (packing would read the lengths on
    the host, which capture forbids); eager packs: the same results."""
    torch.manual_seed(0)
    layer = flashattn.nn.FlashAttention(256, 4, causal=True, rotary=True, num_kv_heads=2, device="cuda",
                                        dtype=torch.bfloat16)
    params = list(layer.parameters())
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(3, 200, 256, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    dout = torch.randn(3, 200, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
    mask = torch.arange(200, device="cuda") < torch.tensor([[200], [130], [1]], device="cuda") if masked else None

    def step():
        out = layer(x, mask)
        return (out, *torch.autograd.grad(out, [x, *params], dout))

    graph, outputs = _capture(step)
    for lengths in ([200, 7, 64], [99, 200, 0]):
        with torch.no_grad():
            x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen))
            if masked:
                mask.copy_(torch.arange(200, device="cuda") < torch.tensor(lengths, device="cuda")[:, None])
        graph.replay()
        expected = step()
        for got, want in zip(outputs, expected):
            _assert_near(got, want, 2e-2)                 # with the mask: another kernel than eager's, in bf16


@cuda_only
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_cuda_graph_decode_step(paged):
    """One decode step (append a token to a KV cache, rotary on the way, attend) captured with the
    lengths in a device tensor, then replayed for several tokens, the lengths advanced in place
    between replays: output and cache equal eager's step by step."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype, batch, heads, heads_k, dim, capacity = torch.bfloat16, 3, 8, 2, 128, 512
    rand = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=gen)   # noqa: E731
    if paged:
        page, pages = 64, batch * capacity // 64
        k_cache, v_cache = rand(pages, page, heads_k, dim), rand(pages, page, heads_k, dim)
        block_table = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32).view(batch, -1)
    else:
        k_cache, v_cache = rand(batch, capacity, heads_k, dim), rand(batch, capacity, heads_k, dim)
        block_table = None
    angles = torch.rand(capacity, dim // 2, device="cuda", generator=gen) * 6.28
    cos, sin = angles.cos(), angles.sin()
    seqlens = torch.tensor([0, 100, 400], dtype=torch.int32, device="cuda")
    q, k, v = rand(batch, 1, heads, dim), rand(batch, 1, heads_k, dim), rand(batch, 1, heads_k, dim)

    def step(k_cache=k_cache, v_cache=v_cache):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=seqlens,
                                       block_table=block_table, causal=True, rotary_interleaved=False)

    before = (k_cache.clone(), v_cache.clone())
    graph, out = _capture(step)
    k_cache.copy_(before[0])
    v_cache.copy_(before[1])                                       # undo the warm-up and capture writes
    for _ in range(3):
        for x in (q, k, v):
            x.copy_(torch.randn(x.shape, device="cuda", dtype=dtype, generator=gen))
        k_eager, v_eager = k_cache.clone(), v_cache.clone()
        expected = step(k_eager, v_eager)
        graph.replay()
        _assert_near(out, expected, 1e-2)
        assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)
        seqlens += 1                                               # the next token's slot


@cuda_only
@pytest.mark.xfail(strict=True, reason="dropout's seed is drawn on the host at each call (philox.draw_seed) and "
                   "reaches the kernel by value, so a captured graph replays its capture's seed: every replay "
                   "drops the same entries")
def test_cuda_graph_dropout_draws_a_new_mask_per_replay():
    q = torch.randn(1, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    graph, out = _capture(lambda: flash_attn_func(q, k, v, dropout_p=0.5))
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(out, first)
