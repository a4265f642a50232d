"""What the suite writes: the terminal tables, bench.json and summary.md (PNGs: plots.py)."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import os
import subprocess
from collections import defaultdict
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import flashattn
from flashattn.bench import measure
from flashattn.bench.cases import format_seqlen
from flashattn.bench.measure import Measurement
from flashattn.bench.peers import SUBJECT
from flashattn.bench.suite import Results, Row

SCHEMA_VERSION = 2  # bench.json's layout (2: each timed cell's spread, reruns and noisy flag)
REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- environment

def throughput_unit(mode: str) -> tuple[str, float]:
    """(label, factor from TFLOP/s): TFLOP/s on GPU, GFLOP/s on CPU."""
    return ("TFLOP/s", 1.0) if mode == "gpu" else ("GFLOP/s", 1e3)


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=10, check=True)
    return done.stdout.strip()


def git_info() -> dict:
    """The checkout's commit. FLASHATTN_COMMIT, when set, wins: a tree copied to another machine
    (benchmarks/gpu_run.sh on the device machine) may carry no .git, or a stale one."""
    if os.environ.get("FLASHATTN_COMMIT"):
        return {"commit": os.environ["FLASHATTN_COMMIT"], "dirty": None}
    try:
        return {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("FLASHATTN_COMMIT"), "dirty": None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


def results_device(results: Results) -> str:
    """The measured device's name, as tables and plots title it (a rendered bench.json names its own)."""
    return results.config.device_label or device_name(results.config.device)


def environment(device: torch.device) -> dict:
    env = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "git": git_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "flashattn": flashattn.__version__,
        "flash_attn": _package_version("flash-attn", "flash_attn"),
        "flash_attn_4": _package_version("flash-attn-4"),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_bytes"] = props.total_memory
        env["l2_cache_bytes"] = getattr(props, "L2_cache_size", None)
    return env


# ----------------------------------------------------------------------------- cell formatting

_NOT_OK = {"oom": "OOM", "skipped": "-", "error": "err"}


def _cell(m: Measurement | None, factor: float) -> str:
    """Throughput in the table's unit (marked when noisy: measure.noise_mark), or what happened instead."""
    if m is None:
        return ""
    return f"{m.tflops * factor:.1f}{measure.noise_mark(m)}" if m.ok else _NOT_OK[m.status]


def _spread(row: Row) -> str:
    """The largest spread of the row's figures, in percent ('-' when none has one)."""
    spreads = [m.spread for m in row.results.values() if m.ok and m.spread is not None]
    return measure.format_spread(max(spreads)) if spreads else "-"


SPREAD_HEADER = "max spread"
SPREAD_NOTE = (f"`{SPREAD_HEADER}`: the largest spread of the row's figures, (max - min) / median of the "
               f"{{rounds}} rounds that each figure is the median of.")


def _memory_cell(m: Measurement | None) -> str:
    """Peak memory in MiB, or what happened instead."""
    if m is None:
        return ""
    return f"{m.peak_bytes / 2 ** 20:,.0f}" if m.ok else _NOT_OK[m.status]


def _ratio(row: Row) -> str:
    ratio = row.ratio()
    return "-" if ratio is None else f"{ratio:.2f}x"


def _key_cells(row: Row) -> list[str]:
    case = row.case
    return [case.dtype, str(case.headdim), "yes" if case.causal else "no", case.pass_,
            format_seqlen(case.seqlen)]


KEY_HEADERS = ["dtype", "hdim", "causal", "pass", "seqlen"]


def _fastest(row: Row) -> str | None:
    ran = {name: m.tflops for name, m in row.results.items() if m.ok}
    return max(ran, key=ran.get) if ran else None


def failures(results: Results) -> list[tuple[str, str, int]]:
    """(implementation, message, number of cases) for every distinct error or OOM."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for row in results.rows + results.memory_rows:
        for name, m in row.results.items():
            if m.status in ("error", "oom"):
                counts[name, m.error or m.status] += 1
    return [(name, message, n) for (name, message), n in counts.items()]


# ----------------------------------------------------------------------------- terminal

def timing_table(results: Results) -> Table:
    unit, factor = throughput_unit(results.config.mode)
    table = Table(title=f"Attention throughput, {unit} (higher is better) - "
                        f"{results_device(results)}", title_justify="left")
    for header in KEY_HEADERS:
        table.add_column(header, justify="right" if header == "seqlen" else "left")
    for name in results.names:
        table.add_column(name, justify="right", style="bold cyan" if name == SUBJECT else None)
    table.add_column(f"{SUBJECT} / best peer", justify="right")
    table.add_column("best peer")
    table.add_column(SPREAD_HEADER, justify="right")
    previous = None
    for row in results.rows:
        if previous is not None and row.case.group != previous:
            table.add_section()
        previous = row.case.group
        fastest = _fastest(row)
        cells = []
        for name in results.names:
            m = row.results.get(name)
            text = _cell(m, factor)
            if m is not None and m.noisy:
                text = f"[yellow]{text}[/]"
            if name == fastest:
                text = f"[bold underline]{text}[/]"
            elif m is not None and m.status in ("error", "oom"):
                text = f"[red]{text}[/]"
            cells.append(text)
        ratio = row.ratio()
        ratio_text = _ratio(row)
        if ratio is not None:
            ratio_text = f"[{'green' if ratio >= 1 else 'yellow'}]{ratio_text}[/]"
        table.add_row(*_key_cells(row), *cells, ratio_text, row.best_peer() or "-", _spread(row))
    return table


def _noise_notes(results: Results) -> list[str]:
    """The footnotes of the timing table: the spread column, and the noisy marker where one is shown."""
    _, rounds = measure.timing(results.config.device)
    notes = [SPREAD_NOTE.format(rounds=rounds)]
    if any(m.noisy for row in results.rows for m in row.results.values()):
        notes.append(measure.NOISE_FOOTNOTE)
    return notes


def memory_table(results: Results) -> Table:
    case = results.memory_rows[0].case
    table = Table(title=f"Peak extra memory of forward + backward, MiB (lower is better) - "
                        f"B={case.batch} H={case.nheads} D={case.headdim} "
                        f"{'causal' if case.causal else 'full'} {case.dtype}",
                  title_justify="left")
    table.add_column("seqlen", justify="right")
    for name in results.memory_names:
        table.add_column(name, justify="right", style="bold cyan" if name == SUBJECT else None)
    for row in results.memory_rows:
        table.add_row(format_seqlen(row.case.seqlen),
                      *[_memory_cell(row.results.get(name)) for name in results.memory_names])
    return table


def print_report(results: Results, console: Console) -> None:
    config = results.config
    console.print()
    console.print(timing_table(results))
    for note in _noise_notes(results):
        console.print(note.replace("`", ""))
    if results.memory_rows:
        console.print()
        console.print(memory_table(results))
    elif config.memory_note:
        console.print(f"[dim]Memory section skipped: {config.memory_note}[/]")
    problems = failures(results)
    if problems:
        console.print("\n[bold]Failures[/] (err / OOM cells):")
        for name, message, n in problems:
            console.print(f"  {name} ({n} case{'s' if n > 1 else ''}): {escape(message)}")
    for name, reason in config.unavailable.items():
        console.print(f"[dim]Not measured: {name}: {escape(reason)}[/]")


# ----------------------------------------------------------------------------- files

def to_json(results: Results, env: dict) -> dict:
    config = results.config
    unit, _ = throughput_unit(config.mode)
    return {
        "schema_version": SCHEMA_VERSION,
        "mode": config.mode,
        "environment": env,
        "method": {
            "flops": "fwd 4*B*H*N^2*D, halved when causal; bwd 2.5 x fwd",
            "timing": (f"one untimed call of every input set, then the median of {measure.GPU_ROUNDS} "
                       f"rounds, the implementations of a case interleaved (order reversed every other "
                       f"round); each a triton.testing.do_bench median, warmup {measure.GPU_WARMUP_MS} ms, "
                       f"rep {measure.GPU_REP_MS} ms"
                       if config.device.type == "cuda" else
                       f"one untimed call, then the median of {measure.CPU_ROUNDS} rounds, the "
                       f"implementations of a case interleaved (order reversed every other round); each "
                       f"the time.perf_counter median of {measure.CPU_MIN_REPEATS}-"
                       f"{measure.CPU_MAX_REPEATS} calls ({measure.CPU_BUDGET_S} s)"),
            "noise": (f"spread = (max - min) / median of a cell's rounds, min counting the fastest median "
                      f"of its attempts; a cell above {measure.NOISE_LIMIT} is timed again, at most "
                      f"{measure.MAX_RERUNS} times, and keeps the attempt with the smallest spread "
                      f"(rounds_ms; the others in other_attempts_ms); noisy: that spread is still above "
                      f"{measure.NOISE_LIMIT}"),
            "backward": "out.backward(grad, retain_graph=True) on a forward done beforehand",
            "memory": "max_memory_allocated - memory_allocated before one fwd+bwd, with inputs "
                      "and dout allocated (includes dq, dk, dv)",
            "table_unit": unit,
        },
        "grid": asdict(config.grid),
        "implementations": {peer.name: {"layout": peer.layout, "description": peer.description,
                                        "max_seqlen": peer.max_seqlen}
                            for peer in config.peers},
        "unavailable": config.unavailable,
        "rows": [row.as_dict() for row in results.rows],
        "memory": ({"rows": [row.as_dict() for row in results.memory_rows]}
                   if results.memory_rows else {"skipped": config.memory_note}),
    }


def write_json(results: Results, env: dict, path: Path) -> None:
    path.write_text(json.dumps(to_json(results, env), indent=2) + "\n")


def markdown_table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    align = ["---:" if i in right else ":---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def _merged_note(env: dict) -> str:
    """Where a grid was measured in parts (--merge): which earlier run the other rows come from."""
    earlier = env.get("merged_from")
    if not earlier:
        return ""
    git = earlier.get("git") or {}
    return (f" The rows this run did not measure come from an earlier run: {earlier.get('device')}, commit "
            f"{(git.get('commit') or 'unknown')[:12]}, {earlier.get('date_utc')}.")


def markdown(results: Results, env: dict) -> str:
    config = results.config
    unit, factor = throughput_unit(config.mode)
    git = env["git"]
    commit = (git["commit"] or "unknown")[:12] + (" (dirty)" if git["dirty"] else "")
    versions = f"torch {env['torch']}, triton {env['triton']}"
    if env["cuda"]:
        versions += f", CUDA {env['cuda']}, cuDNN {env['cudnn']}"
    lines = [
        f"# flashattn benchmark ({config.mode.upper()})",
        "",
        f"{env['device']}; {versions}; commit {commit}; {env['date_utc']}."
        + _merged_note(env),
        "",
        f"Throughput in {unit} (higher is better), from median times; FLOPs: forward "
        "4·B·H·N²·D, halved when causal, backward 2.5 × forward. Fastest in **bold**; "
        "`-` skipped (O(N²) memory), `err` failed (see below).",
        "",
    ]
    headers = KEY_HEADERS + results.names + [f"{SUBJECT} / best peer", "best peer", SPREAD_HEADER]
    table_rows = []
    for row in results.rows:
        fastest = _fastest(row)
        cells = [f"**{_cell(row.results.get(n), factor)}**" if n == fastest
                 else _cell(row.results.get(n), factor) for n in results.names]
        table_rows.append(_key_cells(row) + cells + [_ratio(row), row.best_peer() or "-", _spread(row)])
    lines += markdown_table(headers, table_rows, right=set(range(4, len(headers) - 2)) | {len(headers) - 1})
    for note in _noise_notes(results) if results.rows else []:
        lines += ["", note]

    if results.memory_rows:
        case = results.memory_rows[0].case
        lines += ["", f"Peak extra memory of one forward + backward in MiB (B={case.batch}, "
                      f"H={case.nheads}, D={case.headdim}, {'causal' if case.causal else 'full'}, "
                      f"{case.dtype}; includes dq, dk, dv):", ""]
        memory_rows = [[format_seqlen(row.case.seqlen)]
                       + [_memory_cell(row.results.get(n)) for n in results.memory_names]
                       for row in results.memory_rows]
        lines += markdown_table(["seqlen"] + results.memory_names, memory_rows,
                                 right=set(range(len(results.memory_names) + 1)))
    elif config.memory_note:
        lines += ["", f"Memory section skipped: {config.memory_note}"]

    problems = failures(results)
    if problems or config.unavailable:
        lines += ["", "Failures and missing implementations:", ""]
        lines += [f"- {name} ({n} case{'s' if n > 1 else ''}): `{message}`"
                  for name, message, n in problems]
        lines += [f"- {name}: not measured (`{reason}`)"
                  for name, reason in config.unavailable.items()]
    return "\n".join(lines) + "\n"


def write_markdown(results: Results, env: dict, path: Path) -> None:
    path.write_text(markdown(results, env))
