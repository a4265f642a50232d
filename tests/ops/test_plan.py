"""Plans (flashattn/ops/triton/plan.py): a repeated plain forward replays its noted launches with its
own tensors. On any machine with stand-in launches; on a GPU, every forward kernel family through a
plan against the full path, bit for bit."""
import pytest
import torch

from flashattn.ops.triton import forward, launch, plan

from conftest import HAS_CUDA


class _Launcher:
    """Stands in for launch.Launcher: records what each replay was given."""

    def __init__(self):
        self.replays = []

    def replay(self, kernel, grid, values):
        self.replays.append((kernel, grid, values))


@pytest.fixture
def plans():
    plan.clear()
    yield
    plan.clear()


def _call(sig, q, k, v, launcher, entries, lasting=()):
    """plan.run of a call whose full path notes `entries(q, k, v, o, lse)` as its launches."""
    ran = []

    def full():
        o, lse = torch.empty_like(q), torch.empty(q.shape[0], q.shape[2], q.shape[1])
        noted = launch.noting.get()
        ran.append(noted is not None)
        if noted is not None:
            noted.extend(entries(q, k, v, o, lse))
        return o, lse
    outs = plan.run(sig, q, k, v, full, lambda: lasting)
    return outs, ran


def _qkv():
    return (torch.randn(2, 5, 4, 8) for _ in range(3))


def test_a_repeated_signature_replays_its_launches_with_its_own_tensors(plans):
    counter = torch.zeros(1)
    launcher = _Launcher()

    def entries(q, k, v, o, lse):
        return [(launcher, "kernel", (3, 4, 2), [q, k, v, o, lse, counter, 5, 0.125, True])]
    sig = ("signature",)
    for _ in range(2):                                        # noted twice alike: a plan
        _, ran = _call(sig, *_qkv(), launcher, entries, lasting=(counter,))
        assert ran == [True] and not launcher.replays
    q, k, v = _qkv()
    (o, lse), ran = _call(sig, q, k, v, launcher, entries, lasting=(counter,))
    assert ran == []                                          # the full path did not run
    [(kernel, grid, values)] = launcher.replays
    assert kernel == "kernel" and grid == (3, 4, 2)
    assert [x is y for x, y in zip(values[:6], (q, k, v, o, lse, counter))] == [True] * 6
    assert values[6:] == [5, 0.125, True]
    assert o.shape == q.shape and o.stride() == q.stride() and lse.shape == (2, 4, 5)


def test_a_call_whose_launch_compiled_is_noted_again(plans):
    launcher = _Launcher()
    first = [True]

    def entries(q, k, v, o, lse):
        compiled, first[0] = first[0], False
        return [None] if compiled else [(launcher, "kernel", (1, 1, 1), [q, o, lse])]
    sig = ("signature",)
    for _ in range(3):                                                # noted again, twice alike
        assert _call(sig, *_qkv(), launcher, entries)[1] == [True]
    assert _call(sig, *_qkv(), launcher, entries)[1] == [] and len(launcher.replays) == 1


def test_calls_that_launch_differently_get_no_plan_until_two_agree(plans):
    """An autotuning call launches every candidate once: the next call's launches differ, so neither
    is a plan; the two after it agree."""
    launcher = _Launcher()
    grids = iter([[(1, 1, 1), (2, 1, 1), (3, 1, 1)], [(2, 1, 1)], [(2, 1, 1)]])

    def entries(q, k, v, o, lse):
        return [(launcher, "kernel", grid, [q, o]) for grid in next(grids)]
    sig = ("signature",)
    for _ in range(3):
        assert _call(sig, *_qkv(), launcher, entries)[1] == [True]
    assert _call(sig, *_qkv(), launcher, entries)[1] == []
    assert [grid for _, grid, _ in launcher.replays] == [(2, 1, 1)]


def test_a_launch_given_a_tensor_of_its_own_gets_no_plan(plans):
    """Split-KV's partial results are allocated per call: such a call runs the full path each time,
    and is not noted again."""
    launcher = _Launcher()

    def entries(q, k, v, o, lse):
        return [(launcher, "kernel", (1, 1, 1), [q, torch.empty(3), o])]
    sig = ("signature",)
    for _ in range(2):
        assert _call(sig, *_qkv(), launcher, entries)[1] == [True]
    assert _call(sig, *_qkv(), launcher, entries)[1] == [False]
    assert not launcher.replays


def test_no_signature_no_plan(plans):
    launcher = _Launcher()
    _, ran = _call(None, *_qkv(), launcher, lambda *t: [(launcher, "kernel", (1, 1, 1), list(t))])
    assert ran == [False] and not plan._plans


def test_signatures_tell_calls_that_pass_one_tensor_twice_apart(monkeypatch):
    """A plan maps each argument to its call's tensor slot, so q given as k must not share a plan with
    distinct tensors; off CUDA there is no signature at all."""
    q, k, v = _qkv()
    assert plan.signature(q, k, v, 0.125, False) is None
    monkeypatch.setattr(plan, "_eligible", lambda q: True)

    class Driver:
        class active:
            get_current_device = staticmethod(lambda: 0)
            get_current_stream = staticmethod(lambda device: 0)
    monkeypatch.setattr(launch, "driver", Driver)
    assert plan.signature(q, q, v, 0.125, False) != plan.signature(q, k, v, 0.125, False)
    assert plan.signature(q, k, v, 0.125, False) != plan.signature(q, k, v, 0.125, True)
    assert plan.signature(q, k, v, 0.125, False) == plan.signature(*_qkv(), 0.125, False)


# (batch, seqlen_q, seqlen_k, heads, kv heads, head dim, causal): the portable forward at short lengths,
# the ping-pong forward one program per tile and persistent, the warp-specialized forward (D64 4k on
# sm_90), split-KV (one query: no plan), GQA.
GPU_CASES = [(2, 128, 128, 4, 4, 64, False), (1, 2048, 2048, 8, 2, 128, True), (1, 2048, 2048, 4, 4, 256, False),
             (1, 4096, 4096, 4, 4, 64, False), (3, 1, 700, 8, 2, 128, False), (2, 300, 517, 6, 3, 128, True)]


@pytest.mark.skipif(not HAS_CUDA, reason="plans serve CUDA launches")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "b{}-q{}-k{}-h{}-{}-d{}-{}".format(*c[:6], "causal" if c[6] else "full"))
@pytest.mark.parametrize("same_qk", [False, True], ids=["qkv", "q-as-k"])
def test_plans_give_the_full_paths_results(case, same_qk, plans):
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal = case
    if same_qk and (seqlen_q != seqlen_k or heads != kv_heads):
        pytest.skip("q given as k needs k's shape")
    torch.manual_seed(0)
    scale = head_dim ** -0.5
    for call in range(5):
        q = torch.randn(batch, seqlen_q, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        k = q if same_qk else torch.randn(batch, seqlen_k, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, seqlen_k, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        out, lse = forward.forward(q, k, v, scale, causal)
        ref_out, ref_lse = forward._forward(q, k, v, scale, forward.from_causal(causal))
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    sig = plan.signature(q, k, v, scale, causal)
    assert (plan._plans.get(sig) is None) == (seqlen_q == 1)    # split-KV allocates its partial results
