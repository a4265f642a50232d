"""Plans: a repeated plain call cut to allocation and launch.

A plain dense forward's or backward's launches (choice.kernel_for's family, configs' tiles, every
launch argument that is not a tensor) depend on its tensors only through the `signature` below:
shapes, strides, dtypes, device, 16-byte alignment and which of them are one tensor, with the
softmax scale, the causal flag and the current device and stream (the persistent kernels keep a tile
counter per stream). The first calls of a signature run the full path while `launch.Launcher` notes
each launch and `empty` notes each allocation. When every launch hit a kernel its Launcher kept, the
call before launched the same kernels on the same grids, and every tensor a launch was given or the
call returned is one of its inputs, one of its `empty` allocations, or state that outlives the call
(forward_sm90's tile counters), the noted launches become the signature's plan: the next call of
that signature allocates as the noted call did and replays the launches with its own tensors, with
no choice, no table lookup and no argument keying (benchmarks/TUNING.md, § host-cost).

A call that launches with any other tensor (split-KV's partial results, the deterministic
backward's zeroed semaphores) gets no plan and is not noted again; one whose launch compiled is
noted again at its next call. Plans are skipped while a CUDA graph is captured (a capture takes a
fresh tile counter) and while a launch hook is installed (profilers read the metadata that only
Triton's own path builds). Code that changes the tile tables or the kernel choice at run time (the
tile sweep, tests that force a kernel) calls `clear()`: a plan keeps the launches it noted.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Callable

import torch
from triton import knobs

from flashattn.ops.triton import launch

MAX_PLANS = 1024           # signatures kept; exact shapes in the key: bound what many shapes leave

# While set (run), `empty` appends each tensor it allocates.
_allocating: contextvars.ContextVar[list | None] = contextvars.ContextVar("flashattn_allocating", default=None)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, noted as the call's own allocation while a plan is being noted: the allocations a
    plan repeats (every output and workspace of a plannable call comes from here)."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    noted = _allocating.get()
    if noted is not None:
        noted.append(tensor)
    return tensor


@dataclass(frozen=True)
class _Launch:
    launcher: launch.Launcher
    kernel: object
    grid: tuple
    values: tuple                       # the launch's arguments, the call's tensors as None
    slots: tuple[tuple[int, int], ...]  # (argument position, tensor slot: the inputs, then allocations)


@dataclass(frozen=True)
class Plan:
    allocations: tuple[tuple[tuple, tuple, torch.dtype], ...]   # (shape, stride, dtype), in order
    launches: tuple[_Launch, ...]
    outputs: tuple[int, ...]                                    # the returned tensors' slots

    def __call__(self, inputs: tuple[torch.Tensor, ...], stream: int) -> tuple[torch.Tensor, ...]:
        device = inputs[0].device
        tensors = (*inputs, *(torch.empty_strided(shape, stride, dtype=dtype, device=device)
                              for shape, stride, dtype in self.allocations))
        for step in self.launches:
            values = list(step.values)
            for position, slot in step.slots:
                values[position] = tensors[slot]
            step.launcher.replay(step.kernel, step.grid, values, stream)
        return tuple(tensors[slot] for slot in self.outputs)


_plans: dict[tuple, Plan | None] = {}
_noted: dict[tuple, tuple] = {}          # signature -> the kernels and grids its last noted call launched


def _eligible(tensor: torch.Tensor) -> bool:
    return (tensor.is_cuda and not knobs.runtime.launch_enter_hook.calls
            and not knobs.runtime.launch_exit_hook.calls)


def signature(tensors: tuple[torch.Tensor, ...], *scalars) -> tuple | None:
    """The key that determines a plain call's launches (its tensors, then the scalars that choose its
    kernels), or None when no plan may serve the call (not CUDA, a CUDA graph being captured, a launch
    hook installed)."""
    if not _eligible(tensors[0]):
        return None
    device = launch.driver.active.get_current_device()
    stream = launch.driver.active.get_current_stream(device)
    # CUDA captures no work issued to the legacy default stream (handle 0), so only a call on another
    # stream pays for the capture query.
    if stream and torch.cuda.is_current_stream_capturing():
        return None
    ids = [id(t) for t in tensors]
    # Which tensors are one (ids.index: each tensor's first slot): a plan gives each argument the
    # tensor in its slot.
    return (*[(t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15) for t in tensors],
            tuple(map(ids.index, ids)), *scalars, device, stream)


def run(sig: tuple | None, inputs: tuple[torch.Tensor, ...], full: Callable[[], tuple[torch.Tensor, ...]],
        lasting: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """`full()`'s outputs: by the plan of `sig` when it has one, else by `full()` (noted into a plan
    when the module docstring's conditions hold). `lasting()` gives the tensors that outlive a call and
    may be launch arguments."""
    if sig is None:
        return full()
    if sig in _plans:
        plan = _plans[sig]
        return full() if plan is None else plan(inputs, sig[-1])     # sig[-1]: the current stream
    noted, allocated = [], []
    tokens = launch.noting.set(noted), _allocating.set(allocated)
    try:
        outs = full()
    finally:
        launch.noting.reset(tokens[0])
        _allocating.reset(tokens[1])
    if noted and None not in noted:          # else a launch compiled: note the next call again
        # A plan is made when two calls in a row launched the same kernels on the same grids, so a
        # call's one-off launches (an autotuning run's candidates) never become one.
        shape = tuple((id(launcher), id(kernel), tuple(grid)) for launcher, kernel, grid, _ in noted)
        if _noted.pop(sig, None) == shape:
            if len(_plans) >= MAX_PLANS:
                _plans.clear()
            _plans[sig] = _make(noted, (*inputs, *allocated), len(inputs), outs, lasting())
        else:
            if len(_noted) >= MAX_PLANS:
                _noted.clear()
            _noted[sig] = shape
    return outs


def _slot(tensors: tuple, value: torch.Tensor) -> int | None:
    return next((i for i, t in enumerate(tensors) if t is value), None)


def _make(noted: list, tensors: tuple, n_inputs: int, outs: tuple, lasting: tuple) -> Plan | None:
    """The plan of a call's noted launches, or None when a launch takes, or the call returns, a
    tensor that is neither an input, an allocation of the call, nor lasting."""
    outputs = tuple(_slot(tensors, t) for t in outs)
    if None in outputs or min(outputs) < n_inputs:
        return None
    launches = []
    for launcher, kernel, grid, values in noted:
        slots, kept = [], list(values)
        for position, value in enumerate(values):
            if not isinstance(value, torch.Tensor):
                continue
            slot = _slot(tensors, value)
            if slot is None:
                if not any(value is t for t in lasting):
                    return None
                continue
            slots.append((position, slot))
            kept[position] = None
        launches.append(_Launch(launcher, kernel, tuple(grid), tuple(kept), tuple(slots)))
    allocations = tuple((tuple(t.shape), t.stride(), t.dtype) for t in tensors[n_inputs:])
    return Plan(allocations, tuple(launches), outputs)


def clear() -> None:
    """Forget every plan (tests; a changed tile table)."""
    _plans.clear()
    _noted.clear()
