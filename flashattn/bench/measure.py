"""Time and peak memory of one implementation on one case. Nothing here raises: a failure comes
back as a Measurement with status "error" or "oom" and a one-line message.

GPU: triton.testing.do_bench, median, L2 flushed before every call by do_bench itself; on top of
that, when the inputs of one call would fit in L2 several times over, the timed function cycles
through several input sets. `time_row` times every implementation of one case in GPU_ROUNDS
rounds, interleaved (the order reversed every other round), and keeps the median round: clock and
temperature drift and a slow first timing after a compile hit every implementation alike instead of
whichever ran at that moment. The forward runs on inputs that require grad (a training forward,
which saves what the backward needs, as in flash-attn's own benchmarks); the backward is timed as
`out.backward(grad, retain_graph=True)` on a forward done beforehand; a "fwd+bwd" case times both in one
call, `attention(q, k, v).backward(grad)`.
CPU: time.perf_counter median of a few repeats after one warm-up call.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from flashattn.bench.cases import MEMORY_PASS, Case
from flashattn.bench.peers import Peer, describe_error

Tensor = torch.Tensor
Timer = Callable[[list[Callable[[], object]], list[Tensor]], float]

# Rounds, not one long measurement: the first timing of a short cell right after its kernels compiled
# can read low, and the host's time per call of short (host-bound) cells moves 2-3x between two
# measurements a fraction of a second apart; a cell's figure is the median of five interleaved rounds
# (benchmarks/TUNING.md, § benchmark-method).
GPU_ROUNDS = 5
GPU_WARMUP_MS = 25
GPU_REP_MS = 40
ASSUMED_L2_BYTES = 50 * 2 ** 20  # H100; used when the device doesn't report its L2 size
MAX_INPUT_SETS = 8

CPU_MIN_REPEATS = 5
CPU_MAX_REPEATS = 25
CPU_BUDGET_S = 0.75  # stop repeating (after CPU_MIN_REPEATS) once this much was spent

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class Measurement:
    status: str                     # "ok", "error", "oom" or "skipped"
    ms: float | None = None
    tflops: float | None = None
    peak_bytes: int | None = None
    error: str | None = None        # why it failed or was skipped
    rounds_ms: list[float] | None = None  # each round's time when there were several (ms is their median)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _failure(exc: BaseException) -> Measurement:
    if isinstance(exc, _OOM):
        return Measurement("oom", error="out of memory")
    return Measurement("error", error=describe_error(exc))


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def make_inputs(case: Case, layout: str, device: torch.device, n_sets: int = 1,
                ) -> list[tuple[Tensor, Tensor, Tensor]]:
    """`n_sets` independent (q, k, v), standard normal, contiguous in `layout`, requiring grad."""
    if layout == "bnhd":
        shape = (case.batch, case.seqlen, case.nheads, case.headdim)
    elif layout == "bhnd":
        shape = (case.batch, case.nheads, case.seqlen, case.headdim)
    else:
        raise ValueError(f"unknown layout {layout!r}")

    def tensor() -> Tensor:
        return torch.randn(shape, device=device, dtype=case.torch_dtype, requires_grad=True)
    return [(tensor(), tensor(), tensor()) for _ in range(n_sets)]


def input_sets(case: Case, device: torch.device) -> int:
    """How many input sets to cycle through so that consecutive calls don't hit in L2.

    One call reads q, k, v (and out, dout in the backward). If that is under 4 x L2, use as many
    sets as it takes to cover 4 x L2, at most MAX_INPUT_SETS. Only on GPU.
    """
    if device.type != "cuda":
        return 1
    tensors = 3 if case.pass_ == "fwd" else 5
    element_size = torch.empty((), dtype=case.torch_dtype).element_size()
    per_call = tensors * case.batch * case.seqlen * case.nheads * case.headdim * element_size
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or ASSUMED_L2_BYTES
    if per_call >= 4 * l2:
        return 1
    return min(MAX_INPUT_SETS, math.ceil(4 * l2 / per_call))


def _cycle(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """One function that runs calls[0], calls[1], ..., calls[0], ... on successive invocations."""
    if len(calls) == 1:
        return calls[0]
    order = itertools.cycle(calls)
    return lambda: next(order)()


def cuda_timer(calls: list[Callable[[], object]], grad_to_none: list[Tensor]) -> float:
    import triton.testing
    return triton.testing.do_bench(_cycle(calls), warmup=GPU_WARMUP_MS, rep=GPU_REP_MS,
                                   grad_to_none=grad_to_none, return_mode="median")


def cpu_timer(calls: list[Callable[[], object]], grad_to_none: list[Tensor]) -> float:
    fn = _cycle(calls)

    def clear_grads() -> None:
        for x in grad_to_none:
            x.grad = None

    clear_grads()
    fn()  # warm-up
    times: list[float] = []
    while len(times) < CPU_MIN_REPEATS or (len(times) < CPU_MAX_REPEATS
                                           and sum(times) < CPU_BUDGET_S):
        clear_grads()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _prepare(peer: Peer, case: Case, device: torch.device) -> tuple[list[Callable[[], object]], list[Tensor]]:
    """What a timer takes: the calls to time (one per input set) and the tensors whose grads to clear."""
    attention = peer.build(case, device)
    sets = make_inputs(case, peer.layout, device, input_sets(case, device))
    if case.pass_ == "fwd":
        calls = [lambda q=q, k=k, v=v: attention(q, k, v) for q, k, v in sets]
    elif case.pass_ == MEMORY_PASS:
        grads = [torch.randn_like(q) for q, _, _ in sets]    # out has q's shape in both layouts
        calls = [lambda q=q, k=k, v=v, grad=grad: attention(q, k, v).backward(grad)
                 for (q, k, v), grad in zip(sets, grads)]
    else:
        outs = [attention(q, k, v) for q, k, v in sets]
        grads = [torch.randn_like(out) for out in outs]
        calls = [lambda out=out, grad=grad: out.backward(grad, retain_graph=True)
                 for out, grad in zip(outs, grads)]
    return calls, [x for qkv in sets for x in qkv]


def _attempt(fn: Callable[[], object]) -> tuple[object, Measurement | None]:
    """fn()'s value, or the failure it raised as a Measurement."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA explains its refusals in warnings, then raises
            return fn(), None
    except Exception as exc:
        return None, _failure(exc)


def time_row(peers: list[Peer], case: Case, device: torch.device, timer: Timer,
             rounds: int = 1) -> dict[str, Measurement]:
    """Median time of every peer on `case` (FLOP/s from the case's nominal FLOPs), over `rounds`
    rounds in which each peer is timed once, in the given order and then reversed, alternately.
    Inputs of all peers stay allocated between rounds."""
    results: dict[str, Measurement] = {}
    prepared: dict[str, tuple] = {}
    for peer in peers:
        reason = peer.skip_reason(case)
        if reason:
            results[peer.name] = Measurement("skipped", error=reason)
            continue
        prepared[peer.name], failure = _attempt(lambda: _prepare(peer, case, device))
        if failure is not None:
            results[peer.name] = failure
            del prepared[peer.name]
    times: dict[str, list[float]] = {name: [] for name in prepared}
    for r in range(rounds):
        for name in list(prepared) if r % 2 == 0 else list(reversed(prepared)):
            if name in results:
                continue  # failed in an earlier round
            ms, failure = _attempt(lambda: timer(*prepared[name]))
            if failure is not None:
                results[name] = failure
            else:
                times[name].append(ms)
    for name, ms in times.items():
        if name not in results:
            median = statistics.median(ms)
            results[name] = Measurement("ok", ms=median, tflops=case.flops / median / 1e9,
                                        rounds_ms=ms if len(ms) > 1 else None)
    prepared.clear()
    _release(device)
    return {peer.name: results[peer.name] for peer in peers}


def time_case(peer: Peer, case: Case, device: torch.device, timer: Timer, rounds: int = 1) -> Measurement:
    """Median time of `peer` alone on `case` (`time_row` of one)."""
    return time_row([peer], case, device, timer, rounds)[peer.name]


def _step_peak(step: Callable[[], object], reset: Callable[[], None], device: torch.device) -> int:
    # Warm-up at the same size: compilation, autotuning, cuDNN plans, workspace allocations.
    step()
    reset()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_bytes(step: Callable[[], object], device: torch.device,
               reset: Callable[[], None] = lambda: None) -> Measurement:
    """Peak CUDA memory of one call of `step` beyond what is allocated before it, after one warm-up
    call (then `reset`, e.g. clearing the gradients it left). Never raises: an OOM or an error comes
    back as the Measurement's status."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peak = _step_peak(step, reset, device)
    except Exception as exc:
        result = _failure(exc)
    else:
        result = Measurement("ok", peak_bytes=peak)
    _release(device)
    return result


def peak_memory(peer: Peer, case: Case, device: torch.device) -> Measurement:
    """Peak CUDA memory of one forward + backward beyond the inputs (q, k, v, dout) already
    allocated. It includes dq, dk, dv (3 x the size of q), which every implementation writes."""
    try:
        attention = peer.build(case, device)
        (q, k, v), = make_inputs(case, peer.layout, device)
        grad = torch.randn_like(q)  # out has q's shape in both layouts
    except Exception as exc:
        result = _failure(exc)
        _release(device)
        return result

    def reset() -> None:
        q.grad = k.grad = v.grad = None
    return peak_bytes(lambda: attention(q, k, v).backward(grad), device, reset)
