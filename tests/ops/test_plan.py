"""Plans (flashattn/ops/triton/plan.py): a repeated plain call replays its noted launches with its own
tensors. On any machine with stand-in launches; on a GPU, every forward and backward kernel family
through a plan against the full path."""
import dataclasses

import pytest
import torch

from flashattn.ops.triton import backward, forward, launch, plan

from conftest import HAS_CUDA


class _Launcher:
    """Stands in for launch.Launcher: records what each replay was given."""

    def __init__(self):
        self.replays = []

    def replay(self, kernel, grid, values, stream):
        self.replays.append((kernel, grid, values))


@pytest.fixture
def plans():
    plan.clear()
    yield
    plan.clear()


def _call(sig, q, k, v, entries, lasting=(), out=None):
    """plan.run of a call whose full path allocates o, lse (plan.empty) and notes `entries(q, k, v, o,
    lse)` as its launches; it returns `out(o, lse)` (default (o, lse))."""
    ran = []

    def full():
        o, lse = plan.empty(q.shape, q.dtype, q.device), plan.empty((2, 4, 5), torch.float32, q.device)
        noted = launch.noting.get()
        ran.append(noted is not None)
        if noted is not None:
            noted.extend(entries(q, k, v, o, lse))
        return out(o, lse) if out else (o, lse)
    outs = plan.run(sig, (q, k, v), full, lambda: lasting)
    return outs, ran


def _qkv():
    return (torch.randn(2, 5, 4, 8) for _ in range(3))


def test_a_repeated_signature_replays_its_launches_with_its_own_tensors(plans):
    counter = torch.zeros(1)
    launcher = _Launcher()

    def entries(q, k, v, o, lse):
        return [(launcher, "kernel", (3, 4, 2), [q, k, v, o, lse, counter, 5, 0.125, True]),
                (launcher, "convert", (1, 1, 1), [lse, o])]
    sig = ("signature",)
    for _ in range(2):                                        # noted twice alike: a plan
        _, ran = _call(sig, *_qkv(), entries, lasting=(counter,))
        assert ran == [True] and not launcher.replays
    q, k, v = _qkv()
    (o, lse), ran = _call(sig, q, k, v, entries, lasting=(counter,))
    assert ran == []                                          # the full path did not run
    [(kernel, grid, values), (convert, _, (lse2, o2))] = launcher.replays
    assert kernel == "kernel" and grid == (3, 4, 2) and convert == "convert"
    assert [x is y for x, y in zip(values[:6], (q, k, v, o, lse, counter))] == [True] * 6
    assert values[6:] == [5, 0.125, True] and lse2 is lse and o2 is o
    assert o.shape == q.shape and o.stride() == q.stride() and lse.shape == (2, 4, 5)


def test_a_call_whose_launch_compiled_is_noted_again(plans):
    first = [True]
    launcher = _Launcher()

    def entries(q, k, v, o, lse):
        compiled, first[0] = first[0], False
        return [None] if compiled else [(launcher, "kernel", (1, 1, 1), [q, o, lse])]
    sig = ("signature",)
    for _ in range(3):                                                # noted again, twice alike
        assert _call(sig, *_qkv(), entries)[1] == [True]
    assert _call(sig, *_qkv(), entries)[1] == [] and len(launcher.replays) == 1


def test_calls_that_launch_differently_get_no_plan_until_two_agree(plans):
    """An autotuning call launches every candidate once: the next call's launches differ, so neither
    is a plan; the two after it agree."""
    launcher = _Launcher()
    grids = iter([[(1, 1, 1), (2, 1, 1), (3, 1, 1)], [(2, 1, 1)], [(2, 1, 1)]])

    def entries(q, k, v, o, lse):
        return [(launcher, "kernel", grid, [q, o]) for grid in next(grids)]
    sig = ("signature",)
    for _ in range(3):
        assert _call(sig, *_qkv(), entries)[1] == [True]
    assert _call(sig, *_qkv(), entries)[1] == []
    assert [grid for _, grid, _ in launcher.replays] == [(2, 1, 1)]


@pytest.mark.parametrize("foreign", ["launch", "output", "input-as-output"])
def test_a_call_with_a_tensor_not_its_own_gets_no_plan(foreign, plans):
    """A launch given a tensor allocated otherwise (split-KV's partial results, torch.zeros'
    semaphores), or a call returning one or an input, runs the full path each time, and is not noted
    again."""
    launcher = _Launcher()
    other = torch.zeros(3)

    def entries(q, k, v, o, lse):
        return [(launcher, "kernel", (1, 1, 1), [q, other if foreign == "launch" else o, lse])]

    def out(o, lse):
        return {"launch": (o, lse), "output": (o, other), "input-as-output": (q, lse)}[foreign]
    sig = ("signature",)
    for ran in ([True], [True], [False]):
        q, k, v = _qkv()
        assert _call(sig, q, k, v, entries, out=out)[1] == ran
    assert not launcher.replays


def test_no_signature_no_plan(plans):
    launcher = _Launcher()
    _, ran = _call(None, *_qkv(), lambda *t: [(launcher, "kernel", (1, 1, 1), list(t))])
    assert ran == [False] and not plan._plans


def _on_a_stand_in_gpu(monkeypatch):
    """Signatures for CPU tensors, on a stand-in driver (device 0, stream 0)."""
    monkeypatch.setattr(plan, "_eligible", lambda tensor: True)

    class Driver:
        class active:
            get_current_device = staticmethod(lambda: 0)
            get_current_stream = staticmethod(lambda device: 0)
    monkeypatch.setattr(launch, "driver", Driver)


def test_signatures_tell_calls_that_pass_one_tensor_twice_apart(monkeypatch):
    """A plan maps each argument to its call's tensor slot, so q given as k must not share a plan with
    distinct tensors; off CUDA there is no signature at all."""
    q, k, v = _qkv()
    assert plan.signature((q, k, v), 0.125, False) is None
    _on_a_stand_in_gpu(monkeypatch)
    assert plan.signature((q, q, v), 0.125, False) != plan.signature((q, k, v), 0.125, False)
    assert plan.signature((q, k, v), 0.125, False) != plan.signature((q, k, v), 0.125, True)
    assert plan.signature((q, k, v), 0.125, False) == plan.signature(tuple(_qkv()), 0.125, False)


def test_only_calls_on_a_side_stream_ask_whether_a_graph_is_being_captured(monkeypatch):
    """No capture runs on the legacy default stream (handle 0): a call there skips the query; on any
    other stream a capture in progress means no signature (a captured graph takes its own tile
    counter), and no capture a signature that names the stream."""
    _on_a_stand_in_gpu(monkeypatch)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: asked.append(1) or capturing)
    q, k, v = _qkv()
    capturing = True
    assert plan.signature((q, k, v), 0.125, False) is not None and not asked
    monkeypatch.setattr(launch.driver.active, "get_current_stream", staticmethod(lambda device: 7))
    assert plan.signature((q, k, v), 0.125, False) is None and asked
    capturing = False
    assert plan.signature((q, k, v), 0.125, False)[-1] == 7


# (batch, seqlen_q, seqlen_k, heads, kv heads, head dim, causal): the portable kernels at short lengths,
# the ping-pong forward one program per tile and persistent and the one-pass backward (D128 2k, D256
# 2k), the warp-specialized forward (D64 4k on sm_90), the three-warp-group ping-pong forward (D64 8k),
# split-KV (one query: no forward plan), GQA.
GPU_CASES = [(2, 128, 128, 4, 4, 64, False), (1, 2048, 2048, 8, 2, 128, True), (1, 2048, 2048, 4, 4, 256, False),
             (1, 4096, 4096, 4, 4, 64, False), (1, 8192, 8192, 2, 1, 64, True), (3, 1, 700, 8, 2, 128, False),
             (2, 300, 517, 6, 3, 128, True)]


def test_the_backwards_plans_tell_deterministic_calls_apart(monkeypatch, plans):
    """deterministic=True runs other kernels (the one-pass kernel's ordered build): a default call's
    plan must never serve it."""
    seen = []
    monkeypatch.setattr(plan, "run", lambda sig, inputs, full, lasting: seen.append(sig) or (None, None, None))
    _on_a_stand_in_gpu(monkeypatch)
    q, k, v = _qkv()
    lse = torch.zeros(2, 4, 5)
    for deterministic in (False, True):
        variant = dataclasses.replace(forward.from_causal(True), deterministic=deterministic)
        backward.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse, 0.125, variant)
    assert len(seen) == 2 and seen[0] != seen[1]


@pytest.mark.skipif(not HAS_CUDA, reason="plans serve CUDA launches")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "b{}-q{}-k{}-h{}-{}-d{}-{}".format(*c[:6], "causal" if c[6] else "full"))
@pytest.mark.parametrize("same_qk", [False, True], ids=["qkv", "q-as-k"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_plans_give_the_full_paths_results(case, same_qk, deterministic, plans):
    """Five calls of one signature (the third on runs a plan) against the full path on the same
    tensors: the forward and dK, dV bit for bit, dQ within its reduce-adds' reordering (the one-pass
    kernel adds dQ's shares in any order unless deterministic)."""
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal = case
    if same_qk and (seqlen_q != seqlen_k or heads != kv_heads):
        pytest.skip("q given as k needs k's shape")
    torch.manual_seed(0)
    scale = head_dim ** -0.5
    variant = dataclasses.replace(forward.from_causal(causal), deterministic=deterministic)
    for call in range(5):
        q = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        k = q if same_qk else torch.randn(batch, seqlen_k, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, seqlen_k, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn_like(q)
        out, lse = forward.forward(q, k, v, scale, variant)
        ref_out, ref_lse = forward._forward(q, k, v, scale, variant)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        grads = backward.backward(dout, q, k, v, out, lse, scale, variant)
        ref = backward._backward(dout, q, k, v, out, lse, scale, variant)
        assert grads[3] is None and torch.equal(grads[1], ref[1]) and torch.equal(grads[2], ref[2])
        torch.testing.assert_close(grads[0], ref[0], atol=0 if deterministic else 1e-2, rtol=0 if deterministic else 1e-2)
    fwd_sig = plan.signature((q, k, v), scale, causal)
    assert (plan._plans.get(fwd_sig) is None) == (seqlen_q == 1)    # split-KV allocates its partial results


@pytest.fixture
def stand_in_gpu_path(monkeypatch):
    """The GPU path's Python on CPU tensors: every launcher a direct one (a JITFunction even under the
    interpreter) whose kernels record their runs, the tables answering for sm_90 (as sm90_compile.py's
    stand-ins do), one lasting tile counter, plans allowed. Yields the list of runs: (grid, arguments)."""
    from triton.runtime.jit import JITFunction

    from flashattn.ops.triton import backward_sm90, configs, forward_sm90

    def on_cuda(fn):        # the tables are asked about the CPU tensors' device: answer for a GPU's
        cuda = torch.device("cuda", 0)
        return lambda *args, **kwargs: fn(*(cuda if isinstance(x, torch.device) else x for x in args), **kwargs)

    runs = []

    class Kernel:
        function = packed_metadata = None

        def run(self, *args):
            runs.append((args[:3], args[9:]))
    kernel = Kernel()
    _on_a_stand_in_gpu(monkeypatch)
    launchers = [(forward, "_launch_fwd"), (forward, "_launch_fwd_ws"), (forward_sm90, "_launch_fwd_sm90"),
                 (backward, "_launch_bwd"), (backward, "_launch_preprocess"), (backward_sm90, "_launch_bwd_sm90"),
                 (backward_sm90, "_launch_dq_convert")]
    for module, name in launchers:
        old = getattr(module, name)
        jit = old.fn if isinstance(old.fn, JITFunction) else JITFunction(old.fn.fn)
        new = launch.Launcher(jit, scratch=old.scratch)
        monkeypatch.setattr(new, "_triton", lambda *args, **kwargs: kernel)
        monkeypatch.setattr(module, name, new)
    monkeypatch.setattr(configs, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(configs, "sm_resources", lambda device: (132, 227 * 1024))
    counter = torch.zeros(1, dtype=torch.int32)
    monkeypatch.setitem(forward_sm90.tile_counters, ("stand-in", 0), counter)
    monkeypatch.setattr(forward_sm90, "_tile_counter", lambda device: counter)
    for name in ("_table_config", "warp_specialized", "ping_pong_forward", "ping_pong_persistent", "one_pass_backward"):
        monkeypatch.setattr(configs, name, on_cuda(getattr(configs, name)))
    yield runs


def _same_launches(replayed, full, inputs, outputs, full_outputs):
    """The replayed runs are the full path's: the same grids and values, the call's inputs where the
    full path had them, its outputs where the full path had its own, and fresh tensors of the same
    layout for the full path's workspaces."""
    assert len(replayed) == len(full)
    for (grid, values), (full_grid, full_values) in zip(replayed, full):
        assert grid == full_grid and len(values) == len(full_values)
        for value, expected in zip(values, full_values):
            if not isinstance(expected, torch.Tensor):
                assert value == expected
            elif any(expected is t for t in inputs):
                assert value is expected
            elif any(expected is t for t in full_outputs):
                assert value is outputs[[i for i, t in enumerate(full_outputs) if t is expected][0]]
            else:
                assert (value.shape, value.stride(), value.dtype) == (expected.shape, expected.stride(), expected.dtype)


# (seqlen, head dim, causal) on a stand-in sm_90: the portable kernels (short, D64 causal), the ping-pong
# forward (one program per tile: D256 2k; persistent: D128 2k) with the one-pass backward, the
# warp-specialized forward (D64 4k).
STAND_IN_CASES = [(128, 64, True), (2048, 128, True), (2048, 256, False), (4096, 64, False)]


@pytest.mark.parametrize("case", STAND_IN_CASES, ids=lambda c: f"n{c[0]}-d{c[1]}-{'causal' if c[2] else 'full'}")
def test_a_plan_replays_what_the_full_path_launches(case, stand_in_gpu_path, plans):
    """Through the real launchers and kernel choice: the fourth call of a signature runs from its plans
    (the first compiles, the next two are noted alike), and runs what the full path runs on the same
    tensors."""
    runs = stand_in_gpu_path
    seqlen, head_dim, causal = case
    scale = head_dim ** -0.5
    for call in range(4):
        q, k, v, dout = (torch.randn(1, seqlen, 2, head_dim, dtype=torch.bfloat16) for _ in range(4))
        assert sum(p is not None for p in plan._plans.values()) == (2 if call == 3 else 0)
        del runs[:]
        out, lse = forward.forward(q, k, v, scale, causal)
        grads = backward.backward(dout, q, k, v, out, lse, scale, causal)
        planned = runs[:]
        del runs[:]
        full_out, full_lse = forward._forward(q, k, v, scale, forward.from_causal(causal))
        full_grads = backward._backward(dout, q, k, v, out, lse, scale, forward.from_causal(causal))
        if call == 3:                       # the first call from the plans (the two before noted alike)
            fwd_runs = [r for r in runs if any(x is full_out for x in r[1])]
            _same_launches(planned[:len(fwd_runs)], fwd_runs, (q, k, v), (out, lse), (full_out, full_lse))
            _same_launches(planned[len(fwd_runs):], runs[len(fwd_runs):], (dout, q, k, v, out, lse),
                           grads[:3], full_grads[:3])
    assert sum(p is not None for p in plan._plans.values()) == 2     # the forward's and the backward's
