"""python -m flashattn.bench ring: ring attention (flashattn.distributed) over W ranks against the
single-device kernels doing each rank's share of the work, and beside torch's context_parallel.

It spawns W processes itself for each world size (one GPU each over NCCL where W GPUs are visible;
otherwise gloo on the CPU at a small configuration, which tests the harness, not the speed). Each
cell is one sequence of T tokens (batch 1), T / W per rank, and times, forward and forward + backward:

    ring        ring_attn_func on each rank's zigzag slice (shard_sequence)
    compute     the same rank's blocks with the exchanges left out: each ring step keeps the rank's
                own K/V (a local copy of it stands in for the transfer), so this is the single-device
                kernels on the same per-rank work, merges included
    comm        the exchanges alone, one after another: the K/V passed W - 1 times (forward); and for
                forward + backward also the backward's W - 1 K/V passes and W passes of the fp32 dK/dV
                accumulators
    cp-sdpa     torch's context_parallel with F.scaled_dot_product_attention on the same sequence (its
                own load balancer and K/V rotation, the default SDPA backend), where the device's
                torch has it (CUDA only: it rewrites the CUDA SDPA kernels)

A round is `calls` calls between barriers; its time is the slowest rank's (one all_reduce), so every
rank takes the same rerun decisions (measure.time_rounds). Reported per cell:
    TFLOP/s per GPU   the whole sequence's attention FLOPs (the grid's count: 4 T^2 H D, halved when
                      causal, x 3.5 for forward + backward) / W / time
    efficiency        compute time / ring time: 1.00 when the ring costs nothing beyond the per-rank
                      kernels (the issue's target: 0.90 at 128k tokens per GPU)
    hidden            the share of the communication the overlap hides, (compute + comm - ring) / comm,
                      clamped to [0, 1]
Writes ring.json and ring.md to --out; --merge joins an earlier ring.json (cells measured in parts,
one world size per process, are keyed by world size, tokens, causal and pass).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from flashattn.bench import measure, report
from flashattn.bench.cases import DTYPES, format_seqlen, parse_seqlen
from flashattn.bench.measure import Measurement
from flashattn.bench.peers import describe_error
from flashattn.distributed import ring as ring_module
from flashattn.distributed import shard_sequence

Tensor = torch.Tensor
PASSES = ("fwd", "fwd+bwd")
IMPLEMENTATIONS = ("ring", "compute", "comm", "cp-sdpa")
TIMED_FLOPS = ("ring", "compute", "cp-sdpa")       # the ones a TFLOP/s figure is given for
TARGET_EFFICIENCY = 0.90


@dataclass(frozen=True)
class RingConfig:
    dtype: str
    nheads: int
    headdim: int
    world_sizes: tuple[int, ...]
    tokens: tuple[int, ...]          # the whole sequence's length, batch 1; T / W per rank
    causal: tuple[bool, ...]
    rounds: int
    calls: int                       # calls per round


GPU_RING = RingConfig("bf16", nheads=16, headdim=128, world_sizes=(2, 4), tokens=(131072, 262144, 524288, 1048576),
                      causal=(True,), rounds=3, calls=1)
CPU_RING = RingConfig("fp32", nheads=2, headdim=32, world_sizes=(2,), tokens=(256, 512), causal=(True,),
                      rounds=3, calls=1)


@dataclass
class RingRow:
    world: int
    tokens: int
    causal: bool
    pass_: str
    flops: float                      # the whole sequence's
    timings: dict[str, Measurement] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int, bool, str]:
        return self.world, self.tokens, self.causal, self.pass_

    def ms(self, name: str) -> float | None:
        m = self.timings.get(name)
        return m.ms if m is not None and m.ok else None

    def tflops_per_gpu(self, name: str) -> float | None:
        ms = self.ms(name)
        return self.flops / self.world / (ms * 1e-3) / 1e12 if ms else None

    @property
    def efficiency(self) -> float | None:
        ring, compute = self.ms("ring"), self.ms("compute")
        return compute / ring if ring and compute else None

    @property
    def hidden(self) -> float | None:
        ring, compute, comm = self.ms("ring"), self.ms("compute"), self.ms("comm")
        if not (ring and compute and comm):
            return None
        return min(1.0, max(0.0, (compute + comm - ring) / comm))

    def as_dict(self) -> dict:
        return {"world": self.world, "tokens": self.tokens, "tokens_per_rank": self.tokens // self.world,
                "causal": self.causal, "pass": self.pass_, "flops": self.flops,
                "timings": {n: m.as_dict() for n, m in self.timings.items()},
                "tflops_per_gpu": {n: self.tflops_per_gpu(n) for n in TIMED_FLOPS if n in self.timings},
                "efficiency": self.efficiency, "hidden": self.hidden}

    @classmethod
    def from_dict(cls, d: dict) -> RingRow:
        return cls(d["world"], d["tokens"], d["causal"], d["pass"], d["flops"],
                   {n: Measurement(**m) for n, m in d["timings"].items()})


def flops(tokens: int, cfg: RingConfig, causal: bool, pass_: str) -> float:
    forward = 4.0 * tokens ** 2 * cfg.nheads * cfg.headdim / (2 if causal else 1)
    return forward * (3.5 if pass_ == "fwd+bwd" else 1.0)


# ----------------------------------------------------------------------------- one rank


class _LocalRing(ring_module._Ring):
    """The ring without its transfers: a step's received K/V (and dK/dV) is a copy of what the rank
    sent, so the blocks are computed on real values with no communication."""

    def post(self, send: Tensor, recv: Tensor, tag: int) -> list:
        recv.copy_(send)
        return []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _round_timer(fn: Callable[[], object], calls: int, device: torch.device) -> Callable[[], float]:
    """One round: `calls` calls of fn between barriers; the slowest rank's ms per call."""
    def timer() -> float:
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        ms = torch.tensor([(time.perf_counter() - start) / calls * 1e3], dtype=torch.float64, device=device)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        return ms.item()
    return timer


def _differentiate(attend: Callable[[], Tensor], leaves: list[Tensor], pass_: str) -> Callable[[], object]:
    """The call a round makes: the forward, or forward + backward (with a fixed output gradient)."""
    if pass_ == "fwd":
        return attend
    grad = torch.randn_like(attend())

    def step() -> None:
        for x in leaves:
            x.grad = None
        attend().backward(grad)
    return step


def _exchanges(ring: ring_module._Ring, kv: Tensor, pass_: str) -> Callable[[], None]:
    """The ring's transfers alone, waited one by one (forward; forward + backward)."""
    incoming = torch.empty_like(kv)
    acc = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    acc_incoming = torch.empty_like(acc)
    transfers = [(kv, incoming)] * (ring.size - 1)
    if pass_ == "fwd+bwd":
        transfers += [(kv, incoming)] * (ring.size - 1) + [(acc, acc_incoming)] * ring.size

    def run() -> None:
        for send, recv in transfers:
            for work in ring.post(send, recv, 1):
                work.wait()
    return run


@contextlib.contextmanager
def _context_parallel(q: Tensor, k: Tensor, v: Tensor, device: torch.device):
    """torch's context_parallel over the default group, q, k, v (B, H, T, D) sharded in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v}):
        yield


def _cp_skip(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "context_parallel rewrites torch's CUDA SDPA kernels only"
    try:
        from torch.distributed.tensor.experimental import context_parallel  # noqa: F401
    except ImportError as exc:
        return f"this torch has no context_parallel ({describe_error(exc)})"
    return None


def _cell(cfg: RingConfig, tokens: int, causal: bool, device: torch.device) -> list[RingRow]:
    """Every rank runs this in step; its rows (forward, forward + backward) are the same on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[cfg.dtype]
    gen = torch.Generator(device).manual_seed(tokens)    # the same full tensors on every rank
    full = [torch.randn(1, tokens, cfg.nheads, cfg.headdim, generator=gen, device=device, dtype=dtype)
            for _ in range(3)]
    q, k, v = (shard_sequence(x, world, rank).requires_grad_() for x in full)
    rows = []
    for pass_ in PASSES:
        row = RingRow(world, tokens, causal, pass_, flops(tokens, cfg, causal, pass_))
        timers = {}
        for name, ring_type in (("ring", ring_module._Ring), ("compute", _LocalRing)):
            attend = (lambda ring_type=ring_type: ring_module._dense(q, k, v, None, causal, None, 0.0, (-1, -1), 0.0,
                                                                     False, ring_type)[0])
            timers[name] = _round_timer(_differentiate(attend, [q, k, v], pass_), cfg.calls, device)
        timers["comm"] = _round_timer(_exchanges(ring_module._Ring(None), torch.stack((k.detach(), v.detach())),
                                                 pass_), cfg.calls, device)
        for name, timer in timers.items():
            timer()                                      # warm-up: compiles, NCCL channels
        row.timings = measure.time_rounds(timers, cfg.rounds)
        rows.append(row)
    skip = _cp_skip(device)
    for row in rows:
        row.timings["cp-sdpa"] = Measurement("skipped", error=skip) if skip else _time_cp(cfg, full, causal,
                                                                                           row.pass_, device)
    del full, q, k, v
    return rows


def _time_cp(cfg: RingConfig, full: list[Tensor], causal: bool, pass_: str, device: torch.device) -> Measurement:
    q, k, v = (x.transpose(1, 2).contiguous() for x in full)       # SDPA's (B, H, T, D)
    try:
        with _context_parallel(q, k, v, device):
            for x in (q, k, v):
                x.requires_grad_()
            attend = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)   # noqa: E731
            timer = _round_timer(_differentiate(attend, [q, k, v], pass_), cfg.calls, device)
            timer()
            return measure.time_rounds({"cp-sdpa": timer}, cfg.rounds)["cp-sdpa"]
    except Exception as exc:         # every rank fails alike (same shapes), so none is left waiting
        return Measurement("error", error=describe_error(exc))


def _worker(rank: int, world: int, cfg: RingConfig, rendezvous: str, result: str) -> None:
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10),
                            **({"device_id": device} if cuda else {}))
    try:
        rows = []
        for tokens in cfg.tokens:
            for causal in cfg.causal:
                if tokens % (2 * world):
                    continue
                rows += _cell(cfg, tokens, causal, device)
                if rank == 0:
                    print(f"ring W={world} T={format_seqlen(tokens)} {'causal' if causal else 'full'}: "
                          + "; ".join(f"{r.pass_} efficiency {_ratio(r.efficiency)}" for r in rows[-2:]),
                          flush=True)
                if cuda:
                    torch.cuda.empty_cache()
        if rank == 0:
            env = report.environment(device)
            Path(result).write_text(json.dumps({"environment": env, "rows": [r.as_dict() for r in rows]}))
    finally:
        dist.destroy_process_group()


def run(cfg: RingConfig, world: int) -> tuple[dict, list[RingRow]]:
    """One world size's cells on `world` spawned processes: (the environment, the rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(world, cfg, os.path.join(tmp, "rendezvous"), result), nprocs=world,
                           start_method="spawn")
        done = json.loads(Path(result).read_text())
    return done["environment"], [RingRow.from_dict(r) for r in done["rows"]]


# ----------------------------------------------------------------------------- reporting


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ms(row: RingRow, name: str) -> str:
    m = row.timings.get(name)
    if m is None:
        return "-"
    if not m.ok:
        return {"skipped": "-", "oom": "OOM"}.get(m.status, "err")
    tflops = row.tflops_per_gpu(name) if name in TIMED_FLOPS else None
    text = f"{m.ms:.3g}{measure.noise_mark(m)}"
    return f"{text} ({tflops:.0f})" if tflops is not None and tflops >= 1 else text


HEADERS = ("W", "tokens", "per rank", "mask", "pass", *(f"{n} ms" for n in IMPLEMENTATIONS), "efficiency", "hidden")


def _cells(row: RingRow) -> list[str]:
    return [str(row.world), format_seqlen(row.tokens), format_seqlen(row.tokens // row.world),
            "causal" if row.causal else "full", row.pass_, *(_ms(row, n) for n in IMPLEMENTATIONS),
            _ratio(row.efficiency), _ratio(row.hidden)]


def title(cfg: RingConfig, device: str) -> str:
    return (f"Ring attention on {device}: ms per call (TFLOP/s per GPU) - {cfg.dtype} batch 1 H={cfg.nheads} "
            f"D={cfg.headdim}; efficiency = compute / ring, target {TARGET_EFFICIENCY:.2f} at 128k tokens per GPU")


def table(cfg: RingConfig, device: str, rows: list[RingRow]) -> Table:
    t = Table(title=title(cfg, device), title_justify="left")
    for i, header in enumerate(HEADERS):
        t.add_column(header, justify="left" if header in ("mask", "pass") else "right")
    for row in rows:
        t.add_row(*_cells(row))
    return t


def _notes(rows: list[RingRow]) -> list[str]:
    reasons = sorted({f"{n}: {m.error}" for r in rows for n, m in r.timings.items() if not m.ok and m.error})
    notes = [f"- {reason}" for reason in reasons]
    if any(m.noisy for r in rows for m in r.timings.values() if m.ok):
        notes.append(f"- {measure.NOISE_FOOTNOTE}")
    return notes


def markdown(cfg: RingConfig, env: dict, rows: list[RingRow]) -> str:
    git = env.get("git", {})
    lines = [f"# Ring attention ({env.get('device', '?')})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}; commit {git.get('commit', '?')}; "
             f"{env.get('date_utc')}.", "", title(cfg, env.get("device", "?")) + ".", "",
             *report.markdown_table(list(HEADERS), [_cells(r) for r in rows], set(range(len(HEADERS))) - {3, 4}),
             "", *_notes(rows)]
    return "\n".join(lines) + "\n"


def to_json(cfg: RingConfig, env: dict, rows: list[RingRow]) -> dict:
    return {"config": asdict(cfg), "environment": env, "rows": [r.as_dict() for r in rows]}


def _merge(rows: list[RingRow], path: Path, cfg: RingConfig) -> list[RingRow]:
    """rows, with the cells of an earlier ring.json that this run did not measure (same configuration
    apart from the world sizes, tokens and masks)."""
    earlier = json.loads(path.read_text())
    keep = ("dtype", "nheads", "headdim")
    mismatch = [k for k in keep if earlier["config"][k] != getattr(cfg, k)]
    if mismatch:
        raise SystemExit(f"--merge {path}: its {', '.join(mismatch)} differ from this run's; merge runs of one "
                         "configuration")
    mine = {r.key for r in rows}
    joined = rows + [r for r in map(RingRow.from_dict, earlier["rows"]) if r.key not in mine]
    return sorted(joined, key=lambda r: r.key)


# ----------------------------------------------------------------------------- command line


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(parse_seqlen(t.strip()) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashattn.bench ring", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=_ints, metavar="LIST",
                        help="process counts (GPU default: 2,4 where that many GPUs are visible; CPU: 2)")
    parser.add_argument("--tokens", type=_ints, metavar="LIST",
                        help="whole-sequence lengths, e.g. 128k,1M (GPU default 128k,256k,512k,1M; CPU 256,512); "
                             "a length not divisible by 2 W is skipped at world size W")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="yes")
    parser.add_argument("--rounds", type=int, help="rounds per cell (default 3)")
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU even where GPUs are visible")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default bench-out/)")
    parser.add_argument("--merge", type=Path, metavar="RING_JSON", help="join an earlier run's ring.json")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    gpus = 0 if args.cpu else torch.cuda.device_count()
    cfg = GPU_RING if gpus >= 2 else CPU_RING
    causal = {"both": (True, False), "yes": (True,), "no": (False,)}[args.causal]
    cfg = replace(cfg, causal=causal, world_sizes=args.world_sizes or cfg.world_sizes,
                  tokens=args.tokens or cfg.tokens, rounds=args.rounds or cfg.rounds)
    if gpus >= 2:
        too_many = [w for w in cfg.world_sizes if w > gpus]
        if too_many:
            console.print(f"[yellow]Skipping world sizes {too_many}: {gpus} GPUs visible.[/]")
        cfg = replace(cfg, world_sizes=tuple(w for w in cfg.world_sizes if w <= gpus))
    elif not args.cpu:
        console.print("[yellow]Fewer than 2 GPUs visible: gloo on the CPU at a small size (tests the harness, "
                      "says nothing of the GPU).[/]")
    if not cfg.world_sizes:
        console.print("[red]No world size to run.[/]")
        return 2
    bad = [w for w in cfg.world_sizes if w < 2]
    if bad:
        console.print(f"[red]World sizes must be >= 2, got {bad}.[/]")
        return 2
    for world in cfg.world_sizes:
        odd = [format_seqlen(t) for t in cfg.tokens if t % (2 * world)]
        if odd:     # the zigzag layout gives every rank equal slices only then (the compute timing needs it)
            console.print(f"[yellow]Skipping tokens {', '.join(odd)} at world size {world}: not divisible by "
                          f"2 x {world}.[/]")
    env, rows = {}, []
    for world in cfg.world_sizes:
        env, more = run(cfg, world)
        rows += more
    if args.merge is not None:
        rows = _merge(rows, args.merge, cfg)
    console.print(table(cfg, env.get("device", "?"), rows))
    for note in _notes(rows):
        console.print(note)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ring.json").write_text(json.dumps(to_json(cfg, env, rows), indent=1))
    (args.out / "ring.md").write_text(markdown(cfg, env, rows))
    console.print(f"Wrote {args.out / 'ring.json'} and ring.md")
    return 0
