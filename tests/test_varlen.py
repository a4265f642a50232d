"""Packed sequences (flash_attn_varlen_func and its packed forms): each sequence gives exactly what a
dense call on it alone gives, forward and backward, with every option that takes a packed form; the
float64 reference bounds the error; bad cu_seqlens never reach a kernel."""
import math

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from errors import assert_within_factor
from flashattn import (flash_attn_func, flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                       flash_attn_varlen_qkvpacked_func)
from flashattn.bert_padding import pad_input, unpad_input
from flashattn.ops.reference import attention_standard

BACKENDS = ["triton", "reference"]
# Lengths per sequence (q, k): an empty query sequence, an empty key sequence (its rows see no key),
# seqlen_q != seqlen_k both ways, one row, lengths across several tiles of the interpreter's 32 x 16.
LENS_CPU = ([5, 33, 0, 17, 1, 40], [7, 33, 4, 40, 0, 19])
LENS_GPU = ([700, 1025, 0, 17, 1, 333, 2048], [700, 900, 64, 1500, 0, 333, 2048])
LENS = LENS_GPU if HAS_CUDA else LENS_CPU
OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(9, 3)),
    "softcap-alibi": dict(softcap=5.0, causal=True),
    "alibi-per-sequence": dict(alibi=True),
}


def _dtypes(backend):
    return [torch.float16, torch.float32] if not HAS_CUDA else [torch.bfloat16, torch.float32]


def _between_kernels(dtype):
    """Tolerance between two of our outputs that different kernels computed (the dense call of a short
    query may take the split-KV kernel, a paged cache the decode kernel): each is rounded to dtype once,
    so they are up to two roundings (2^-8 relative each in bf16, 2^-11 in fp16) apart, not one."""
    return {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}[dtype]


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _packed(lens_q, lens_k, nheads, nheads_k, head_dim, dtype):
    q = torch.randn(sum(lens_q), nheads, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(sum(lens_k), nheads_k, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn_like(k)
    return q, k, v


def _kwargs(name, nseq, nheads):
    kw = dict(OPTIONS[name])
    if kw.pop("alibi", False) or name == "softcap-alibi":
        kw["alibi_slopes"] = torch.rand(nseq, nheads, device=DEVICE) if name == "alibi-per-sequence" \
            else torch.rand(nheads, device=DEVICE)
    return kw


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_sequence_equals_its_dense_call(backend, option, use_backend):
    use_backend(backend)
    torch.manual_seed(0)
    lens_q, lens_k = LENS
    nheads, nheads_k, head_dim = 4, 2, 40
    for dtype in _dtypes(backend):
        q, k, v = _packed(lens_q, lens_k, nheads, nheads_k, head_dim, dtype)
        kw = _kwargs(option, len(lens_q), nheads)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = flash_attn_varlen_func(*leaves, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), **kw)
        assert out.shape == q.shape
        do = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, leaves, do)
        cq, ck = _cu(lens_q).tolist(), _cu(lens_k).tolist()
        for b in range(len(lens_q)):
            rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            dense_kw = dict(kw)
            if dense_kw.get("alibi_slopes") is not None and dense_kw["alibi_slopes"].dim() == 2:
                dense_kw["alibi_slopes"] = dense_kw["alibi_slopes"][b]
            one = [x[r].unsqueeze(0).clone().requires_grad_() for x, r in ((q, rq), (k, rk), (v, rk))]
            if lens_q[b] == 0:
                continue
            ref = flash_attn_func(*one, **dense_kw)
            grads = torch.autograd.grad(ref, one, do[rq].unsqueeze(0))
            tol = _between_kernels(dtype)
            torch.testing.assert_close(out[rq], ref[0], **tol)
            for ours, theirs, r in zip((dq, dk, dv), grads, (rq, rk, rk)):
                torch.testing.assert_close(ours[r], theirs[0], **tol)
        # A key sequence of length 0 gives its query rows no key: output 0, no gradient.
        for b in range(len(lens_q)):
            if lens_k[b] == 0 and lens_q[b] > 0:
                assert not out[cq[b]:cq[b + 1]].any() and not dq[cq[b]:cq[b + 1]].any()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(backend, causal, use_backend):
    """The error rule of every kernel test (tests/errors.py), sequence by sequence."""
    use_backend(backend)
    torch.manual_seed(1)
    lens_q, lens_k = LENS
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    head_dim = 64
    q, k, v = _packed(lens_q, lens_k, 4, 2, head_dim, dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flash_attn_varlen_func(*leaves, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), causal=causal,
                                 return_attn_probs=True)
    out, lse, probs = out
    assert lse.shape == (4, sum(lens_q)) and probs.shape == (len(lens_q), 4, max(lens_q), max(lens_k))
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    _check_each_sequence(q, k, v, do, (out, lse, *grads), lens_q, lens_k, causal)
    scale = 1 / math.sqrt(head_dim)
    cq, ck = _cu(lens_q).tolist(), _cu(lens_k).tolist()
    for b in range(len(lens_q)):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if lens_q[b] == 0 or lens_k[b] == 0:
            continue
        assert torch.allclose(probs[b, :, :lens_q[b], :lens_k[b]].double(),
                              torch.softmax(_scores(q[rq], k[rk], scale, causal), -1).nan_to_num(0.0), atol=1e-3)
        assert not probs[b, :, lens_q[b]:].any() and not probs[b, :, :, lens_k[b]:].any()


def _check_each_sequence(q, k, v, do, results, lens_q, lens_k, causal):
    """results = (out, lse, dq, dk, dv) of a packed call on q, k, v (output gradient do) against the
    float64 reference, sequence by sequence, within the error rule (tests/errors.py); a sequence
    with no key gives its rows O = 0, LSE = +inf and dQ = 0, one with no query gives dK = dV = 0.
    lse may be None (not checked)."""
    out, lse, dq, dk, dv = results
    dtype, head_dim = q.dtype, q.shape[-1]
    scale = 1 / math.sqrt(head_dim)
    cq, ck = _cu(lens_q).tolist(), _cu(lens_k).tolist()
    for b in range(len(lens_q)):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if lens_k[b] == 0:
            assert not out[rq].any() and not dq[rq].any() and (lse is None or bool(torch.isinf(lse[:, rq]).all()))
        if lens_q[b] == 0:
            assert not dk[rk].any() and not dv[rk].any()
        if lens_q[b] == 0 or lens_k[b] == 0:
            continue
        refs = []
        for ref_dtype in (torch.float64, dtype):
            ref_leaves = [x[r].unsqueeze(0).to(ref_dtype).requires_grad_() for x, r in ((q, rq), (k, rk), (v, rk))]
            ref_out, ref_lse = attention_standard(*ref_leaves, scale, causal)
            refs.append((ref_out[0], ref_lse[0], *(g[0] for g in torch.autograd.grad(
                ref_out, ref_leaves, do[rq].unsqueeze(0).to(ref_dtype)))))
        ours = (out[rq], None if lse is None else lse[:, rq], dq[rq], dk[rk], dv[rk])
        for name, o, same, r64 in zip(("out", "lse", "dq", "dk", "dv"), ours, refs[1], refs[0]):
            if o is not None:
                assert_within_factor(name, o, same, r64, dtype, head_dim)


def _scores(q, k, scale, causal):
    """(H, Sq, Sk) float64 scores of one sequence, GQA broadcast, bottom-right causal mask."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if causal:
        sq, sk = q.shape[0], k.shape[0]
        keep = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + sk - sq
        s = s.masked_fill(~keep, float("-inf"))
    return s


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_equals_the_dense_batch_of_equal_lengths(backend, use_backend):
    """Dropout's counters are (sequence index, head): with equal lengths, the packed call draws the
    same mask as the dense batched call, forward and backward."""
    use_backend(backend)
    torch.manual_seed(2)
    batch, seqlen, nheads, head_dim = 3, 48, 2, 32
    dtype = torch.float32
    q, k, v = (torch.randn(batch, seqlen, nheads, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
               for _ in range(3))
    cu = _cu([seqlen] * batch)
    torch.manual_seed(5)
    dense = flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    torch.manual_seed(5)
    packed = flash_attn_varlen_func(*(x.flatten(0, 1) for x in (q, k, v)), cu, cu, seqlen, seqlen, dropout_p=0.3,
                                    causal=True)
    torch.testing.assert_close(packed, dense.flatten(0, 1), atol=1e-5, rtol=1e-5)
    do = torch.randn_like(dense)
    g_dense = torch.autograd.grad(dense, (q, k, v), do)
    g_packed = torch.autograd.grad(packed, (q, k, v), do.flatten(0, 1))
    for a, b in zip(g_dense, g_packed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_forms_equal_unpacked(backend, use_backend):
    use_backend(backend)
    torch.manual_seed(3)
    lens = LENS[0]
    qkv = torch.randn(sum(lens), 3, 2, 32, device=DEVICE, dtype=torch.float32)
    cu = _cu(lens)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=True)
    ref = flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, max(lens), max(lens), causal=True)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    out = flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, max(lens), max(lens), causal=True)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_mask_reaches_the_varlen_path(backend, use_backend):
    """bert_padding: unpad a padded batch by its key-padding mask, attend packed, pad back: the real
    rows equal the dense call with the same mask as a bool attn_bias."""
    use_backend(backend)
    torch.manual_seed(4)
    batch, seqlen, nheads, head_dim = 3, 40, 2, 32
    x = [torch.randn(batch, seqlen, nheads, head_dim, device=DEVICE) for _ in range(3)]
    mask = torch.ones(batch, seqlen, dtype=torch.bool, device=DEVICE)
    mask[0, 25:] = False
    mask[2, 7:] = False
    unpadded = [unpad_input(t, mask) for t in x]
    (q, indices, cu, max_len, _), (k, *_), (v, *_) = unpadded
    out = pad_input(flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len), indices, batch, seqlen)
    ref = flash_attn_func(*x, attn_bias=mask[:, None, None, :])
    torch.testing.assert_close(out[mask], ref[mask], atol=1e-5, rtol=1e-5)
    assert not out[~mask].any()


def _good():
    lens = [3, 5]
    q = torch.randn(8, 2, 16, device=DEVICE)
    return q, q.clone(), q.clone(), _cu(lens), _cu(lens), 5, 5


BAD = {
    "not monotone": (lambda a: a.__setitem__(3, torch.tensor([0, 6, 3, 8], dtype=torch.int32, device=DEVICE)),
                     "decreases"),
    "not from 0": (lambda a: a.__setitem__(3, torch.tensor([1, 3, 8], dtype=torch.int32, device=DEVICE)),
                   "starts at 1"),
    "wrong total": (lambda a: a.__setitem__(4, torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)),
                    "ends at 7"),
    "int64": (lambda a: a.__setitem__(3, a[3].long()), "int32"),
    "2-D": (lambda a: a.__setitem__(3, a[3][None]), "shape"),
    "max too small": (lambda a: a.__setitem__(5, 4), "more than max_seqlen_q=4"),
    "max not int": (lambda a: a.__setitem__(6, 5.0), "max_seqlen_k must be an int"),
    "different counts": (lambda a: a.__setitem__(4, torch.tensor([0, 2, 5, 8], dtype=torch.int32, device=DEVICE)),
                         "same number of sequences"),
    "4-D q": (lambda a: a.__setitem__(0, a[0][None]), "3 dims"),
    "alibi of the wrong batch": (None, "alibi_slopes must have shape"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_before_any_kernel(case):
    args = list(_good())
    change, message = BAD[case]
    kwargs = {}
    if change is None:
        kwargs["alibi_slopes"] = torch.rand(3, 2, device=DEVICE)
    else:
        change(args)
    with pytest.raises((ValueError, TypeError), match=message):
        flash_attn_varlen_func(*args, **kwargs)


def test_cu_seqlens_are_read_once_until_written(monkeypatch):
    """A cu_seqlens tensor that calls share (a model's layers) is read from the device at its first
    call only; an in-place write makes the next call read and check it again."""
    q, k, v, cu_q, cu_k, max_q, max_k = _good()
    reads = []
    tolist = torch.Tensor.tolist

    def counted(x):
        reads.append(x.numel())
        return tolist(x)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    first = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)
    assert len(reads) == 2
    assert torch.equal(flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k), first)
    assert len(reads) == 2
    cu_k[1] = cu_k[2] + 1                                   # no longer non-decreasing
    with pytest.raises(ValueError, match="decreases"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)
    assert len(reads) == 3
    with torch.inference_mode():                            # inference tensors: read at every call
        cu_i = _cu([3, 5])
        flash_attn_varlen_func(q, k, v, cu_i, cu_q, max_q, max_k)
        cu_i[1] = 9
        with pytest.raises(ValueError, match="decreases"):
            flash_attn_varlen_func(q, k, v, cu_i, cu_q, max_q, max_k)


def _paged_cache(k, v, lens_k, page_size, generator):
    """k, v (total_k, Hk, D) packed as a pool of pages in shuffled order (and a few unused ones) with
    its block table (batch, max_blocks), as a serving engine's cache holds the same keys."""
    blocks = [math.ceil(n / page_size) for n in lens_k]
    order = torch.randperm(sum(blocks) + 3, generator=generator).tolist()
    pool_k = torch.randn(len(order), page_size, *k.shape[1:], dtype=k.dtype, device=k.device)
    pool_v = torch.randn_like(pool_k)
    table = torch.zeros(len(lens_k), max(max(blocks), 1), dtype=torch.int32)
    start = 0
    for b, n in enumerate(lens_k):
        for i in range(blocks[b]):
            page, rows = order.pop(), slice(start + i * page_size, start + min((i + 1) * page_size, n))
            table[b, i] = page
            pool_k[page, :rows.stop - rows.start] = k[rows]
            pool_v[page, :rows.stop - rows.start] = v[rows]
        start += n
    return pool_k, pool_v, table.to(k.device)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_cache_equals_the_contiguous_call(backend, option, use_backend):
    """With block_table, k and v are a paged cache (chunked prefill against cached keys): the same
    result as the packed call on the same keys, each sequence aligned at its own bottom-right corner,
    including sequences with no query, no key, or more queries than keys."""
    use_backend(backend)
    torch.manual_seed(0)
    lens_q, lens_k = LENS
    nheads, nheads_k, head_dim = 4, 2, 40
    dtype = _dtypes(backend)[0]
    q, k, v = _packed(lens_q, lens_k, nheads, nheads_k, head_dim, dtype)
    pool_k, pool_v, table = _paged_cache(k, v, lens_k, 16, torch.Generator().manual_seed(1))
    kwargs = _kwargs(option, len(lens_q), nheads)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    expected = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **kwargs)
    before = pool_k.clone(), pool_v.clone()
    got = flash_attn_varlen_func(q, pool_k, pool_v, cu_q, cu_k, max(lens_q), max(lens_k), block_table=table,
                                 **kwargs)
    torch.testing.assert_close(got, expected, **_between_kernels(dtype))
    assert torch.equal(pool_k, before[0]) and torch.equal(pool_v, before[1])   # read, never written


def test_paged_cache_takes_no_training_options():
    q, k, v, cu_q, cu_k, max_q, max_k = _good()
    pool = torch.zeros(4, 16, k.shape[1], k.shape[2], dtype=k.dtype, device=DEVICE)
    table = torch.zeros(cu_q.numel() - 1, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(NotImplementedError, match="dropout, return_attn_probs, tile_size"):
        flash_attn_varlen_func(q, pool, pool, cu_q, cu_k, max_q, max_k, dropout_p=0.1, return_attn_probs=True,
                               block_table=table, tile_size=32)
    with pytest.raises(ValueError, match=r"k must have 4 dims \(num_pages, page_size"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, block_table=table)


# The Hopper kernels on packed sequences (sm_90; the warp-specialized forward also under the CPU
# interpreter, which runs its TMA loads): each forced on for every call (in production the sm_90
# tables choose them by the longest sequence), against float64 sequence by sequence. Lengths (q, k):
# an empty query sequence, an empty key sequence, one row, 17, lengths that are no multiple of any
# tile, seqlen_q != seqlen_k both ways, sequences over several tiles, a lone key.
HAS_SM90 = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
HOPPER_LENS = (([0, 1, 17, 5, 700, 1025, 300, 2048, 17], [64, 129, 17, 0, 900, 1025, 333, 2048, 1]) if HAS_CUDA
               else ([0, 1, 17, 5, 40, 33], [9, 20, 17, 0, 31, 33]))
# family -> (head dims, configs' choice functions answered so, launchers that may not run)
HOPPER = {
    "ping-pong": ((64, 128, 256), dict(ping_pong_forward=True), [("forward", "_launch_fwd"),
                                                                  ("forward", "_launch_fwd_ws")]),
    "warp-specialized": ((64, 128, 256) if HAS_CUDA else (40, 64), dict(ping_pong_forward=False, warp_specialized=True),
                         [("forward", "_launch_fwd"), ("forward_sm90", "_launch_fwd_sm90")]),
    "one-pass": ((64, 128, 256), dict(one_pass_backward=True), [("backward", "_launch_bwd")]),
}


def _hopper_cases():
    marks = [pytest.mark.gpu] if HAS_CUDA else []
    for family, (head_dims, _, _) in HOPPER.items():
        runs = HAS_SM90 or (family == "warp-specialized" and not HAS_CUDA)
        for head_dim in head_dims:
            for causal in (False, True):
                for deterministic in ((False, True) if family == "one-pass" else (False,)):
                    name = f"{family}-d{head_dim}-{'causal' if causal else 'full'}{'-det' if deterministic else ''}"
                    yield pytest.param(family, head_dim, causal, deterministic, id=name, marks=marks + (
                        [] if runs else [pytest.mark.skip(reason=f"the {family} kernel is a Hopper (sm_90) kernel")]))


@pytest.mark.parametrize("family, head_dim, causal, deterministic", list(_hopper_cases()))
def test_hopper_kernels_on_packed_sequences(family, head_dim, causal, deterministic, monkeypatch, use_backend):
    """Forward and backward of a packed call that the Hopper kernel `family` runs (the other kernels of
    its pass may not), against float64; deterministic=True gives bit-identical gradients twice."""
    from flashattn.ops.triton import configs

    use_backend("triton")
    _force_family(family, monkeypatch)
    if family == "warp-specialized" and HAS_CUDA:
        # The sm_90 table has no warp-specialized shape of its own for head dim 64 causal.
        monkeypatch.setitem(configs._TABLES[(9, 0)]["fwd_ws"], (64, True, True), configs.TileConfig(128, 64, 4, 2))
    torch.manual_seed(6)
    lens_q, lens_k = HOPPER_LENS
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    q, k, v = _packed(lens_q, lens_k, 4, 2, head_dim, dtype)
    do = torch.randn_like(q)
    runs = []
    for _ in range(2 if deterministic else 1):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse, _ = flash_attn_varlen_func(*leaves, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k),
                                             causal=causal, deterministic=deterministic, return_attn_probs=True)
        runs.append((out, lse, *torch.autograd.grad(out, leaves, do)))
    if deterministic:
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    _check_each_sequence(q, k, v, do, runs[0], lens_q, lens_k, causal)


def _force_family(family, monkeypatch):
    """Answer configs' kernel choices so that the forward runs the Hopper kernel `family`, and make
    the other forward launchers fail."""
    from flashattn.ops.triton import backward, configs, forward, forward_sm90

    _, choices, refused = HOPPER[family]
    modules = dict(forward=forward, backward=backward, forward_sm90=forward_sm90)

    def other_kernel(*args, **kwargs):
        raise AssertionError(f"the call left the {family} kernel")

    for name, answer in choices.items():
        monkeypatch.setattr(configs, name, lambda *args, answer=answer, **kwargs: answer)
    for module, name in refused:
        monkeypatch.setattr(modules[module], name, other_kernel)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SM90, reason="the Hopper kernels run on sm_90")
@pytest.mark.parametrize("family", ["ping-pong", "warp-specialized"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_a_nan_stays_in_its_sequence(family, causal, monkeypatch, use_backend):
    """A NaN in one packed sequence's q, k and v (every row) reaches no other sequence: the Hopper
    forwards read no key or value past a sequence's ends, though their tiles overhang them."""
    use_backend("triton")
    _force_family(family, monkeypatch)
    torch.manual_seed(8)
    lens_q, lens_k = [300, 40, 129, 200, 70], [250, 40, 200, 129, 90]
    q, k, v = _packed(lens_q, lens_k, 4, 2, 128, torch.bfloat16)
    args = (_cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k))
    clean = flash_attn_varlen_func(q, k, v, *args, causal=causal)
    cq, ck = _cu(lens_q).tolist(), _cu(lens_k).tolist()
    for x, c in ((q, cq), (k, ck), (v, ck)):
        x[c[2]:c[3]] = float("nan")
    out = flash_attn_varlen_func(q, k, v, *args, causal=causal)
    assert torch.isnan(out[cq[2]:cq[3]]).all()
    for b in (0, 1, 3, 4):
        assert torch.equal(out[cq[b]:cq[b + 1]], clean[cq[b]:cq[b + 1]]), f"sequence {b}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SM90, reason="the Hopper kernels run on sm_90")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sm90_tables_send_long_packed_sequences_to_the_hopper_kernels(causal, monkeypatch, use_backend):
    """A packed bf16 batch at head dim 128 whose longest sequence is 4096 runs the ping-pong forward and
    the one-pass backward (the tables' choice at that length), correctly."""
    from flashattn.ops.triton import backward_sm90, forward_sm90

    use_backend("triton")
    ran = []
    for module, name in ((forward_sm90, "forward"), (backward_sm90, "backward")):
        def spy(*args, fn=getattr(module, name), **kwargs):
            ran.append(fn.__module__)
            return fn(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    torch.manual_seed(7)
    lens = [4096, 1, 0, 3000, 17, 2049]
    q, k, v = _packed(lens, lens, 4, 4, 128, torch.bfloat16)
    do = torch.randn_like(q)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flash_attn_varlen_func(*leaves, _cu(lens), _cu(lens), max(lens), max(lens), causal=causal)
    grads = torch.autograd.grad(out, leaves, do)
    assert ran == [forward_sm90.__name__, backward_sm90.__name__]
    _check_each_sequence(q, k, v, do, (out, None, *grads), lens, lens, causal)


def test_a_sequence_past_the_kernels_row_indices_is_refused(use_backend):
    """Packed batches have no size limit but the kernels' 32-bit row indices within a sequence: its
    longest sequence must be shorter than 2^29 rows (an expanded view: no memory behind it)."""
    from flashattn.interface import MAX_SEQLEN

    use_backend("triton")
    x = torch.zeros(1, 1, 8, dtype=torch.float16, device=DEVICE).expand(MAX_SEQLEN, 1, 8)
    cu = torch.tensor([0, MAX_SEQLEN], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"a query sequence of 536870912 rows"):
        flash_attn_varlen_func(x, x, x, cu, cu, MAX_SEQLEN, MAX_SEQLEN)
