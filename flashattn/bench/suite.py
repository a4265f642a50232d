"""Run the grid (every case on every implementation), then the memory section; show progress."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from flashattn.bench import measure
from flashattn.bench.cases import PASSES, Case, Grid, MemoryGrid
from flashattn.bench.measure import Measurement
from flashattn.bench.peers import MEMORY_PEERS, OURS, SUBJECT, Peer, registry


@dataclass
class Config:
    mode: str                        # "gpu" or "cpu"
    device: torch.device
    grid: Grid
    peers: list[Peer]
    unavailable: dict[str, str]      # peers that could not even be imported, and why
    memory: MemoryGrid | None        # None: no memory section
    memory_note: str = ""            # why there is no memory section
    device_label: str | None = None  # the device's name where it is not this process's (--render)


@dataclass
class Row:
    """One case and what every implementation did on it."""

    case: Case
    results: dict[str, Measurement] = field(default_factory=dict)

    def best_peer(self) -> str | None:
        """The fastest implementation other than this library's (None if none ran)."""
        ran = {name: m.tflops for name, m in self.results.items() if name not in OURS and m.ok}
        return max(ran, key=ran.get) if ran else None

    def ratio(self) -> float | None:
        """flashattn's throughput over the best peer's (> 1: flashattn is faster)."""
        best, ours = self.best_peer(), self.results.get(SUBJECT)
        if best is None or ours is None or not ours.ok:
            return None
        return ours.tflops / self.results[best].tflops

    def as_dict(self) -> dict:
        return {**self.case.as_dict(),
                "results": {name: m.as_dict() for name, m in self.results.items()},
                "best_peer": self.best_peer(), "flashattn_over_best_peer": self.ratio()}


@dataclass
class MemoryRow:
    """Peak memory of one forward + backward, per implementation."""

    case: Case
    results: dict[str, Measurement] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {**self.case.as_dict(),
                "results": {name: m.as_dict() for name, m in self.results.items()}}


@dataclass
class Results:
    config: Config
    rows: list[Row]
    memory_rows: list[MemoryRow]

    @property
    def names(self) -> list[str]:
        return [peer.name for peer in self.config.peers]

    @property
    def memory_names(self) -> list[str]:
        return [name for name in self.names if name in MEMORY_PEERS]


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.fields[section]}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), TextColumn("{task.description}"),
                    console=console, transient=False)


def run(config: Config, console: Console) -> Results:
    timer, rounds = measure.timing(config.device)
    cases = config.grid.cases()
    memory_peers = [p for p in config.peers if p.name in MEMORY_PEERS]
    memory_cases = config.memory.cases(config.grid.dtypes[0]) if config.memory else []
    torch.manual_seed(0)

    rows, memory_rows = [], []
    with _progress(console) as progress:
        # One untimed pass of every implementation over the first case of each pass: compiles,
        # autotuner and cuDNN plan caches, a process's first backward (0.5 s on the CPU), and GPU
        # clocks settle before anything is timed (without it the first timed cell of a run read up to
        # 10x slow).
        firsts = [next(c for c in cases if c.pass_ == p) for p in dict.fromkeys(c.pass_ for c in cases)]
        if firsts:
            warm = progress.add_task("", section="warm-up", total=len(firsts))
            for case in firsts:
                progress.update(warm, description=case.label())
                measure.time_row(config.peers, case, config.device, timer)
                progress.advance(warm)
            progress.update(warm, description="done")
        timing = progress.add_task("", section="timing", total=len(cases))
        for case in cases:
            progress.update(timing, description=f"{case.label()} ({len(config.peers)} implementations"
                                                + (f", {rounds} rounds)" if rounds > 1 else ")"))
            rows.append(Row(case, measure.time_row(config.peers, case, config.device, timer, rounds)))
            progress.advance(timing)
        progress.update(timing, description="done")

        if memory_cases:
            memory = progress.add_task("", section="memory",
                                       total=len(memory_cases) * len(memory_peers))
            for case in memory_cases:
                row = MemoryRow(case)
                for peer in memory_peers:
                    progress.update(memory, description=f"{peer.name}: {case.label()}")
                    row.results[peer.name] = measure.peak_memory(peer, case, config.device)
                    progress.advance(memory)
                memory_rows.append(row)
            progress.update(memory, description="done")
    return Results(config, rows, memory_rows)


def _case(d: dict) -> Case:
    return Case(d["dtype"], d["batch"], d["nheads"], d["seqlen"], d["headdim"], d["causal"], d["pass"])


def _measurements(d: dict) -> dict[str, Measurement]:
    return {name: Measurement(**m) for name, m in d["results"].items()}


def load(path: Path) -> tuple[Results, dict]:
    """The grid and memory section of a bench.json as Results (and its environment), to render its
    tables and plots again or to join it with another part (`merge`); the option panels are not read."""
    data = json.loads(Path(path).read_text())
    mode = data["mode"]
    known = {peer.name: peer for peer in registry(mode)}
    chosen = [known.get(name) or Peer(name, info["layout"], _not_runnable, info.get("max_seqlen"),
                                      info.get("description", ""))
              for name, info in data["implementations"].items()]
    grid = Grid(**{key: tuple(value) if isinstance(value, list) else value
                   for key, value in data["grid"].items()})
    memory_rows = [MemoryRow(_case(d), _measurements(d)) for d in data["memory"].get("rows", [])]
    memory = MemoryGrid(seqlens=tuple(row.case.seqlen for row in memory_rows)) if memory_rows else None
    env = data["environment"]
    config = Config(mode=mode, device=torch.device(env.get("device_type", "cpu")), grid=grid, peers=chosen,
                    unavailable=data.get("unavailable", {}), memory=memory,
                    memory_note=data["memory"].get("skipped", ""), device_label=env.get("device"))
    return Results(config, [Row(_case(d), _measurements(d)) for d in data["rows"]], memory_rows), env


def _not_runnable(case: Case, device: torch.device):
    raise RuntimeError("an implementation read from a bench.json that this version does not know")


def merge_problem(earlier: Results, config: Config) -> str | None:
    """Why an earlier part (`load`) cannot join a run of `config` (None: it can)."""
    names = sorted(peer.name for peer in config.peers)
    if earlier.config.mode != config.mode or sorted(earlier.names) != names:
        return (f"that run measured {sorted(earlier.names)} in {earlier.config.mode!r} mode, this one "
                f"{names} in {config.mode!r} mode; run both parts with the same --peers on the same "
                "kind of device")
    return None


def merge(results: Results, earlier: Results) -> Results:
    """`results` joined by the rows of an earlier part (`load`), for a grid measured over several
    processes (a device call per part; `merge_problem` says whether they fit): a cell in both keeps this
    run's figure, and so does the memory section."""
    config = results.config
    ours = {row.case for row in results.rows}
    rows = [row for row in earlier.rows if row.case not in ours] + results.rows
    rows.sort(key=lambda row: (row.case.dtype, row.case.headdim, row.case.causal,
                               PASSES.index(row.case.pass_), row.case.seqlen))
    grid, other = config.grid, earlier.config.grid

    def union(key: str, order=None) -> tuple:
        return tuple(sorted(set(getattr(grid, key)) | set(getattr(other, key)), key=order))
    grid = replace(grid, dtypes=union("dtypes"), head_dims=union("head_dims"), seqlens=union("seqlens"),
                   causal=union("causal"), passes=union("passes", PASSES.index))
    config = replace(config, grid=grid, memory=config.memory or earlier.config.memory,
                     unavailable={**earlier.config.unavailable, **config.unavailable})
    return Results(config, rows, results.memory_rows or earlier.memory_rows)
