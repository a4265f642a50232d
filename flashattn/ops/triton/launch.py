"""Launching a @triton.jit kernel with less host work than `kernel[grid](...)`.

Triton's JITFunction.run binds every argument, asks its specialiser about each one, hashes the
result and builds launch metadata on every call: work proportional to the parameter count, and our
kernels have about 50 (most of them option parameters left at their defaults). For short sequences
that host work, not the kernel, bounds a call's time (benchmarks/TUNING.md, § host-cost).

`Launcher` keeps the compiled kernels of one jit function under a key that determines Triton's
specialisation (see `Launcher.key`), and launches a kept kernel directly through its compiled
launcher. The first call of each key goes through Triton's own path, which compiles (or loads from
Triton's cache), launches, and returns the kernel that is then kept. Triton's path is also taken
under the interpreter and whenever a launch hook is installed (profilers such as proton read the
launch metadata that only that path builds).

A kernel that makes TMA descriptors on the device (`scratch=True`) needs global scratch memory for
them, which Triton asks of the allocator set by `triton.set_allocator`; the Launcher sets its own (a
torch allocation on the current stream) in a copy of the caller's context, so a user's allocator is
neither replaced nor used.
"""
from __future__ import annotations

import contextvars
import inspect

import torch
import triton
from triton import knobs
from triton.runtime import driver


_TENSOR = torch.Tensor
# While set (plan.run), every launch appends (launcher, kept kernel, grid, argument values) to the
# list, or None when it did not launch a kept kernel (it compiled, or took Triton's own path).
noting: contextvars.ContextVar[list | None] = contextvars.ContextVar("flashattn_noting", default=None)
_I32 = (-2 ** 31, 2 ** 31)
MAX_KEPT = 4096  # kept kernels per jit function; exact ints in the key: bound what many shapes leave


def _other(value):
    """Key of a value of a rarer type: a tensor subclass is a tensor; a jit function or dtype given
    as a constexpr is itself."""
    return (value.dtype, not value.data_ptr() & 15) if isinstance(value, _TENSOR) else value


class Launcher:
    """`Launcher(kernel)(grid, *args, num_warps=, num_stages=, **kwargs)` launches like
    `kernel[grid](*args, num_warps=, num_stages=, **kwargs)`, with the host work of a call whose key
    was seen before cut to building the key. Arguments must be given as the kernel's parameters
    (positional first, then keywords; omitted ones take the kernel's defaults)."""

    def __init__(self, fn: triton.JITFunction, scratch: bool = False):
        self.fn = fn
        self.scratch = scratch
        # Under TRITON_INTERPRET=1 (set before import) @triton.jit gives an InterpretedFunction,
        # which always takes its own path.
        self.direct = isinstance(fn, triton.runtime.jit.JITFunction)
        params = fn.params if self.direct else []
        self.names = [p.name for p in params]
        self.name_set = frozenset(self.names)
        # Ints that Triton does not specialise on (their value may change every call).
        self.loose = [p.do_not_specialize and not p.is_constexpr for p in params]
        self.defaults = [p.default for p in params]
        self.compiled: dict[tuple, object] = {}
        # (device, num_warps, num_stages, positional count, keyword arguments) -> the values and key
        # entries of the parameters past the positional ones. When only constexprs come as keywords
        # (the plain calls), a call site passes the same ones call after call: they are bound and
        # keyed once, and a call binds and keys only its positional arguments.
        self.tails: dict[tuple, tuple[list, list] | None] = {}
        self.constexprs = frozenset(p.name for p in params if p.is_constexpr)

    def _values(self, args: tuple, kwargs: dict, num_warps: int) -> list | None:
        """Every parameter's value in order, or None when the call does not bind (Triton's path then
        raises the proper error). A parameter named num_warps (a Gluon kernel's constexpr) gets the
        launch's num_warps, as Triton's own binding gives it."""
        values = list(args)
        missing = inspect.Parameter.empty
        for name, default in zip(self.names[len(args):], self.defaults[len(args):]):
            value = num_warps if name == "num_warps" else kwargs.get(name, default)
            if value is missing:
                return None
            values.append(value)
        bound = len(values) == len(self.names) and self.name_set.issuperset(kwargs)
        return values if bound else None

    def _tail(self, sig: tuple, n_args: int, kwargs: dict, num_warps: int) -> tuple[list, list] | None:
        """The values and key entries of the parameters after the first n_args, or None when the
        call does not bind (see _values)."""
        values = self._values((None,) * n_args, kwargs, num_warps)
        tail = None if values is None else (values[n_args:], self.key(values)[n_args:])
        if len(self.tails) >= MAX_KEPT:
            self.tails.clear()
        self.tails[sig] = tail
        return tail

    def key(self, values: list) -> list:
        """What of each argument Triton's choice of kernel depends on, or more: a tensor's dtype and
        16-byte alignment (what Triton specialises a pointer on); a float is fp32 whatever its
        value; a bool is tagged (True == 1 in a dict key); an int, a constexpr or None is kept as it
        is, which is finer than Triton's specialisation (an int's width, divisibility by 16, == 1)
        and costs nothing to compute, except an int Triton does not specialise on
        (do_not_specialize: the dropout seed, which changes every call), of which only the width
        counts. One comprehension: this runs for every argument of every launch."""
        lo, hi = _I32
        return [v if (kind := type(v)) is int and not loose
                else (v.dtype, not v.data_ptr() & 15) if kind is _TENSOR
                else float if kind is float
                else (bool, v) if kind is bool
                else (lo <= v < hi) if kind is int
                else v if kind is str or v is None
                else _other(v)
                for v, loose in zip(values, self.loose)]

    def __call__(self, grid: tuple[int, int, int], *args, num_warps: int, num_stages: int,
                 launch_pdl: bool = False, **kwargs) -> None:
        """`launch_pdl=True` launches with programmatic dependent launch (sm_90+): the kernel may
        start before the previous kernel on the stream ends, so it must execute `gdc_wait()`
        before it touches memory."""
        if self.scratch:
            contextvars.copy_context().run(_with_scratch, self._launch, grid, args, num_warps, num_stages, launch_pdl,
                                           kwargs)
        else:
            self._launch(grid, args, num_warps, num_stages, launch_pdl, kwargs)

    def _launch(self, grid: tuple[int, int, int], args: tuple, num_warps: int, num_stages: int, pdl: bool,
                kwargs: dict) -> None:
        noted = noting.get()
        if not self.direct or knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls:
            self._triton(grid, args, num_warps, num_stages, pdl, kwargs)
            if noted is not None:
                noted.append(None)
            return
        device = driver.active.get_current_device()
        key = values = None
        if self.constexprs.issuperset(kwargs):
            sig = (device, num_warps, num_stages, pdl, len(args), *kwargs.items())
            tail = self.tails.get(sig)
            if tail is None and sig not in self.tails:
                tail = self._tail(sig, len(args), kwargs, num_warps)
            if tail is not None:
                values = [*args, *tail[0]]
                key = (device, num_warps, num_stages, pdl, *self.key(args), *tail[1])
        else:
            values = self._values(args, kwargs, num_warps)
            if values is not None:
                key = (device, num_warps, num_stages, pdl, *self.key(values))
        if key is not None:
            kernel = self.compiled.get(key)
            if kernel is not None:
                _run(kernel, grid, values, driver.active.get_current_stream(device))
                if noted is not None:
                    noted.append((self, kernel, grid, values))
                return
        if noted is not None:
            noted.append(None)
        kernel = self._triton(grid, args, num_warps, num_stages, pdl, kwargs)
        if key is not None:
            if len(self.compiled) >= MAX_KEPT:
                self.compiled.clear()
            self.compiled[key] = kernel

    def replay(self, kernel, grid: tuple, values: list, stream: int) -> None:
        """Launch a kept kernel with every parameter's value given, on `stream`, the current one (a
        plan's launch, plan.py)."""
        if self.scratch:
            contextvars.copy_context().run(_with_scratch, _run, kernel, grid, values, stream)
        else:
            _run(kernel, grid, values, stream)

    def _triton(self, grid, args, num_warps, num_stages, pdl, kwargs):
        """Triton's own launch path (it compiles a new key). launch_pdl is a compile option there,
        named only when set: other backends know no such option."""
        if pdl:
            kwargs = {**kwargs, "launch_pdl": True}
        return self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages, **kwargs)


def _run(kernel, grid: tuple, values: list, stream: int) -> None:
    kernel.run(grid[0], grid[1], grid[2], stream,
               kernel.function, kernel.packed_metadata, None, None, None, *values)


def _with_scratch(launch, *args) -> None:
    """launch(*args) with _scratch as Triton's allocator (in a copied context: the caller's setting
    stays as it was)."""
    triton.set_allocator(_scratch)
    launch(*args)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for a launch (Triton's allocator protocol). torch's caching allocator hands out
    512-byte aligned blocks, ordered on the current stream, on which the kernel also runs."""
    return torch.empty(size, dtype=torch.uint8, device="cuda")
