"""No size limit short of the GPU's memory: tensors past 2^31 elements (the kernels' bases are 64-bit),
dense and packed, forward and backward, and KV caches contiguous and paged, against float32 math on
sampled rows.

Every tensor here has 2^20 + 2^14 rows of 16 x 128 elements, 2^31 + 2^25 elements: each kernel's
offsets pass 2^31 in each input and output. A float32 reference over all keys costs as much as the
call itself for each row, so it is computed for sampled query rows (O, LSE, dQ) and sampled key rows
(dK, dV, whose P needs every query row's LSE: there the kernel's own, itself checked at the sampled
rows), spread over each sequence and past its 2^31-element boundary; delta = rowsum(dO * O) comes from
the kernel's O, as in the kernels.
GPU only (`pytest -m gpu`), skipped where the GPU lacks the memory (about 45 GiB).
"""
import fcntl
import math

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from flashattn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

ROWS = 2 ** 20 + 2 ** 14
NHEADS, HEAD_DIM = 16, 128
NEEDS = 48 * 2 ** 30      # q, k, v, O, dO, dQ, dK, dV of 8.5 GB in bf16 and the one-pass backward's fp32 dQ
SCALE = 1.0 / math.sqrt(HEAD_DIM)
# Packed: an empty sequence, one row, 17 rows, long ones, and one that starts past 2^20 rows (its
# offsets past 2^31 elements from the first row on).
PACKED = [262_144, 1, 17, 0, 131_071, 524_288, 140_000, 7_439]
assert sum(PACKED) == ROWS


def _enough_memory() -> bool:
    return HAS_CUDA and torch.cuda.mem_get_info()[0] >= NEEDS


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _enough_memory(),
                                                  reason=f"needs a CUDA GPU with {NEEDS >> 30} GiB free")]


def _allowed(i: torch.Tensor, j: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool,
             window: tuple[int, int]) -> torch.Tensor:
    """[len(i), len(j)]: may query i see key j (bottom-right aligned, flashattn/ops/variant.py)."""
    diagonal = i[:, None] + (seqlen_k - seqlen_q)
    allowed = torch.ones(len(i), len(j), dtype=torch.bool, device=i.device)
    left, right = window[0], 0 if causal else window[1]
    if left >= 0:
        allowed &= j[None, :] >= diagonal - left
    if right >= 0:
        allowed &= j[None, :] <= diagonal + right
    return allowed


def _check_rows(q, k, v, do, out, lse, dq, rows, causal, window):
    """O, LSE and dQ (unless None) of the query rows `rows` of one sequence (q, do, out, dq (Sq, H, D),
    lse (H, Sq), k, v (Sk, Hk, D)) against float32 math over all its keys; delta = rowsum(dO * O) from
    the kernel's O, as the kernels take it (from O in bf16, delta's rounding would dominate dQ where a
    row sees few keys and P is nearly one-hot)."""
    group = q.shape[1] // k.shape[1]
    allowed = _allowed(rows, torch.arange(k.shape[0], device=DEVICE), q.shape[0], k.shape[0], causal, window)
    for h in range(q.shape[1]):
        kh, vh = k[:, h // group].float(), v[:, h // group].float()
        s = (q[rows, h].float() @ kh.T * SCALE).masked_fill(~allowed, float("-inf"))    # [rows, Sk]
        ref_lse = torch.logsumexp(s, -1)
        p = torch.exp(s - ref_lse[:, None]).nan_to_num(0.0)
        ref_out = p @ vh
        ds, noise = _ds(p, do[rows, h].float(), vh, out[rows, h].float())
        torch.testing.assert_close(lse[h, rows], ref_lse, atol=1e-3, rtol=0)
        _assert_rows_close("out", out[rows, h], ref_out)
        if dq is not None:
            _assert_rows_close("dq", dq[rows, h], ds @ kh * SCALE, noise @ kh.abs() * SCALE)


def _check_keys(q, k, v, do, out, lse, dk, dv, keys, causal, window):
    """dK and dV of the key rows `keys` of one sequence against float32 math over all its query rows,
    P normalised by the kernel's LSE and delta = rowsum(dO * O) from the kernel's O."""
    group = q.shape[1] // k.shape[1]
    allowed = _allowed(torch.arange(q.shape[0], device=DEVICE), keys, q.shape[0], k.shape[0], causal, window)
    for hk in range(k.shape[1]):
        ks, vs = k[keys, hk].float(), v[keys, hk].float()
        ref_dk = ref_dv = floor_dk = 0.0
        for h in range(hk * group, (hk + 1) * group):
            qh, doh = q[:, h].float(), do[:, h].float()
            s = (qh @ ks.T * SCALE).masked_fill(~allowed, float("-inf"))                  # [Sq, keys]
            p = torch.exp(s - lse[h][:, None])
            ref_dv = ref_dv + p.T @ doh
            ds, noise = _ds(p, doh, vs, out[:, h].float())
            ref_dk = ref_dk + ds.T @ qh * SCALE
            floor_dk = floor_dk + noise.T @ qh.abs() * SCALE
        _assert_rows_close("dk", dk[keys, hk], ref_dk, floor_dk)
        _assert_rows_close("dv", dv[keys, hk], ref_dv)


def _ds(p, do, v, out):
    """dS = P (dO V^T - delta) over float32 math, and per element the rounding that the kernel's dS and
    this one both carry where the difference cancels (P nearly one-hot: a row that sees one key, a key
    of a one-row sequence): 16 float32 ulps of the two terms' magnitudes."""
    ds = p * (do @ v.T - (do * out).sum(-1, keepdim=True))
    noise = p * (do.abs() @ v.abs().T + (do * out).abs().sum(-1, keepdim=True)) * 2.0 ** -19
    return ds, noise


def _assert_rows_close(name, ours, ref, floor=0.0):
    """Each row within 3% of its largest reference element: bf16 rounding of the output and of P
    stays far below that, and a row read or written at a wrong offset lands far above it. `floor`
    (ref's shape): per element, rounding that the reference shares and 3% of the row does not cover."""
    err = ((ours.float() - ref).abs() - floor).amax(-1)
    bound = 0.03 * ref.abs().amax(-1) + 1e-6
    assert torch.isfinite(ours).all() and bool((err <= bound).all()), (name, err.tolist(), bound.tolist())


def _samples(n: int, generator) -> torch.Tensor:
    """Rows of a sequence of n: the first, the last, the middle, those about the 2^31-element
    boundary (2^20 rows of 2^11 elements), and random ones."""
    fixed = [0, 1, 17, n // 2, 2 ** 20 - 1, 2 ** 20, n - 2, n - 1]
    picked = torch.randint(0, n, (8,), generator=generator).tolist()
    return torch.tensor(sorted({r for r in fixed + picked if 0 <= r < n}), device=DEVICE)


def _inputs(shape):
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
    return q, k, v, do


@pytest.fixture(autouse=True)
def _one_at_a_time(tmp_path_factory):
    """Each test needs NEEDS bytes of the GPU: under pytest-xdist's workers, which share one GPU, the
    tests of this file take turns (an exclusive lock on a file all workers see), and one that finds
    too little memory free when its turn comes is skipped, not run out of memory."""
    lock = tmp_path_factory.getbasetemp().parent / "flashattn-test-large.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            free = torch.cuda.mem_get_info()[0]
            if free < NEEDS:
                pytest.skip(f"needs {NEEDS >> 30} GiB of GPU memory free, {free >> 30} GiB are")
            yield
        finally:
            torch.cuda.empty_cache()
            fcntl.flock(held, fcntl.LOCK_UN)


@pytest.fixture
def lse_without_probs(monkeypatch):
    """return_attn_probs=True gives the LSE, and probabilities of O(N^2): those are not computed (the
    PyTorch path's attention_probs answers None)."""
    from flashattn.ops import reference

    monkeypatch.setattr(reference, "attention_probs", lambda *args, **kwargs: None)


@pytest.mark.parametrize("kernels", ["tables", "window", "warp-specialized"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dense_past_2_31_elements(causal, kernels, monkeypatch, lse_without_probs):
    """flash_attn_func on (1, 2^20 + 2^14, 16, 128) bf16: the kernels sm_90's tables choose (the
    ping-pong forward and the one-pass backward), the portable ones (a window (512, 512): linear
    cost), and the warp-specialized forward (forced; forward only)."""
    from flashattn.ops.triton import configs

    window = (512, 512) if kernels == "window" else (-1, -1)
    if kernels == "warp-specialized":
        monkeypatch.setattr(configs, "ping_pong_forward", lambda *args, **kwargs: False)
        monkeypatch.setattr(configs, "warp_specialized", lambda *args, **kwargs: True)
    q, k, v, do = _inputs((1, ROWS, NHEADS, HEAD_DIM))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    backward = kernels != "warp-specialized"
    with torch.set_grad_enabled(backward):
        out, lse, _ = flash_attn_func(*leaves, causal=causal, window_size=window, return_attn_probs=True)
    dq, dk, dv = (x[0] for x in torch.autograd.grad(out, leaves, do)) if backward else (None,) * 3
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        seq = (q[0], k[0], v[0], do[0], out[0], lse[0])
        _check_rows(*seq, dq, _samples(ROWS, generator), causal, window)
        if backward:
            _check_keys(*seq, dk, dv, _samples(ROWS, generator), causal, window)


@pytest.mark.parametrize("kernels", ["tables", "window"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_past_2_31_elements(causal, kernels, lse_without_probs):
    """flash_attn_varlen_func on 2^20 + 2^14 tokens x 16 heads x 128 (bf16) in sequences of 0 to 2^19
    tokens, the last ones starting past 2^31 elements: the Hopper kernels' packed builds (sm_90's
    tables at the longest sequence), and the portable ones (a window (512, 512))."""
    window = (512, 512) if kernels == "window" else (-1, -1)
    q, k, v, do = _inputs((ROWS, NHEADS, HEAD_DIM))
    cu = torch.tensor([0, *torch.tensor(PACKED).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out, lse, _ = flash_attn_varlen_func(*leaves, cu, cu, max(PACKED), max(PACKED), causal=causal,
                                         window_size=window, return_attn_probs=True)
    dq, dk, dv = torch.autograd.grad(out, leaves, do)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        starts = cu.tolist()
        for b, n in enumerate(PACKED):
            if n == 0:
                continue
            r = slice(starts[b], starts[b + 1])
            seq = (q[r], k[r], v[r], do[r], out[r], lse[:, r])
            _check_rows(*seq, dq[r], _samples(n, generator), causal, window)
            _check_keys(*seq, dk[r], dv[r], _samples(n, generator), causal, window)


@pytest.mark.parametrize("layout", ["contiguous", "paged", "paged-gaps"])
def test_kv_cache_past_2_31_elements(layout):
    """flash_attn_with_kvcache appending one token and decoding (32 query heads over 16 KV heads, 128,
    bf16) on a cache of 2^20 + 2^14 rows of 16 x 128 elements: contiguous (4 sequences), a pool of
    16-slot pages in random order, and the same pool with a gap after each page (the paged kernel's
    64-bit offsets, decode.pool32). Appended slots and keys past 2^31 elements; against float32 math
    over each sequence's keys, and every slot but the appended ones bit-identical after the call."""
    batch, page = 4, 16
    seqlens = [ROWS // batch - 1, ROWS // batch * 3 // 8, 7, ROWS // batch - 1]   # the last: past 2^31
    torch.manual_seed(0)
    table = None
    if layout == "contiguous":
        k_cache, v_cache = (torch.randn(batch, ROWS // batch, NHEADS, HEAD_DIM, device=DEVICE,
                                        dtype=torch.bfloat16) for _ in range(2))
    else:
        pages = ROWS // page
        slots = page + (layout == "paged-gaps")
        k_cache, v_cache = (torch.randn(pages, slots, NHEADS, HEAD_DIM, device=DEVICE,
                                        dtype=torch.bfloat16)[:, :page] for _ in range(2))
        table = torch.randperm(pages, device=DEVICE, dtype=torch.int32).view(batch, -1)
    q = torch.randn(batch, 1, 2 * NHEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(batch, 1, NHEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
                    for _ in range(2))
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths,
                                       block_table=table, return_softmax_lse=True)

    def rows(cache, b):
        """(slots, KV heads, D): sequence b's slots in order."""
        return cache[b] if table is None else cache[table[b].long()].flatten(0, 1)

    with torch.no_grad():
        for b, n in enumerate(seqlens):
            k_seq, v_seq = rows(k_cache, b), rows(v_cache, b)
            assert torch.equal(k_seq[n], k_new[b, 0]) and torch.equal(v_seq[n], v_new[b, 0])
            # Nothing else written: put the old slot back and compare all of the cache below.
            k_seq_before, v_seq_before = rows(k_before, b), rows(v_before, b)
            k_seq_before[n], v_seq_before[n] = k_new[b, 0], v_new[b, 0]
            if table is not None:
                k_before[table[b].long()] = k_seq_before.view(-1, page, NHEADS, HEAD_DIM)
                v_before[table[b].long()] = v_seq_before.view(-1, page, NHEADS, HEAD_DIM)
            for hk in range(NHEADS):
                kh, vh = k_seq[: n + 1, hk].float(), v_seq[: n + 1, hk].float()      # [n + 1, D]
                s = q[b, 0, 2 * hk: 2 * hk + 2].float() @ kh.T * SCALE              # [2, n + 1]
                ref_lse = torch.logsumexp(s, -1)
                torch.testing.assert_close(lse[b, 2 * hk: 2 * hk + 2, 0], ref_lse, atol=1e-3, rtol=0)
                _assert_rows_close("out", out[b, 0, 2 * hk: 2 * hk + 2], torch.softmax(s, -1) @ vh)
        assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)
