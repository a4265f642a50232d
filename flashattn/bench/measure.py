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
CPU: the same rounds, each the time.perf_counter median of a few calls.

Before the rounds, every input set of every implementation is called once, untimed (`warm_up`): the
first call of a cell pays for compiles, allocations and caches (on the CPU the first backward of a
process took 0.5 s against 3 ms after), and none of that belongs in a round. The rounds of a cell
then give its figure, their median, and their spread (`spread`); `time_rounds` times again a cell
whose rounds disagree by more than NOISE_LIMIT and marks it noisy if they still do.
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

CPU_ROUNDS = 5
CPU_MIN_REPEATS = 1     # calls per CPU round, at least,
CPU_MAX_REPEATS = 25    # and at most;
CPU_BUDGET_S = 0.15     # stop repeating (after CPU_MIN_REPEATS) once a round spent this much

# A cell whose rounds spread more than this is timed again, at most MAX_RERUNS more times; if none of
# its attempts is under it, the cell is marked noisy (benchmarks/README.md, "Spread and noisy cells").
NOISE_LIMIT = 0.10
MAX_RERUNS = 2

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class Measurement:
    status: str                     # "ok", "error", "oom" or "skipped"
    ms: float | None = None
    tflops: float | None = None
    peak_bytes: int | None = None
    error: str | None = None        # why it failed or was skipped
    rounds_ms: list[float] | None = None  # each round's time of the attempt kept (ms is their median)
    spread: float | None = None     # of rounds_ms, floored by the fastest attempt (`spread`; None: one round)
    reruns: int | None = None       # attempts after the first (0 to MAX_RERUNS)
    noisy: bool | None = None       # spread still above NOISE_LIMIT after the reruns
    other_attempts_ms: list[list[float]] | None = None  # the rounds of the attempts not kept, in order

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def spread(rounds_ms: list[float], floor: float | None = None) -> float | None:
    """(max - min) / median of a cell's rounds: how far apart its slowest and fastest rounds are,
    relative to the figure reported (0.1: 10% of it). None with fewer than two rounds.

    `floor`, when lower than every round, stands in for the min: `time_rounds` passes the fastest
    median among a re-timed cell's attempts, so that an attempt slowed throughout (its rounds agree
    with each other but not with an earlier attempt's) does not pass as steady. Only a faster attempt
    counts: a disturbance slows a round, it does not speed one up."""
    if len(rounds_ms) < 2:
        return None
    low = min(rounds_ms) if floor is None else min(min(rounds_ms), floor)
    return (max(rounds_ms) - low) / statistics.median(rounds_ms)


def format_spread(x: float) -> str:
    """A spread in whole percent, rounded up: a noisy cell never reads as NOISE_LIMIT or under."""
    return f"{math.ceil(round(x * 100, 6))}%"


def noise_mark(m: Measurement | None) -> str:
    """What a table appends to a noisy cell's figure: ' ~N%', N its spread; '' for any other."""
    return f" ~{format_spread(m.spread)}" if m is not None and m.noisy else ""


NOISE_FOOTNOTE = (f"`~N%` after a figure: noisy, its rounds still N% apart ((max - min) / median) after "
                  f"{MAX_RERUNS} reruns: time it again before relying on it. The rounds of every other figure "
                  f"agree within {NOISE_LIMIT:.0%}.")


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


def _clear(grad_to_none: list[Tensor]) -> None:
    for x in grad_to_none:
        x.grad = None


def cpu_timer(calls: list[Callable[[], object]], grad_to_none: list[Tensor]) -> float:
    """One CPU round: the median ms of CPU_MIN_REPEATS to CPU_MAX_REPEATS calls (CPU_BUDGET_S). No
    warm-up of its own: callers call `warm_up` once before the first round."""
    fn = _cycle(calls)
    times: list[float] = []
    while len(times) < CPU_MIN_REPEATS or (len(times) < CPU_MAX_REPEATS
                                           and sum(times) < CPU_BUDGET_S):
        _clear(grad_to_none)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    _clear(grad_to_none)
    return statistics.median(times) * 1e3


def timing(device: torch.device) -> tuple[Timer, int]:
    """The timer of one round on `device` and the number of rounds per cell."""
    return (cuda_timer, GPU_ROUNDS) if device.type == "cuda" else (cpu_timer, CPU_ROUNDS)


def warm_up(calls: list[Callable[[], object]], grad_to_none: list[Tensor]) -> None:
    """Every input set called once, untimed."""
    for call in calls:
        _clear(grad_to_none)
        call()
    _clear(grad_to_none)


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


def attempt(fn: Callable[[], object]) -> tuple[object, Measurement | None]:
    """(fn()'s value, None), or (None, the failure it raised as a Measurement): one cell's failure
    (out of memory, a kernel that cannot run here) must not end the run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA explains its refusals in warnings, then raises
            return fn(), None
    except Exception as exc:
        return None, _failure(exc)


def time_rounds(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, Measurement]:
    """Each timer's median over `rounds` rounds (a timer call is one round, in ms), the timers
    interleaved: each round calls them in the given order, reversed every other round.

    A cell (one timer) whose rounds spread more than NOISE_LIMIT is timed again, `rounds` more rounds,
    up to MAX_RERUNS times, the cells being re-timed interleaved among themselves; the attempt kept is
    the one with the smallest spread (`spread`, floored by the cell's fastest attempt), and the cell
    is noisy if even that one is above NOISE_LIMIT.
    Keeping one attempt rather than pooling them: what spreads the rounds here is a disturbance
    over a stretch of time (another process on the cores, a clock change, a slow host, a cold cache),
    so the attempt it missed is a measurement of the code, while a pool keeps the disturbed rounds
    in its median and, by max - min, is never steadier than its noisiest attempt. The floor: a
    disturbance can also outlast an attempt, whose rounds then agree at a slow figure (on the 2-core
    CPU, a backward read 227-241 ms in five rounds after an attempt whose median was 100 ms); judged
    alone that attempt would pass. Every attempt's rounds stay in the result. A timer that raises
    fails its cell (status "error" or "oom") and is not called again; the others go on."""
    attempts: dict[str, list[list[float]]] = {name: [] for name in timers}
    failed: dict[str, Measurement] = {}
    pending = list(timers)
    for _ in range(1 + MAX_RERUNS):
        times: dict[str, list[float]] = {name: [] for name in pending}
        for r in range(rounds):
            for name in pending if r % 2 == 0 else pending[::-1]:
                if name in failed:
                    continue
                ms, failure = attempt(timers[name])
                if failure is not None:
                    failed[name] = failure
                else:
                    times[name].append(ms)
        for name in pending:
            if name not in failed:
                attempts[name].append(times[name])
        pending = [name for name in pending
                   if name not in failed and (_kept(attempts[name])[1] or 0.0) > NOISE_LIMIT]
        if not pending:
            break
    return {name: failed.get(name) or _summary(attempts[name]) for name in timers}


def _kept(attempts: list[list[float]]) -> tuple[int, float | None]:
    """(index, spread) of the attempt with the smallest spread, the earliest of equals, each spread
    floored by the fastest median of all attempts (see `spread`; None: single rounds)."""
    fastest = min(statistics.median(rounds) for rounds in attempts)
    spreads = [spread(rounds, fastest) for rounds in attempts]
    best = min(range(len(spreads)), key=lambda i: spreads[i] or 0.0)
    return best, spreads[best]


def _summary(attempts: list[list[float]]) -> Measurement:
    best, cell_spread = _kept(attempts)
    rounds = attempts[best]
    return Measurement("ok", ms=statistics.median(rounds), rounds_ms=rounds, spread=cell_spread,
                       reruns=len(attempts) - 1, noisy=cell_spread is not None and cell_spread > NOISE_LIMIT,
                       other_attempts_ms=[a for i, a in enumerate(attempts) if i != best] or None)


def time_prepared(prepared: dict[str, tuple[list[Callable[[], object]], list[Tensor]]], timer: Timer,
                  rounds: int) -> dict[str, Measurement]:
    """`time_rounds` of `timer` on each (calls, tensors whose grads to clear), after one `warm_up`
    of each (a failure there fails that cell)."""
    results: dict[str, Measurement] = {}
    for name, (calls, grads) in prepared.items():
        _, failure = attempt(lambda: warm_up(calls, grads))
        if failure is not None:
            results[name] = failure
    timed = time_rounds({name: (lambda p=p: timer(*p)) for name, p in prepared.items() if name not in results},
                        rounds)
    return {name: results.get(name) or timed[name] for name in prepared}


def time_row(peers: list[Peer], case: Case, device: torch.device, timer: Timer,
             rounds: int = 1) -> dict[str, Measurement]:
    """Every peer on `case` through `time_prepared` (FLOP/s from the case's nominal FLOPs). Inputs of
    all peers stay allocated between rounds."""
    results: dict[str, Measurement] = {}
    prepared: dict[str, tuple] = {}
    for peer in peers:
        reason = peer.skip_reason(case)
        if reason:
            results[peer.name] = Measurement("skipped", error=reason)
            continue
        prepared[peer.name], failure = attempt(lambda: _prepare(peer, case, device))
        if failure is not None:
            results[peer.name] = failure
            del prepared[peer.name]
    for name, m in time_prepared(prepared, timer, rounds).items():
        if m.ok:
            m.tflops = case.flops / m.ms / 1e9
        results[name] = m
    prepared.clear()
    _release(device)
    return {peer.name: results[peer.name] for peer in peers}


def time_case(peer: Peer, case: Case, device: torch.device, timer: Timer, rounds: int = 1) -> Measurement:
    """`time_row` of `peer` alone."""
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
