"""Plans: a repeated plain forward cut to allocation and launch.

A plain dense forward's launches (choice.kernel_for's family, configs' tiles, every launch argument
that is not a tensor) depend on its tensors only through the `signature` below: shapes, strides,
dtypes, device and 16-byte alignment of q, k, v, the softmax scale and causal flag, and the current
device and stream (the persistent kernels keep a tile counter per stream). The first call of a
signature runs the full path while `launch.Launcher` notes each launch; when every launch hit a
kernel its Launcher kept, the call before launched the same kernels on the same grids, and every
tensor a launch was given is one of q, k, v, the outputs, or per-stream state that outlives the call
(forward_sm90's tile counter), the noted launches become the signature's plan, and the next call of that signature allocates its outputs and replays them with
its own tensors: no choice, no table lookup, no argument keying (benchmarks/TUNING.md, § host-cost).
A call whose launches take anything else (split-KV's partial results) gets no plan and is not noted
again; one whose launch compiled is noted again at its next call.

Plans are skipped while a CUDA graph is captured (a capture takes a fresh tile counter) and while a
launch hook is installed (profilers read the metadata that only Triton's own path builds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from triton import knobs

from flashattn.ops.triton import launch

MAX_PLANS = 1024           # signatures kept; exact shapes in the key: bound what many shapes leave
_INPUTS = 3                # q, k, v: tensor slots 0-2; the outputs follow


@dataclass(frozen=True)
class _Output:
    shape: tuple
    stride: tuple
    dtype: torch.dtype


@dataclass(frozen=True)
class _Launch:
    launcher: launch.Launcher
    kernel: object
    grid: tuple
    values: tuple                       # the launch's arguments, tensors of the call as None
    slots: tuple[tuple[int, int], ...]  # (argument position, tensor slot: q, k, v, outputs...)


@dataclass(frozen=True)
class Plan:
    outputs: tuple[_Output, ...]
    launches: tuple[_Launch, ...]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = tuple(torch.empty_strided(o.shape, o.stride, dtype=o.dtype, device=q.device) for o in self.outputs)
        tensors = (q, k, v, *outs)
        for step in self.launches:
            values = list(step.values)
            for position, slot in step.slots:
                values[position] = tensors[slot]
            step.launcher.replay(step.kernel, step.grid, values)
        return outs


_plans: dict[tuple, Plan | None] = {}
_noted: dict[tuple, tuple] = {}          # signature -> the kernels and grids its last noted call launched


def signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
              ) -> tuple | None:
    """The key that determines a plain forward's launches, or None when no plan may serve the call
    (not CUDA, a CUDA graph being captured, a launch hook installed)."""
    if not _eligible(q):
        return None
    device = launch.driver.active.get_current_device()
    # Which of q, k, v are one tensor: a plan gives each argument the tensor in its slot.
    return (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device, not q.data_ptr() & 15, not k.data_ptr() & 15, not v.data_ptr() & 15,
            k is q, v is q, v is k, softmax_scale, causal, device, launch.driver.active.get_current_stream(device))


def _eligible(q: torch.Tensor) -> bool:
    return (q.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()
            and not knobs.runtime.launch_enter_hook.calls and not knobs.runtime.launch_exit_hook.calls)


def run(sig: tuple | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        full: Callable[[], tuple[torch.Tensor, ...]], lasting: Callable[[], tuple[torch.Tensor, ...]]
        ) -> tuple[torch.Tensor, ...]:
    """`full()`'s outputs: by the plan of `sig` when it has one, else by `full()` (noted into a plan
    the first time). `lasting()` gives the tensors that outlive a call and may be launch arguments."""
    if sig is None:
        return full()
    if sig in _plans:
        plan = _plans[sig]
        return full() if plan is None else plan(q, k, v)
    noted: list = []
    token = launch.noting.set(noted)
    try:
        outs = full()
    finally:
        launch.noting.reset(token)
    if noted and None not in noted:          # else a launch compiled: note the next call again
        # A plan is made when two calls in a row launched the same kernels on the same grids, so a
        # call's one-off launches (an autotuning run's candidates) never become one.
        shape = tuple((id(launcher), id(kernel), tuple(grid)) for launcher, kernel, grid, _ in noted)
        if _noted.pop(sig, None) == shape:
            if len(_plans) >= MAX_PLANS:
                _plans.clear()
            _plans[sig] = _make(noted, (q, k, v, *outs), lasting())
        else:
            if len(_noted) >= MAX_PLANS:
                _noted.clear()
            _noted[sig] = shape
    return outs


def _make(noted: list, tensors: tuple, lasting: tuple) -> Plan | None:
    """The plan of a call's noted launches, or None when one of them takes a tensor that is neither
    one of the call's nor lasting."""
    launches = []
    for launcher, kernel, grid, values in noted:
        slots, kept = [], list(values)
        for position, value in enumerate(values):
            if not isinstance(value, torch.Tensor):
                continue
            slot = next((i for i, t in enumerate(tensors) if t is value), None)
            if slot is None:
                if not any(value is t for t in lasting):
                    return None
                continue
            slots.append((position, slot))
            kept[position] = None
        launches.append(_Launch(launcher, kernel, tuple(grid), tuple(kept), tuple(slots)))
    outputs = tuple(_Output(tuple(t.shape), t.stride(), t.dtype) for t in tensors[_INPUTS:])
    return Plan(outputs, tuple(launches))


def clear() -> None:
    """Forget every plan (tests; a changed tile table)."""
    _plans.clear()
    _noted.clear()

