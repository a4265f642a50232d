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
from flashattn.bench.peers import MEMORY_PEERS, OURS, SUBJECT, Peer


@dataclass
class Config:
    mode: str                        # "gpu" or "cpu"
    device: torch.device
    grid: Grid
    peers: list[Peer]
    unavailable: dict[str, str]      # peers that could not even be imported, and why
    memory: MemoryGrid | None        # None: no memory section
    memory_note: str = ""            # why there is no memory section


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


def merge(results: Results, path: Path) -> tuple[Results, dict]:
    """`results` joined by the rows of an earlier run's bench.json (`path`), for a grid measured over
    several processes (a device call per part): the earlier run must have measured the same
    implementations in the same mode; a cell in both keeps this run's figure, and so does the memory
    section. Returns the joined results and the earlier run's environment (which the JSON records)."""
    earlier = json.loads(Path(path).read_text())
    config = results.config
    if earlier.get("mode") != config.mode or set(earlier.get("implementations", ())) != set(results.names):
        raise ValueError(f"--merge {path}: that run measured {sorted(earlier.get('implementations', ()))} in "
                         f"{earlier.get('mode')!r} mode, this one {sorted(results.names)} in {config.mode!r} "
                         "mode; run both parts with the same --peers on the same kind of device")
    ours = {row.case for row in results.rows}
    rows = [Row(_case(d), {name: Measurement(**m) for name, m in d["results"].items()})
            for d in earlier["rows"] if _case(d) not in ours] + results.rows
    rows.sort(key=lambda row: (row.case.dtype, row.case.headdim, row.case.causal,
                               PASSES.index(row.case.pass_), row.case.seqlen))
    memory_rows = results.memory_rows or [
        MemoryRow(_case(d), {name: Measurement(**m) for name, m in d["results"].items()})
        for d in earlier.get("memory", {}).get("rows", [])]
    grid, other = config.grid, earlier["grid"]

    def union(key: str, order=None) -> tuple:
        values = set(getattr(grid, key)) | set(other[key])
        return tuple(sorted(values, key=order))
    grid = replace(grid, dtypes=union("dtypes"), head_dims=union("head_dims"), seqlens=union("seqlens"),
                   causal=union("causal"), passes=union("passes", PASSES.index))
    memory = config.memory
    if memory is None and memory_rows:
        memory = MemoryGrid(seqlens=tuple(row.case.seqlen for row in memory_rows))
    config = replace(config, grid=grid, memory=memory,
                     unavailable={**earlier.get("unavailable", {}), **config.unavailable})
    return Results(config, rows, memory_rows), earlier["environment"]
