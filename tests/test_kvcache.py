"""flash_attn_with_kvcache: the append writes exactly the new slots (rotated where asked) and nothing
else, the attention over each sequence's keys matches the float64 reference by the error rule of
every kernel test, through every cache path (contiguous, paged, cache_batch_idx, leftpad, rotary
both ways, splits from one to many), with NaN in every slot no sequence owns; bad input raises
before anything is written. The dense entry points with a short query take the same split kernel."""
import functools
import math

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from errors import assert_within_factor
from flashattn import flash_attn_func, flash_attn_with_kvcache
from flashattn.ops.reference import attention_standard
from flashattn.ops.triton import choice, decode
from flashattn.ops.variant import CAUSAL, PLAIN

BACKENDS = ["triton", "reference"]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16
HEADS, HEADS_K, HEAD_DIM = 4, 2, 40
# Cache slots per sequence (several of the split kernel's 64-key tiles), and the cached lengths
# before the call: an empty cache, a short one, one that ends mid-tile, a nearly full one.
CAPACITY = 1024 if HAS_CUDA else 224
SEQLENS = [0, 5, 131, CAPACITY - 9] if HAS_CUDA else [0, 5, 131, 200]
PAGE = 16

# name: (cache layout, options)
PATHS = {
    "append": ("contiguous", dict(causal=True)),
    "no-append": ("contiguous", dict(append=False)),
    "paged-16": ("paged", dict(causal=True)),
    "paged-32-window": ("paged32", dict(window_size=(37, 0))),
    "paged-128": ("paged128", dict(causal=True)),     # pages of whole key tiles: one table entry a tile
    "batch-idx": ("batch_idx", dict(causal=True)),
    "leftpad-rotary": ("contiguous", dict(leftpad=True, rotary=True, interleaved=False, causal=True)),
    "rotary-interleaved": ("contiguous", dict(rotary=True, interleaved=True, causal=True)),
    "rotary-not-causal": ("paged", dict(rotary=True, interleaved=False)),
    "softcap-alibi": ("contiguous", dict(softcap=4.0, alibi=True, causal=True)),
}


def _rotate64(x, cos, sin, positions, interleaved):
    """x (B, S, H, D) rotated in float64 at positions (B, S), written independently of the library."""
    x = x.double().clone()
    half = cos.shape[1]
    c = cos.double()[positions][:, :, None, :]
    s = sin.double()[positions][:, :, None, :]
    if interleaved:
        a, b = x[..., 0:2 * half:2].clone(), x[..., 1:2 * half:2].clone()
        x[..., 0:2 * half:2], x[..., 1:2 * half:2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :half].clone(), x[..., half:2 * half].clone()
        x[..., :half], x[..., half:2 * half] = a * c - b * s, a * s + b * c
    return x


class _Cache:
    """A cache of `layout` filled with NaN, with the first SEQLENS[b] slots of each sequence random."""

    def __init__(self, layout, batch, leftpad):
        self.layout, self.batch = layout, batch
        self.page = int(layout[len("paged"):] or PAGE) if layout.startswith("paged") else PAGE
        shape_k = (HEADS_K, HEAD_DIM)
        self.seqlens = torch.tensor(SEQLENS[:batch], dtype=torch.int32, device=DEVICE)
        self.leftpad = (self.seqlens // 3).to(torch.int32) if leftpad else None
        self.batch_idx = self.block_table = None
        if layout.startswith("paged"):
            blocks = -(-CAPACITY // self.page)
            pages = batch * blocks + 3
            order = torch.randperm(pages, device=DEVICE)[:batch * blocks]
            self.block_table = order.reshape(batch, blocks).to(torch.int32)
            self.k = torch.full((pages, self.page, *shape_k), float("nan"), dtype=DTYPE, device=DEVICE)
        elif layout == "batch_idx":
            self.batch_idx = torch.randperm(batch + 2, device=DEVICE)[:batch].to(torch.int32)
            self.k = torch.full((batch + 2, CAPACITY, *shape_k), float("nan"), dtype=DTYPE, device=DEVICE)
        else:
            self.k = torch.full((batch, CAPACITY, *shape_k), float("nan"), dtype=DTYPE, device=DEVICE)
        self.v = torch.full_like(self.k, float("nan"))
        for b in range(batch):
            n = SEQLENS[b]
            first = int(self.leftpad[b]) if self.leftpad is not None else 0
            entry, row = self.slots(b, first, n)
            self.k[entry, row] = torch.randn(n - first, *shape_k, dtype=DTYPE, device=DEVICE)
            self.v[entry, row] = torch.randn(n - first, *shape_k, dtype=DTYPE, device=DEVICE)

    def slots(self, b, start, stop):
        s = torch.arange(start, stop, device=DEVICE)
        if self.block_table is not None:
            return self.block_table[b, s // self.page].long(), s % self.page
        entry = int(self.batch_idx[b]) if self.batch_idx is not None else b
        return torch.full_like(s, entry), s

    def kwargs(self):
        return dict(cache_seqlens=self.seqlens, cache_leftpad=self.leftpad, cache_batch_idx=self.batch_idx,
                    block_table=self.block_table)


def _reference(q, cache_k, cache_v, cache, k_new, v_new, opts, scale, ref_dtype):
    """Out and lse of each sequence from its keys gathered by the test, computed in ref_dtype."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        first = int(cache.leftpad[b]) if cache.leftpad is not None else 0
        n = SEQLENS[b]
        entry, row = cache.slots(b, first, n)
        k_b, v_b, q_b = cache_k[entry, row][None], cache_v[entry, row][None], q[b:b + 1]
        if k_new is not None:
            k_b = torch.cat([k_b, k_new[b:b + 1]], 1)
            v_b = torch.cat([v_b, v_new[b:b + 1]], 1)
        kw = {key: opts[key] for key in ("causal", "window_size", "softcap") if key in opts}
        if opts.get("alibi"):
            kw["alibi_slopes"] = opts["slopes"][b:b + 1].to(ref_dtype)
        o, lse = attention_standard(q_b.to(ref_dtype), k_b.to(ref_dtype), v_b.to(ref_dtype), scale, **kw)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _call(path, backend, num_splits, seqlen_q, use_backend):
    use_backend(backend)
    torch.manual_seed(0)
    layout, opts = PATHS[path]
    opts = dict(opts)
    batch = len(SEQLENS)
    cache = _Cache(layout, batch, opts.pop("leftpad", False))
    append = opts.pop("append", True)
    q = torch.randn(batch, seqlen_q, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    k_new = torch.randn(batch, seqlen_q, HEADS_K, HEAD_DIM, dtype=DTYPE, device=DEVICE) if append else None
    v_new = torch.randn_like(k_new) if append else None
    kw = {key: opts[key] for key in ("causal", "window_size", "softcap") if key in opts}
    if opts.get("alibi"):
        opts["slopes"] = kw["alibi_slopes"] = torch.rand(batch, HEADS, device=DEVICE)
    if opts.get("rotary"):
        angle = torch.rand(CAPACITY, 12, device=DEVICE) * 2 * math.pi     # rotary_dim 24 of 40
        kw.update(rotary_cos=torch.cos(angle).to(DTYPE), rotary_sin=torch.sin(angle).to(DTYPE),
                  rotary_interleaved=opts["interleaved"])
    before_k, before_v = cache.k.clone(), cache.v.clone()
    out, lse = flash_attn_with_kvcache(q, cache.k, cache.v, k_new, v_new, **cache.kwargs(), **kw,
                                       num_splits=num_splits, return_softmax_lse=True)
    return cache, opts, kw, q, k_new, v_new, before_k, before_v, out, lse


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_paths_match_float64(backend, path, use_backend):
    seqlen_q = 3
    cache, opts, kw, q, k_new, v_new, before_k, before_v, out, lse = _call(path, backend, 0, seqlen_q, use_backend)
    scale = 1 / math.sqrt(HEAD_DIM)
    # What the append must have written: k rotated (in float64, rounded once) at position
    # seqlens - leftpad + t; q rotated likewise (+ i when causal or windowed, else all at seqlens - leftpad).
    start = cache.seqlens.long() - (cache.leftpad.long() if cache.leftpad is not None else 0)
    if opts.get("rotary"):
        steps = torch.arange(seqlen_q, device=DEVICE)
        every_row = "causal" in opts or "window_size" in opts
        cos, sin, inter = kw["rotary_cos"], kw["rotary_sin"], kw["rotary_interleaved"]
        k_new = _rotate64(k_new, cos, sin, start[:, None] + steps, inter).to(DTYPE)
        q = _rotate64(q, cos, sin, start[:, None] + (steps if every_row else 0 * steps), inter).to(DTYPE)
    written = torch.zeros(cache.k.shape[:2], dtype=torch.bool, device=DEVICE)
    if k_new is not None:
        for b in range(len(SEQLENS)):
            entry, row = cache.slots(b, SEQLENS[b], SEQLENS[b] + seqlen_q)
            written[entry, row] = True
            # One rounding of the fp32 rotation may differ from float64's by one unit.
            torch.testing.assert_close(cache.k[entry, row], k_new[b], atol=0, rtol=2 ** -9)
            assert torch.equal(cache.v[entry, row], v_new[b])
    untouched = ~written
    assert torch.equal(cache.k[untouched].view(torch.int16), before_k[untouched].view(torch.int16))
    assert torch.equal(cache.v[untouched].view(torch.int16), before_v[untouched].view(torch.int16))

    ref64 = _reference(q, before_k, before_v, cache, k_new, v_new, opts, scale, torch.float64)
    same = _reference(q, before_k, before_v, cache, k_new, v_new, opts, scale, DTYPE)
    assert_within_factor("out", out, same[0], ref64[0], DTYPE, HEAD_DIM)
    assert_within_factor("lse", lse, same[1], ref64[1], DTYPE, HEAD_DIM)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 64])
def test_splits_give_the_same_attention(num_splits, use_backend):
    """From one split to more splits than key tiles (capped there; splits past a short sequence's
    keys are empty and drop out of the combine)."""
    results = [_call("paged-16", "triton", n, 1, use_backend)[-2:] for n in (num_splits, 1)]
    (out, lse), (out1, lse1) = results
    torch.testing.assert_close(out, out1, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse, lse1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seqlen_q", [1, 7])
@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_queries(backend, seqlen_q, use_backend):
    """Several new tokens at once (speculative decoding, chunked prefill), causal per sequence."""
    cache, opts, kw, q, k_new, v_new, before_k, before_v, out, lse = _call("append", backend, 0, seqlen_q,
                                                                          use_backend)
    scale = 1 / math.sqrt(HEAD_DIM)
    ref64 = _reference(q, before_k, before_v, cache, k_new, v_new, opts, scale, torch.float64)
    same = _reference(q, before_k, before_v, cache, k_new, v_new, opts, scale, DTYPE)
    assert_within_factor("out", out, same[0], ref64[0], DTYPE, HEAD_DIM)
    assert_within_factor("lse", lse, same[1], ref64[1], DTYPE, HEAD_DIM)


@pytest.mark.parametrize("option", ["plain", "causal", "window-softcap-alibi"])
@pytest.mark.parametrize("seqlen_q", [1, 5])
def test_dense_short_query_takes_the_split_kernel(seqlen_q, option, use_backend):
    """flash_attn_func with a short query runs the split kernel (forward) and the dense backward."""
    use_backend("triton")
    torch.manual_seed(2)
    seqlen_k, head_dim = (3000 if HAS_CUDA else 150), 80
    q = torch.randn(2, seqlen_q, 8, head_dim, dtype=DTYPE, device=DEVICE)
    k = torch.randn(2, seqlen_k, 2, head_dim, dtype=DTYPE, device=DEVICE)
    v = torch.randn_like(k)
    kw = {"plain": {}, "causal": dict(causal=True),
          "window-softcap-alibi": dict(window_size=(70, 2), softcap=3.0,
                                       alibi_slopes=torch.rand(8, device=DEVICE))}[option]
    assert choice.kernel_for("fwd", q, k, v, CAUSAL, 0.1) == choice.SPLIT_KV
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse, _ = flash_attn_func(*leaves, **kw, return_attn_probs=True)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    scale = 1 / math.sqrt(head_dim)
    results = []
    for ref_dtype in (torch.float64, DTYPE):
        ref_kw = dict(kw)
        if "alibi_slopes" in ref_kw:
            ref_kw["alibi_slopes"] = ref_kw["alibi_slopes"].to(ref_dtype)
        ref_leaves = [x.to(ref_dtype).requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = attention_standard(*ref_leaves, scale, **ref_kw)
        results.append((ref_out, ref_lse, *torch.autograd.grad(ref_out, ref_leaves, do.to(ref_dtype))))
    for name, ours, same, r64 in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), results[1], results[0]):
        assert_within_factor(name, ours, same, r64, DTYPE, head_dim)


def test_split_choice_and_heuristic():
    q = torch.empty(1, 1, 32, 128)
    k = torch.empty(1, 4096, 8, 128)
    assert choice.kernel_for("fwd", q, k, k, PLAIN, 0.1) == choice.SPLIT_KV
    assert choice.kernel_for("fwd", torch.empty(1, 17, 32, 128), k, k, PLAIN, 0.1) != choice.SPLIT_KV
    assert choice.kernel_for("bwd", q, k, k, PLAIN, 0.1) != choice.SPLIT_KV
    cpu = torch.device("cpu")         # the interpreter's stand-in: 8 SMs
    # 2 programs resident per SM: 16 slots; 15 programs (1.8 per SM) reach the bandwidth.
    splits = functools.partial(decode.num_splits_for, resident=2, device=cpu)
    assert splits(programs=64, key_tiles=1000) == 1      # four whole waves already
    assert splits(programs=1, key_tiles=1000) == 15      # one wave that reaches the bandwidth
    assert splits(programs=6, key_tiles=1000) == 8       # 48 programs: three whole waves
    assert splits(programs=20, key_tiles=1000) == 4      # 80: five, not 16 and a short second
    assert splits(programs=1, key_tiles=4) == 4          # one tile a split at the least
    # Never an empty split: ceil(key_tiles / ceil(key_tiles / splits)) == splits.
    for programs in (1, 3, 7, 40):
        for key_tiles in (1, 2, 9, 100, 1000):
            n = splits(programs=programs, key_tiles=key_tiles)
            assert 1 <= n <= min(key_tiles, decode.MAX_SPLITS)
            assert -(-key_tiles // -(-key_tiles // n)) == n


def test_plan_tiles_and_splits():
    """decode.plan on the interpreter's stand-in (8 SMs): few programs split over 64-key tiles with two
    in flight; a batch that fills the GPU runs unsplit with three; many waves of programs, and paged
    caches, take the 128-key tiles; head dims above 128 take 32 keys."""
    cpu = torch.device("cpu")

    def plan(batch, nheads_k=1, rows=4, capacity=4096, head_dim=128, paged=False, num_splits=0):
        t, splits = decode.plan(batch, nheads_k, rows, capacity, head_dim, 2, paged, num_splits, cpu)
        return (t.block_n, t.num_stages), splits

    shape, splits = plan(1)
    assert shape == (64, 3) and splits > 1
    assert plan(8) == ((64, 4), 1)                          # 8 programs: one an SM
    assert plan(8, nheads_k=8) == ((128, 2), 1)             # 64 programs, 8 an SM: many waves
    assert plan(8, num_splits=3) == ((64, 3), 3)            # the caller's count, two tiles in flight
    assert plan(1, paged=True)[0] == (128, 2) and plan(8, paged=True)[0] == (128, 2)
    assert plan(1, head_dim=256)[0] == (32, 2)
    assert plan(1, capacity=64, num_splits=40)[1] == 1      # no more splits than key tiles


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error, and the cache bit-identical.
# ---------------------------------------------------------------------------------------------------

def _bad_cases():
    b, n = 2, 64
    int32 = dict(dtype=torch.int32, device=DEVICE)

    def base():
        return dict(q=torch.randn(b, 1, 4, 16, dtype=DTYPE, device=DEVICE),
                    k_cache=torch.randn(b, n, 2, 16, dtype=DTYPE, device=DEVICE),
                    v_cache=torch.randn(b, n, 2, 16, dtype=DTYPE, device=DEVICE),
                    k=torch.randn(b, 1, 2, 16, dtype=DTYPE, device=DEVICE),
                    v=torch.randn(b, 1, 2, 16, dtype=DTYPE, device=DEVICE),
                    cache_seqlens=torch.tensor([3, 10], **int32))

    def paged(page=16, table=((0, 1), (2, 3))):
        kw = base()
        kw["k_cache"] = torch.randn(4, page, 2, 16, dtype=DTYPE, device=DEVICE)
        kw["v_cache"] = torch.randn(4, page, 2, 16, dtype=DTYPE, device=DEVICE)
        kw["block_table"] = torch.tensor(table, **int32)
        return kw

    def with_(kw, **changes):
        kw.update(changes)
        return kw

    return {
        "new tokens past the cache": (with_(base(), cache_seqlens=torch.tensor([3, n], **int32)), "exceeds"),
        "negative cache_seqlens": (with_(base(), cache_seqlens=torch.tensor([-1, 3], **int32)), "negative"),
        "cache_seqlens int64": (with_(base(), cache_seqlens=torch.tensor([3, 4])), "int32"),
        "cache_seqlens wrong length": (with_(base(), cache_seqlens=torch.tensor([3], **int32)), "shape"),
        "leftpad past the length": (with_(base(), cache_leftpad=torch.tensor([4, 0], **int32)), "cache_leftpad"),
        "batch index out of range": (with_(base(), cache_batch_idx=torch.tensor([0, 2], **int32)),
                                     "cache_batch_idx"),
        "page outside the pool": (paged(table=((0, 1), (4, 3))), "block_table"),
        "negative page": (paged(table=((-1, 1), (2, 3))), "block_table"),
        "page size not a multiple of 16": (paged(page=24), "multiple of 16"),
        "block_table int64": (with_(paged(), block_table=torch.zeros(b, 2, dtype=torch.long, device=DEVICE)),
                              "int32"),
        "cache dtype": (with_(base(), v_cache=torch.randn(b, n, 2, 16, device=DEVICE)), "dtype"),
        "cache not contiguous in its last dim": (
            with_(base(), k_cache=torch.randn(b, n, 2, 32, dtype=DTYPE, device=DEVICE)[..., ::2]), "contiguous"),
        "k without v": (with_(base(), v=None), "both k and v"),
        "k of the wrong shape": (with_(base(), k=torch.randn(b, 1, 4, 16, dtype=DTYPE, device=DEVICE)), "shape"),
        "rotary without k": (with_(base(), k=None, v=None, rotary_cos=torch.ones(n, 4, device=DEVICE),
                                   rotary_sin=torch.ones(n, 4, device=DEVICE)), "rotary"),
        "rotary table too short": (with_(base(), rotary_cos=torch.ones(n - 1, 4, device=DEVICE),
                                         rotary_sin=torch.ones(n - 1, 4, device=DEVICE)), "positions"),
        "rotary dim past the head dim": (with_(base(), rotary_cos=torch.ones(n, 9, device=DEVICE),
                                               rotary_sin=torch.ones(n, 9, device=DEVICE)), "rotary_dim"),
        "negative num_splits": (with_(base(), num_splits=-1), "num_splits"),
        "GQA ratio": (with_(base(), q=torch.randn(b, 1, 3, 16, dtype=DTYPE, device=DEVICE)), "multiple"),
        "batch mismatch": (with_(base(), q=torch.randn(b + 1, 1, 4, 16, dtype=DTYPE, device=DEVICE)),
                           "batch"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_and_writes_nothing(backend, case, use_backend):
    use_backend(backend)
    kw, message = _bad_cases()[case]
    before = [kw[name].clone() for name in ("k_cache", "v_cache")]
    with pytest.raises((ValueError, TypeError), match=message):
        flash_attn_with_kvcache(**kw)
    for name, old in zip(("k_cache", "v_cache"), before):
        assert torch.equal(kw[name].contiguous().view(torch.uint8), old.contiguous().view(torch.uint8)), \
            f"{name} changed"


def test_more_splits_than_one_combine_chunk(use_backend):
    """The combine reads the splits CHUNK at a time and merges the chunks online: 40 splits of one key
    tile each, one of them past a short sequence (empty), against one split."""
    use_backend("triton")
    torch.manual_seed(3)
    q = torch.randn(2, 1, 4, 32, dtype=DTYPE, device=DEVICE)
    k = torch.randn(2, 40 * decode.tiles(4, 32).block_n, 2, 32, dtype=DTYPE, device=DEVICE)
    v = torch.randn_like(k)
    out, lse = decode.forward(q, k, v, 0.2, PLAIN, num_splits=40)
    out1, lse1 = decode.forward(q, k, v, 0.2, PLAIN, num_splits=1)
    torch.testing.assert_close(out, out1, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse, lse1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_length_for_every_sequence(backend, layout, use_backend):
    """cache_seqlens as an int (or None: the cache is full) is a launch argument, not a tensor: the same
    result and the same cache as the tensor of that length."""
    use_backend(backend)
    batch, n = 2, 100
    results = []
    for lengths in (n, torch.full((batch,), n, dtype=torch.int32, device=DEVICE)):
        torch.manual_seed(4)
        cache = _Cache("paged" if layout == "paged" else "contiguous", batch, False)
        cache.k.normal_()
        cache.v.normal_()
        q = torch.randn(batch, 2, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        k, v = (torch.randn(batch, 2, HEADS_K, HEAD_DIM, dtype=DTYPE, device=DEVICE) for _ in range(2))
        kw = cache.kwargs()
        kw["cache_seqlens"] = lengths
        out = flash_attn_with_kvcache(q, cache.k, cache.v, k, v, **kw, causal=True)
        results.append((out, cache.k.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1].nan_to_num(), results[1][1].nan_to_num())
    full = flash_attn_with_kvcache(q, cache.k[:, :8] if layout == "contiguous" else cache.k,
                                   cache.v[:, :8] if layout == "contiguous" else cache.v,
                                   block_table=cache.block_table, cache_seqlens=None if layout == "contiguous" else 8)
    assert full.shape == q.shape
    with pytest.raises(ValueError, match="outside the cache"):
        flash_attn_with_kvcache(q, cache.k, cache.v, k, v, cache_seqlens=CAPACITY - 1,
                                block_table=cache.block_table)


@pytest.mark.parametrize("layout,leftpad", [("paged", True), ("paged32", False)])
def test_offset_widths_give_the_same_attention(layout, leftpad, use_backend, monkeypatch):
    """The paged kernel's row offsets 32-bit (a pool of at most 2^31 elements) or 64-bit: the same
    cache rows, bit for bit the same result."""
    use_backend("triton")
    results = []
    for narrow in (True, False):
        monkeypatch.setattr(decode, "pool32", lambda page_size, k, v, narrow=narrow: narrow)
        torch.manual_seed(5)
        cache = _Cache(layout, len(SEQLENS), leftpad)
        q = torch.randn(len(SEQLENS), 1, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        results.append(flash_attn_with_kvcache(q, cache.k, cache.v, **cache.kwargs(), num_splits=2,
                                               return_softmax_lse=True))
    assert torch.equal(results[1][0], results[0][0]) and torch.equal(results[1][1], results[0][1])


def test_pool32():
    """32-bit offsets while the pool's largest offset is below 2^31 (a pool of exactly 2^31 elements
    still), else 64 bits; never for a contiguous cache (page_size 0)."""
    def pool(pages, page=16, heads=8, dim=128):
        return torch.empty(pages, page, heads, dim, device="meta")
    exact = pool(2 ** 31 // (16 * 8 * 128))
    assert decode.pool32(16, exact, exact)
    assert not decode.pool32(16, exact, pool(exact.shape[0] + 1))
    assert not decode.pool32(16, pool(2 * exact.shape[0])[::2], exact)   # as many pages, spread past 2^31
    assert not decode.pool32(0, exact, exact)
