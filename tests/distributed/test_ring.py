"""Ring attention over gloo process groups on the CPU (flashattn.distributed): every rank's output, lse
and gradients equal the single-process flash_attn_func (flash_attn_varlen_func) on the whole sequence,
sliced by shard_sequence, for world sizes 2 and 4 and every option the ring takes.

One process group per world size runs every case (spawning costs seconds, a case milliseconds): the
workers save their slices, the test process computes the references and compares, case by case.
Each group rendezvouses through a file in a temporary directory (no port to collide on). On a GPU
machine with several GPUs the same cases run over NCCL with the Triton kernels (test_nccl_triton).
"""
from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from errors import assert_within_factor, max_error
from flashattn import flash_attn_func, flash_attn_varlen_func
from flashattn.distributed import (RingFlashAttention, layout, positions, ring_attn_func, ring_attn_varlen_func,
                                   shard_sequence)
from flashattn.nn import FlashAttention


@dataclass(frozen=True)
class Case:
    name: str
    seqlen: int = 13                  # dense: seqlen; packed: the sequences' lengths below
    dtype: torch.dtype = torch.float64
    batch: int = 2
    nheads: int = 4
    nheads_k: int = 2
    headdim: int = 8
    opts: dict = field(default_factory=dict)
    packed: tuple[int, ...] = ()      # lengths of the packed sequences (varlen), else dense
    lse_grad: bool = False            # also return the lse and differentiate through it


CASES = [
    Case("plain"),
    Case("causal", opts=dict(causal=True)),
    Case("window", opts=dict(window_size=(3, 2))),
    Case("window-left", opts=dict(window_size=(5, -1))),
    Case("window-right", opts=dict(window_size=(-1, 1))),
    Case("causal-window-softcap", opts=dict(causal=True, window_size=(4, 0), softcap=2.0)),
    Case("mqa-causal", nheads_k=1, seqlen=16, opts=dict(causal=True, softmax_scale=0.3)),
    Case("mha-deterministic", nheads_k=4, seqlen=17, opts=dict(deterministic=True)),
    Case("short", seqlen=3, opts=dict(causal=True)),          # fewer rows than chunks: empty slices
    Case("lse-grad", opts=dict(causal=True, window_size=(2, 0)), lse_grad=True),
    Case("fp32-causal", dtype=torch.float32, seqlen=24, opts=dict(causal=True)),
    Case("fp32-window", dtype=torch.float32, seqlen=19, opts=dict(window_size=(6, 3), softcap=5.0)),
    Case("varlen", packed=(5, 9, 1, 6)),
    Case("varlen-causal", packed=(5, 9, 1, 6), opts=dict(causal=True)),
    Case("varlen-window", packed=(11, 3, 7), opts=dict(causal=True, window_size=(3, 0), softcap=3.0)),
    Case("varlen-long", packed=(2, 20), opts=dict(window_size=(4, 4))),
    Case("varlen-fp32", dtype=torch.float32, packed=(8, 13, 4), opts=dict(causal=True)),
]
DROPOUT = dict(causal=True, window_size=(6, 0), dropout_p=0.3)


def _inputs(case: Case, index: int):
    """The full (unsharded) q, k, v and dout of a case, the same in every process."""
    g = torch.Generator().manual_seed(1000 + index)
    total = sum(case.packed) if case.packed else case.seqlen
    lead = (total,) if case.packed else (case.batch, total)
    q, k, v, dout = (torch.randn(*lead, h, case.headdim, generator=g, dtype=torch.float64).to(case.dtype)
                     for h in (case.nheads, case.nheads_k, case.nheads_k, case.nheads))
    dlse = torch.randn(*(lead[:-1]), case.nheads, total, generator=g, dtype=torch.float64)
    return q, k, v, dout, dlse


def _cu(case: Case) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(case.packed).cumsum(0).tolist()], dtype=torch.int32)


def _ring_case(case: Case, index: int, world: int, rank: int, device: torch.device) -> dict:
    dim = 0 if case.packed else 1
    q, k, v, dout, dlse = _inputs(case, index)
    shard = lambda x, d=dim: shard_sequence(x, world, rank, dim=d).to(device).requires_grad_()
    ql, kl, vl = shard(q), shard(k), shard(v)
    if case.packed:
        out, lse = ring_attn_varlen_func(ql, kl, vl, _cu(case).to(device), max(case.packed), return_lse=True,
                                         **case.opts)
    else:
        out, lse = ring_attn_func(ql, kl, vl, return_lse=True, **case.opts)
    loss = (out * shard(dout).to(out.dtype)).sum()
    if case.lse_grad:
        lse_dim = 1 if case.packed else 2
        loss = loss + (torch.where(torch.isinf(lse), 0, lse) * shard(dlse, lse_dim).to(lse.dtype)).sum()
    loss.backward()
    return {name: x.detach().cpu() for name, x in
            dict(out=out, lse=lse, dq=ql.grad, dk=kl.grad, dv=vl.grad).items()}


def _module_case(world: int, rank: int) -> dict:
    """RingFlashAttention with FlashAttention's weights: its output slice, the input's gradient and the
    parameters' gradients summed over the ranks."""
    torch.manual_seed(5)
    layer = RingFlashAttention(32, 4, causal=True, num_kv_heads=2, rotary=True, dtype=torch.float64)
    x, dout = (torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
               for s in (1, 2))
    xl = shard_sequence(x, world, rank).requires_grad_()
    out = layer(xl)
    (out * shard_sequence(dout, world, rank)).sum().backward()
    for p in layer.parameters():
        dist.all_reduce(p.grad)
    return dict(out=out.detach(), dx=xl.grad, grads={n: p.grad for n, p in layer.named_parameters()})


def _dropout_case(world: int, rank: int) -> dict:
    """Dropout: the fraction kept, and the gradients against a central difference of the loss (the same
    keep mask in every forward: torch.manual_seed before each call)."""
    g = torch.Generator().manual_seed(7)
    batch, seqlen, nheads, headdim = 2, 40, 4, 8
    # q = 0: every allowed key weighs the same, and v = 1, so out * (1 - p) * (keys seen) counts the kept.
    zeros = torch.zeros(batch, seqlen, nheads, headdim, dtype=torch.float64)
    torch.manual_seed(11)
    out = ring_attn_func(shard_sequence(zeros, world, rank), shard_sequence(zeros, world, rank),
                         shard_sequence(torch.ones_like(zeros), world, rank), **DROPOUT)
    pos = torch.tensor(positions(seqlen, world, rank))
    seen = torch.clamp(pos + 1, max=DROPOUT["window_size"][0] + 1).to(torch.float64)   # keys each row sees
    kept = (out[..., 0] * (1 - DROPOUT["dropout_p"]) * seen[None, :, None]).sum()
    stats = torch.stack([kept, seen.sum() * batch * nheads])
    dist.all_reduce(stats)

    q, k, v, dout = (torch.randn(batch, seqlen, nheads, headdim, generator=g, dtype=torch.float64) for _ in range(4))
    direction = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (q, k, v)]
    local = [shard_sequence(x, world, rank) for x in (q, k, v, dout, *direction)]
    ql, kl, vl = (x.clone().requires_grad_() for x in local[:3])

    def loss(eps: float, grad: bool = False):
        torch.manual_seed(3)
        args = [x + eps * d for x, d in zip((ql, kl, vl), local[4:])] if eps else (ql, kl, vl)
        return (ring_attn_func(*args, **DROPOUT) * local[3]).sum()

    loss(0.0).backward()
    eps = 1e-5
    with torch.no_grad():
        central = (loss(eps) - loss(-eps)) / (2 * eps)
    directional = sum((x.grad * d).sum() for x, d in zip((ql, kl, vl), local[4:]))
    sums = torch.stack([central, directional])
    dist.all_reduce(sums)
    return dict(kept=stats[0].item(), draws=stats[1].item(), central=sums[0].item(), directional=sums[1].item())


def _bad_calls(world: int, rank: int) -> dict:
    """Calls every rank makes wrongly in the same way: each must raise, on every rank, with no hang."""
    messages = {}
    # Lengths no zigzag cut gives (a layout cut otherwise with the same lengths cannot be told apart).
    x = torch.randn(1, 8 if rank == 0 else 5, 2, 4, dtype=torch.float64)
    try:
        ring_attn_func(x, x, x)
    except ValueError as e:
        messages["lengths"] = str(e)
    try:
        heads = 2 if rank == 0 else 1                             # ranks disagree on the heads
        y = shard_sequence(torch.randn(1, 8, heads, 4, dtype=torch.float64), world, rank)
        ring_attn_func(y, y, y)
    except ValueError as e:
        messages["disagree"] = str(e)
    return messages


def _worker(rank: int, world: int, store: str, out_dir: str, backend: str, names: list[str]) -> None:
    """One rank: the cases `names` (and, on the PyTorch path, dropout, the layer and the bad calls);
    NCCL on this rank's GPU when `backend` is triton and CUDA is there, gloo on the CPU otherwise."""
    os.environ["FLASHATTN_BACKEND"] = backend
    torch.set_num_threads(1)
    nccl = backend == "triton" and torch.cuda.is_available()
    if nccl:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    dist.init_process_group("nccl" if nccl else "gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {case.name: _ring_case(case, i, world, rank, device)
                   for i, case in enumerate(CASES) if case.name in names}
        if backend == "reference":
            results["dropout"] = _dropout_case(world, rank)
            results["module"] = _module_case(world, rank)
            results["bad"] = _bad_calls(world, rank)
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, backend: str = "reference", names: list[str] | None = None) -> list[dict]:
    names = [c.name for c in CASES] if names is None else names
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), tmp, backend, names), nprocs=world)
        return [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def ring_results(request):
    return request.param, _spawn(request.param)


def _references(case: Case, index: int) -> tuple[dict, dict]:
    """flash_attn_func (or the varlen form) on the whole sequence: in float64, and in the case's dtype."""
    q, k, v, dout, dlse = _inputs(case, index)
    results = []
    for dtype in (torch.float64, case.dtype):
        leaves = [x.to(dtype, copy=True).requires_grad_() for x in (q, k, v)]
        if case.packed:
            cu = _cu(case)
            out, lse, _ = flash_attn_varlen_func(*leaves, cu, cu, max(case.packed), max(case.packed),
                                                 return_attn_probs=True, **case.opts)
        else:
            out, lse, _ = flash_attn_func(*leaves, return_attn_probs=True, **case.opts)
        loss = (out * dout.to(dtype)).sum()
        if case.lse_grad:
            loss = loss + (torch.where(torch.isinf(lse), 0, lse) * dlse.to(lse.dtype)).sum()
        loss.backward()
        results.append(dict(out=out.detach(), lse=lse.detach(), dq=leaves[0].grad, dk=leaves[1].grad,
                            dv=leaves[2].grad))
    return results[0], results[1]


def _compare(case: Case, index: int, world: int, per_rank: list[dict]) -> None:
    ref64, same = _references(case, index)
    for rank, results in enumerate(per_rank):
        ours = results[case.name]
        for name in ("out", "lse", "dq", "dk", "dv"):
            dim = (0 if case.packed else 1) if name != "lse" else (1 if case.packed else 2)
            cut = lambda x: shard_sequence(x, world, rank, dim=dim)
            if name == "lse":
                assert max_error(ours[name], cut(ref64[name])) <= (1e-5 if case.dtype == torch.float32 else 1e-12)
            else:
                assert_within_factor(name, ours[name], cut(same[name]), cut(ref64[name]), case.dtype, case.headdim)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_ring_matches_single_process(ring_results, use_backend, index):
    use_backend("reference")
    world, per_rank = ring_results
    _compare(CASES[index], index, world, per_rank)


TRITON_CASES = ["fp32-window", "varlen-fp32"]


def test_ring_triton_kernels(use_backend):
    """The Triton kernels' blocks: over NCCL on a machine with 2 GPUs or more (every float32 case), under
    the Triton interpreter on gloo otherwise (two small cases)."""
    use_backend("reference")
    if torch.cuda.device_count() >= 2:
        names = [c.name for c in CASES if c.dtype == torch.float32]
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        names = TRITON_CASES
    else:
        pytest.skip("no 2 GPUs, and TRITON_INTERPRET unset")
    per_rank = _spawn(2, "triton", names)
    for index, case in enumerate(CASES):
        if case.name in names:
            _compare(case, index, 2, per_rank)


def test_ring_module_matches_flash_attention(ring_results, use_backend):
    use_backend("reference")
    world, per_rank = ring_results
    torch.manual_seed(5)
    layer = FlashAttention(32, 4, causal=True, num_kv_heads=2, rotary=True, dtype=torch.float64)
    x, dout = (torch.randn(2, 13, 32, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
               for s in (1, 2))
    x.requires_grad_()
    (layer(x) * dout).sum().backward()
    for rank, results in enumerate(per_rank):
        ours = results["module"]
        torch.testing.assert_close(ours["out"], shard_sequence(layer(x).detach(), world, rank))
        torch.testing.assert_close(ours["dx"], shard_sequence(x.grad, world, rank))
        for name, p in layer.named_parameters():
            torch.testing.assert_close(ours["grads"][name], p.grad)


def test_ring_dropout(ring_results):
    """Each probability kept with probability 1 - p, and the backward is the forward's gradient."""
    world, per_rank = ring_results
    result = per_rank[0]["dropout"]
    assert result == per_rank[-1]["dropout"]                         # all-reduced: every rank agrees
    kept_fraction = result["kept"] / result["draws"]
    assert abs(kept_fraction - (1 - DROPOUT["dropout_p"])) < 0.03, kept_fraction
    assert result["central"] == pytest.approx(result["directional"], rel=1e-7, abs=1e-7)


def test_ring_rejects_bad_calls_on_every_rank(ring_results):
    world, per_rank = ring_results
    for results in per_rank:
        assert "zigzag layout" in results["bad"]["lengths"] and "shard_sequence" in results["bad"]["lengths"]
        assert "call ring attention differently" in results["bad"]["disagree"]


def test_shard_sequence_layout():
    x = torch.arange(10)[None]
    assert shard_sequence(x, 2, 0).tolist() == [[0, 1, 2, 8, 9]]      # chunks 0 and 3 of [3, 3, 2, 2]
    assert shard_sequence(x, 2, 1).tolist() == [[3, 4, 5, 6, 7]]
    for world in (1, 2, 3, 4):
        for total in (0, 1, 7, 16, 23):
            pieces = [shard_sequence(torch.arange(total)[None], world, r)[0].tolist() for r in range(world)]
            assert sorted(sum(pieces, [])) == list(range(total))
            assert pieces == [positions(total, world, r) for r in range(world)]
            assert [len(p) for p in pieces] == layout.local_lengths(total, world)
    with pytest.raises(ValueError, match="rank must be"):
        shard_sequence(x, 2, 2)
    with pytest.raises(ValueError, match="world_size must be"):
        shard_sequence(x, 0, 0)


def test_blocks_cover_exactly_the_band():
    """Each block's trimmed rows, keys and window (bottom-right aligned, as the kernels read it) allow
    exactly the pairs the global band allows."""
    rng = random.Random(0)
    for _ in range(3000):
        a, c, qs, ks = rng.randint(1, 9), rng.randint(1, 9), rng.randint(0, 20), rng.randint(0, 20)
        left, right = rng.choice([-1, 0, 1, 2, 5, 11]), rng.choice([-1, 0, 1, 3, 7])
        want = {(i, j) for i in range(a) for j in range(c)
                if (left < 0 or ks + j >= qs + i - left) and (right < 0 or ks + j <= qs + i + right)}
        got = set()
        found = layout._block(qs, a, ks, c, left, right)
        if found is not None:
            q0, q1, k0, k1, wl, wr = found
            offset = (k1 - k0) - (q1 - q0)
            assert wl >= -1 and wr >= -1
            got = {(i + q0, j + k0) for i in range(q1 - q0) for j in range(k1 - k0)
                   if (wl < 0 or j >= i + offset - wl) and (wr < 0 or j <= i + offset + wr)}
        assert got == want, (qs, a, ks, c, left, right, found)


def test_blocks_merge_to_one_call_per_step():
    """Non-causal: one call per step; causal zigzag: one call per step after the first."""
    world, total = 4, 64
    segs = [layout.segments(total, world, r) for r in range(world)]
    for rank in range(world):
        for step in range(1, world):
            source = (rank - step) % world
            assert len(layout.dense_blocks(segs[rank], segs[source], -1, -1)) == 1
            assert len(layout.dense_blocks(segs[rank], segs[source], -1, 0)) == 1


def test_needs_a_process_group():
    x = torch.randn(1, 4, 2, 8)
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attn_func(x, x, x)
