"""The direct launcher (flashattn/ops/triton/launch.py): argument binding and the specialisation key
on any machine; on a GPU, that a kept kernel is reused only where Triton itself would reuse it."""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from flashattn.ops.triton.launch import Launcher

from conftest import HAS_CUDA


def _scale_copy(X, Y, n, factor, STRIDE: tl.constexpr = 1, BLOCK: tl.constexpr = 128):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs * STRIDE, mask=offs < n)
    tl.store(Y + offs, x * factor, mask=offs < n)


# JITFunction directly: the interpreter's conftest setting must not turn it into an InterpretedFunction.
_JIT = JITFunction(_scale_copy)


def test_binding_fills_defaults_in_parameter_order():
    launcher = Launcher(_JIT)
    x, y = torch.zeros(4), torch.zeros(4)
    assert launcher._values((x, y), dict(n=4, factor=2.0, BLOCK=64), 4) == [x, y, 4, 2.0, 1, 64]
    assert launcher._values((x, y, 4), dict(factor=2.0), 4) == [x, y, 4, 2.0, 1, 128]


def test_binding_gives_a_num_warps_parameter_the_launchs_warps():
    """A Gluon kernel takes num_warps as a constexpr parameter: it binds to the launch's num_warps
    (else every launch of it took Triton's slower path)."""
    from flashattn.ops.triton.forward_sm90 import _attn_fwd_sm90, build_constexprs

    launcher = Launcher(_attn_fwd_sm90)
    names = launcher.names
    args = [0] * names.index("HEAD_DIM")
    values = launcher._values(tuple(args), dict(build_constexprs(128, False), PERSISTENT=False), 4)
    assert values is not None and values[names.index("num_warps")] == 4


@pytest.mark.parametrize("args, kwargs", [((torch.zeros(1),), dict(n=1, factor=1.0)),
                                          ((torch.zeros(1), torch.zeros(1), 1, 1.0), dict(typo=3))],
                         ids=["missing-required", "unknown-keyword"])
def test_calls_that_do_not_bind_take_tritons_path(args, kwargs):
    assert Launcher(_JIT)._values(args, kwargs, 4) is None


def _key(*values, loose=False):
    launcher = Launcher(_JIT)
    launcher.loose = [loose] * len(values)
    return launcher.key(list(values))


def test_key_separates_what_triton_specialises_on():
    base = torch.zeros(64)
    assert _key(base) != _key(base[1:])                         # 16-byte alignment
    assert _key(base) != _key(base[4:].half())                  # dtype
    assert _key(base) == _key(base[4:]) == _key(base.clone())   # the same kernel
    assert _key(32) != _key(33) and _key(1) != _key(3)          # ints: exact (finer than Triton)
    assert _key(True) != _key(1) and _key(None) != _key(0)
    assert _key(0.5) == _key(3.0)                               # every float is fp32


def test_key_of_unspecialised_ints_keeps_only_their_width():
    """do_not_specialize ints (the dropout seed) must not make a new key every call."""
    assert _key(5, loose=True) == _key(7, loose=True) == _key(16, loose=True)
    assert _key(5, loose=True) != _key(2 ** 40, loose=True)


class _Kernel:
    """A kept kernel that records what it was run with."""
    function = packed_metadata = None

    def __init__(self):
        self.runs = []
        self.streams = []

    def run(self, *args):
        self.runs.append(args[9:])   # the kernel's arguments, past the grid, stream and metadata
        self.streams.append(args[3])


def _stand_in(monkeypatch) -> tuple[Launcher, list]:
    """A Launcher of _JIT whose Triton path makes a recording _Kernel (listed in `made`) instead of
    compiling, on a stand-in driver (device 0, stream 0)."""
    from flashattn.ops.triton import launch

    class Driver:
        class active:
            get_current_device = staticmethod(lambda: 0)
            get_current_stream = staticmethod(lambda device: 0)

    monkeypatch.setattr(launch, "driver", Driver)
    launcher = Launcher(_JIT)
    made = []

    class Fn:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: made.append(_Kernel()) or made[-1]

    launcher.fn = Fn()
    return launcher, made


def test_keyword_constexprs_are_bound_once_per_call_site(monkeypatch):
    """A call that passes only constexprs as keywords binds and keys them once: a later call runs the
    kept kernel with every parameter in order; another constexpr value is a kernel of its own; a
    runtime int passed by keyword takes the general path, which finds the same kernel."""
    launcher, made = _stand_in(monkeypatch)
    x, y = torch.zeros(4), torch.zeros(4)
    for n in (4, 4, 5, 4):
        launcher((1, 1, 1), x, y, n, 2.0, BLOCK=64, num_warps=4, num_stages=1)
    assert len(made) == 2 and len(launcher.tails) == 1   # n=4 and n=5: two kernels, one call site
    assert made[0].runs == [(x, y, 4, 2.0, 1, 64)] * 2
    launcher((1, 1, 1), x, y, 4, 2.0, BLOCK=32, num_warps=4, num_stages=1)
    assert len(made) == 3 and len(launcher.tails) == 2
    launcher((1, 1, 1), x, y, factor=2.0, n=4, BLOCK=64, num_warps=4, num_stages=1)
    assert len(made) == 3 and len(launcher.tails) == 2    # the general path finds the first kernel
    assert made[0].runs == [(x, y, 4, 2.0, 1, 64)] * 3


def test_noting_lists_each_launch_or_none_where_it_compiled(monkeypatch):
    """While launch.noting holds a list, a launch of a kept kernel appends (launcher, kernel, grid,
    every argument's value) and one that compiled appends None (plan.py); otherwise nothing is noted."""
    from flashattn.ops.triton import launch

    launcher, made = _stand_in(monkeypatch)
    x, y = torch.zeros(4), torch.zeros(4)
    noted = []
    token = launch.noting.set(noted)
    try:
        for n in (4, 4):
            launcher((2, 1, 1), x, y, n, 2.0, BLOCK=64, num_warps=4, num_stages=1)
    finally:
        launch.noting.reset(token)
    assert noted == [None, (launcher, made[0], (2, 1, 1), [x, y, 4, 2.0, 1, 64])]
    launcher((2, 1, 1), x, y, 4, 2.0, BLOCK=64, num_warps=4, num_stages=1)
    assert len(noted) == 2
    launcher.replay(made[0], (3, 1, 1), [y, x, 4, 2.0, 1, 64], 7)
    assert made[0].runs[-1] == (y, x, 4, 2.0, 1, 64) and made[0].streams[-1] == 7


@pytest.mark.skipif(not HAS_CUDA, reason="launches need a GPU")
def test_kept_kernels_match_tritons_own_choice():
    """Aligned and misaligned pointers, lengths that are and are not multiples of 16, strides as
    constexprs: every launch gives the right answer, and the launcher keeps one kernel per key."""
    launcher = Launcher(triton.jit(_scale_copy))
    base = torch.randn(4096, device="cuda")
    seen = set()
    for offset in (0, 1, 0, 4, 1):
        for n in (256, 250, 256, 1):
            for stride in (1, 2):
                x = base[offset:]
                y = torch.empty(n, device="cuda")
                launcher((triton.cdiv(n, 128), 1, 1), x, y, n, 3.0, STRIDE=stride, num_warps=4, num_stages=1)
                torch.testing.assert_close(y, x[: n * stride: stride] * 3.0)
                seen.add((x.data_ptr() % 16 == 0, n % 16 == 0, n == 1, stride))
    assert len(launcher.compiled) == len(seen)


def test_scratch_allocator_stays_inside_the_launch(monkeypatch):
    """A kernel that makes TMA descriptors on the device gets the Launcher's scratch allocator for its
    launch only: the caller's allocator (here a user's) is the one in place before and after."""
    from triton.runtime import _allocation
    from flashattn.ops.triton import launch

    def users_allocator(size, alignment, stream):
        raise AssertionError("the user's allocator was used by a flashattn kernel")

    seen = []
    monkeypatch.setattr(Launcher, "_launch", lambda self, *args: seen.append(_allocation._allocator.get()))
    before = _allocation._allocator.get()
    triton.set_allocator(users_allocator)
    try:
        Launcher(_JIT, scratch=True)((1, 1, 1), num_warps=4, num_stages=1)
        assert seen == [launch._scratch]
        assert _allocation._allocator.get() is users_allocator
    finally:
        triton.set_allocator(before)
