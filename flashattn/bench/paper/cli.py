"""python -m flashattn.bench paper: the FlashAttention paper's claims, measured on this library, beside
standard attention and torch SDPA; one section per claim, written to paper.md (with PNG plots) and
paper.json in --out.

Sections (--sections picks, in this order): exact, io, memory, speed, sparse, gpt2, layer. On a CUDA
GPU each runs at the paper's sizes (about 8 minutes in all on an H200, gpt2 the longest); on a CPU
(no GPU, or --cpu) exact, speed, sparse and gpt2 run at tiny sizes on one thread in well under a
minute, and io, memory and layer, which need a GPU, are marked skipped with the reason.

paper.json is rewritten after every section, and paper.md and the plots with it, so a run cut short
keeps what it measured. Sections already in --out's paper.json from the same device and not selected
this time are kept: `--sections gpt2` and then `--sections exact,io,memory,speed,sparse,layer` into one
--out make one report (--fresh starts over). --merge takes the measured sections of other runs'
paper.json (run on other machines or into other directories) where --out has none; --render rebuilds
paper.md and the PNGs from paper.json without measuring.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from flashattn.bench import cases
from flashattn.bench import report as bench_report
from flashattn.bench.paper import common, report
from flashattn.bench.paper.common import Skip


def _list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'empty list'} (choose from "
                                             f"{', '.join(choices)})")
        return items
    return parse


def _seqlens(text: str) -> list[int]:
    try:
        return [cases.parse_seqlen(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashattn.bench paper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", type=_list(report.KEYS), default=list(report.KEYS), metavar="LIST",
                        help=f"sections to run (default all: {','.join(report.KEYS)})")
    parser.add_argument("--skip", type=_list(report.KEYS), default=[], metavar="LIST", help="sections not to run")
    parser.add_argument("--out", type=Path, default=Path("paper-out"), help="output directory (default paper-out/)")
    parser.add_argument("--cpu", action="store_true", help="the CPU report even when a GPU is present")
    parser.add_argument("--fresh", action="store_true", help="ignore the sections of an earlier paper.json in --out")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rebuild paper.md and the PNGs from --out's paper.json")
    parser.add_argument("--merge", type=Path, action="append", default=[], metavar="PAPER_JSON",
                        help="take the measured sections of another run's paper.json where --out has none "
                             "(repeatable)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="no PNGs")
    parser.add_argument("--gpt2-steps", type=_positive, metavar="N", help="training steps per run (GPU default 300)")
    parser.add_argument("--gpt2-longest-cap", type=_positive, metavar="N",
                        help="the longest context tried at batch 1 (default 131072)")
    parser.add_argument("--speed-seqlens", type=_seqlens, metavar="LIST",
                        help="the speed section's sequence lengths (GPU default 128 to 64k)")
    return parser.parse_args(argv)


def _environment_brief(env: dict) -> dict:
    keep = ("device", "device_type", "date_utc", "git", "torch", "triton", "cuda", "cudnn", "gpu_memory_bytes",
            "l2_cache_bytes", "compute_capability")
    return {k: env.get(k) for k in keep if k in env}


def _render(results: dict, out: Path, plots: bool, keys: tuple[str, ...], console: Console) -> None:
    written = [report.write_markdown(results, out)]
    if plots:
        try:
            written = report.write_plots(results, out, keys) + written
        except Exception as exc:  # a plot must not cost the measurements
            console.print(f"[red]plotting failed[/]: {escape(repr(exc))}")
    console.print(f"  wrote {', '.join(p.name for p in written)}", highlight=False)


def merge(results: dict, paths: list[Path], console: Console) -> None:
    """Copy into `results` the measured sections of the paper.json files at `paths` that `results` has
    not measured (the first file that has one wins)."""
    for path in paths:
        other = report.load_json(path.parent if path.name == report.JSON_NAME else path)
        if other is None:
            raise SystemExit(f"--merge {path}: no paper.json of schema {report.SCHEMA_VERSION} there")
        for key, entry in other["sections"].items():
            if entry.get("status") == "ok" and results["sections"].get(key, {}).get("status") != "ok":
                entry.setdefault("environment", other["environment"])
                entry.setdefault("command", other.get("command"))
                results["sections"][key] = entry
                console.print(f"  {key}: from {path} ({entry['environment'].get('device')})", highlight=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        results = report.load_json(args.out)
        if results is None:
            console.print(f"[red]no paper.json (schema {report.SCHEMA_VERSION}) in {args.out}[/]")
            return 2
        merge(results, args.merge, console)
        report.write_json(results, args.out)
        _render(results, args.out, args.plots, report.KEYS, console)
        return 0

    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    if not gpu:
        # The CPU sizes are tiny: more threads only add synchronisation, and on a busy machine spinning
        # threads slow each call down many times over.
        torch.set_num_threads(1)
    env = bench_report.environment(device)
    previous = None if args.fresh else report.load_json(args.out)
    if previous is not None and previous["environment"].get("device") != env["device"]:
        console.print(f"[yellow]{args.out / report.JSON_NAME} was measured on {previous['environment'].get('device')}: "
                      "starting a new report[/]")
        previous = None
    results = {"schema_version": report.SCHEMA_VERSION, "environment": env,
               "command": "python -m flashattn.bench paper" + (" " + shlex.join(argv) if argv else ""),
               "sections": dict(previous["sections"]) if previous else {}}
    chosen = [key for key in args.sections if key not in args.skip]
    ctx = common.Context(mode="gpu" if gpu else "cpu", device=device, console=console, out=args.out,
                         options={"gpt2_steps": args.gpt2_steps, "gpt2_longest_cap": args.gpt2_longest_cap,
                                  "speed_seqlens": args.speed_seqlens})
    console.print(f"[bold]The FlashAttention paper's claims[/] on {env['device']} ({ctx.mode.upper()}): "
                  f"{', '.join(chosen) or 'no section'} -> {args.out}/")
    merge(results, args.merge, console)
    for key in report.KEYS:
        if key not in chosen and key not in results["sections"]:
            results["sections"][key] = {"status": "not run", "reason": "not selected (--sections / --skip)"}
    report.write_json(results, args.out)
    if args.merge:
        _render(results, args.out, args.plots, report.KEYS, console)
    began = time.perf_counter()
    failed = False
    for key in report.KEYS:
        if key not in chosen:
            continue
        section = report.BY_KEY[key]
        console.rule(f"[bold]{section.TITLE}[/] [dim]({key}, at {time.perf_counter() - began:.0f} s)[/]")
        start = time.perf_counter()
        entry = {"environment": _environment_brief(env), "command": results["command"]}
        if not gpu and section.GPU_ONLY:
            entry.update(status="skipped", reason=section.GPU_ONLY)
        else:
            try:
                torch.manual_seed(0)
                entry.update(status="ok", data=section.run(ctx))
            except Skip as exc:
                entry.update(status="skipped", reason=str(exc))
            except Exception as exc:  # one section's failure leaves the others to run
                console.print(escape(traceback.format_exc()))
                entry.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                failed = True
            finally:
                if gpu:
                    torch.cuda.empty_cache()
        entry["seconds"] = round(time.perf_counter() - start, 1)
        results["sections"][key] = entry
        report.write_json(results, args.out)
        _render(results, args.out, args.plots, (key,), console)
        what = entry["status"] if entry["status"] != "skipped" else f"skipped ({entry['reason']})"
        console.print(f"[bold]{key}[/]: {what} in {entry['seconds']:.0f} s "
                      f"(elapsed {time.perf_counter() - began:.0f} s)", highlight=False)
    console.print(f"\nReport: {args.out / report.MARKDOWN_NAME} ({time.perf_counter() - began:.0f} s)")
    return 1 if failed else 0
