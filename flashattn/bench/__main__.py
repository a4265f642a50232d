"""python -m flashattn.bench: time flashattn against the other attention implementations.

On a CUDA GPU: the FlashAttention-2 paper's grid (bf16, 16k tokens, model dim 2048) against torch
SDPA's backends, FlexAttention, FlashAttention-4 and flash-attn (where importable) and standard
attention, plus peak memory; `--merge` joins an earlier run's bench.json (a grid measured in parts).
Without one: a small float32 CPU comparison of flashattn's PyTorch path, standard attention and
torch SDPA. Writes bench.json, summary.md, tflops.png and memory.png to --out.

python -m flashattn.bench paper [--help]: the FlashAttention paper's claims, measured against standard
attention and torch SDPA, into one report (flashattn/bench/paper/).

python -m flashattn.bench ring [--help]: ring attention over W processes (W GPUs, or gloo on the CPU)
against the per-rank kernels and torch's context_parallel (flashattn/bench/ring.py).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.markup import escape

from flashattn.bench import cases, measure, panels, peers, report, suite


def _csv(convert: Callable[[str], object], choices: tuple[str, ...] | None = None):
    """An argparse type: 'a,b,c' -> [convert(a), convert(b), convert(c)]."""
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if choices is not None:
            unknown = [item for item in items if item not in choices]
            if unknown:
                raise argparse.ArgumentTypeError(
                    f"unknown {', '.join(unknown)} (choose from {', '.join(choices)})")
        try:
            return [convert(item) for item in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    all_peers = list(dict.fromkeys(peers.names("gpu") + peers.names("cpu")))
    parser = argparse.ArgumentParser(
        prog="python -m flashattn.bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_argument_group("grid (defaults: the GPU or the CPU grid, see above)")
    grid.add_argument("--seqlens", type=_csv(cases.parse_seqlen), metavar="LIST",
                      help="sequence lengths, e.g. 512,1k,16k")
    grid.add_argument("--head-dims", type=_csv(int), metavar="LIST", help="e.g. 64,128,256")
    grid.add_argument("--dtypes", type=_csv(str, tuple(cases.DTYPES)), metavar="LIST",
                      help="bf16, fp16, fp32 (GPU default bf16, CPU default fp32)")
    grid.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    grid.add_argument("--passes", type=_csv(str, cases.PASSES), metavar="LIST",
                      help="fwd, bwd (default both)")
    grid.add_argument("--quick", action="store_true",
                      help="a small subset (GPU: head dim 64,128, seqlen 1k,4k,16k; memory at "
                           "16k,64k. CPU: seqlen 256,1k)")
    parser.add_argument("--peers", type=_csv(str, tuple(all_peers)), metavar="LIST",
                        help="implementations to compare with flashattn (always run). GPU: "
                             f"{', '.join(peers.names('gpu')[1:])}; CPU: "
                             f"{', '.join(peers.names('cpu')[1:])}. Default: all usable")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="peak-memory section (default: on with a GPU; needs CUDA)")
    parser.add_argument("--memory-seqlens", type=_csv(cases.parse_seqlen), metavar="LIST",
                        help="memory section sequence lengths (default 1k,4k,16k,64k,128k)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="output directory (default: bench-out/)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNGs")
    parser.add_argument("--merge", type=Path, metavar="BENCH_JSON",
                        help="join an earlier run's bench.json (same --peers and device kind) into this "
                             "run's tables, JSON and plots: a grid measured in parts, one per process")
    parser.add_argument("--render", type=Path, metavar="BENCH_JSON",
                        help="measure nothing: write the tables and plots of a bench.json's grid and memory "
                             "section to --out (on any machine)")
    parser.add_argument("--cpu", action="store_true",
                        help="run the CPU comparison even when a GPU is present")
    group = parser.add_argument_group(
        "option panels (flashattn/bench/panels.py): flashattn with the option beside dense attention")
    group.add_argument("--block-sparse", action="store_true",
                        help="block-sparse time at density 1, 0.5, 0.25, 0.1 (GPU: bf16, hdim 128, "
                             "seqlen 16k; CPU: tiny) -> block_sparse.png")
    group.add_argument("--sparse-pattern", choices=panels.PATTERNS, default="random",
                        help="random blocks (the same count per row) or local + global (default random)")
    group.add_argument("--sparse-seqlen", type=cases.parse_seqlen, metavar="N",
                        help="sequence length of the block-sparse panel (GPU default 16k)")
    group.add_argument("--window", action="store_true",
                        help="sliding-window time vs seqlen, beside dense (GPU: 2k..32k) -> window.png")
    group.add_argument("--window-size", type=_csv(int), metavar="L,R",
                        help="the window (default 256,256 on GPU, 32,32 on CPU; R=0 is causal)")
    group.add_argument("--window-seqlens", type=_csv(cases.parse_seqlen), metavar="LIST",
                        help="sequence lengths of the window panel")
    group.add_argument("--varlen", action="store_true",
                       help="a packed batch of random sequence lengths (flash_attn_varlen_func) beside the "
                            "dense call on as many tokens")
    group.add_argument("--decode", action="store_true",
                       help="one query token against a KV cache (flash_attn_with_kvcache), contiguous and "
                            "paged, beside SDPA cuDNN and FlashAttention-4: us per step and K/V TB/s")
    group.add_argument("--decode-kv-heads", type=_csv(int), metavar="LIST", help="decode panel: KV heads (GPU 8,32)")
    group.add_argument("--decode-batches", type=_csv(int), metavar="LIST", help="decode panel: batch sizes (GPU 1,16,64)")
    group.add_argument("--decode-caches", type=_csv(cases.parse_seqlen), metavar="LIST",
                       help="decode panel: cache lengths (GPU 1k,8k,32k,128k)")
    group.add_argument("--decode-layouts", type=_csv(str), metavar="LIST",
                       help="decode panel: contiguous, paged-<page size> (GPU contiguous,paged-16,paged-256)")
    group.add_argument("--no-grid", dest="grid", action="store_false",
                        help="skip the main grid and the memory section (only the option panels)")
    args = parser.parse_args(argv)
    if args.window_size is not None and (len(args.window_size) != 2 or min(args.window_size) < -1):
        parser.error("--window-size takes two ints >= -1, e.g. 256,256 or 1024,0")
    return args


def build_panels(args: argparse.Namespace, gpu: bool, device: torch.device) -> panels.Panels:
    """The option panels asked for (none: an empty Panels)."""
    chosen = panels.Panels(mode="gpu" if gpu else "cpu", device=device)
    if args.block_sparse:
        sparse = panels.GPU_SPARSE if gpu else panels.CPU_SPARSE
        chosen.sparse = replace(sparse, pattern=args.sparse_pattern,
                                seqlen=args.sparse_seqlen or sparse.seqlen)
    if args.window:
        window = panels.GPU_WINDOW if gpu else panels.CPU_WINDOW
        chosen.window = replace(window, seqlens=tuple(args.window_seqlens or window.seqlens),
                                window=tuple(args.window_size or window.window))
    if args.varlen:
        chosen.varlen = panels.GPU_VARLEN if gpu else panels.CPU_VARLEN
    if args.decode:
        decode = panels.decode_panel.GPU_DECODE if gpu else panels.decode_panel.CPU_DECODE
        chosen.decode = replace(decode, kv_heads=tuple(args.decode_kv_heads or decode.kv_heads),
                                batches=tuple(args.decode_batches or decode.batches),
                                caches=tuple(args.decode_caches or decode.caches),
                                layouts=tuple(args.decode_layouts or decode.layouts))
    return chosen


def build_config(args: argparse.Namespace, gpu: bool) -> suite.Config:
    mode = "gpu" if gpu else "cpu"
    if gpu:
        base = cases.GPU_QUICK if args.quick else cases.GPU_GRID
    else:
        base = cases.CPU_QUICK if args.quick else cases.CPU_GRID
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    grid = base.override(
        seqlens=tuple(args.seqlens) if args.seqlens else None,
        head_dims=tuple(args.head_dims) if args.head_dims else None,
        dtypes=tuple(args.dtypes) if args.dtypes else None,
        passes=tuple(args.passes) if args.passes else None,
        causal=causal)

    chosen, unavailable = peers.available(mode, args.peers)

    memory, memory_note = None, ""
    if not gpu:
        memory_note = "it measures peak CUDA memory, and no GPU is in use"
    elif not args.grid:
        memory_note = "--no-grid"
    elif args.memory is False:
        memory_note = "--no-memory"
    else:
        memory = cases.MEMORY_QUICK if args.quick else cases.MEMORY_GRID
        if args.memory_seqlens:
            memory = cases.MemoryGrid(seqlens=tuple(args.memory_seqlens))
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    return suite.Config(mode=mode, device=device, grid=grid, peers=chosen,
                        unavailable=unavailable, memory=memory, memory_note=memory_note)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["paper"]:
        from flashattn.bench.paper import cli
        return cli.main(argv[1:])
    if argv[:1] == ["ring"]:
        from flashattn.bench import ring
        return ring.main(argv[1:])
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))  # logs: don't squeeze the tables
    if args.render is not None:
        return render(args, console)
    gpu = torch.cuda.is_available() and not args.cpu

    if gpu:
        console.print(f"GPU: {torch.cuda.get_device_name()} - timing with triton do_bench, "
                      f"{measure.GPU_ROUNDS} interleaved rounds per case.")
    else:
        reason = "--cpu given" if args.cpu else "No CUDA GPU found"
        console.print(f"[bold yellow]{reason}: running the CPU comparison[/] (flashattn's PyTorch "
                      "path vs standard attention vs torch SDPA, perf_counter medians). "
                      "The memory section needs a GPU and is skipped.")
    config = build_config(args, gpu)
    earlier = earlier_env = None
    if args.merge is not None:   # checked before measuring: a mismatch found after would waste the run
        earlier, earlier_env = suite.load(args.merge)
        problem = suite.merge_problem(earlier, config)
        if problem:
            console.print(f"[bold red]--merge {args.merge}: {problem}[/]")
            return 2
    if args.peers:
        wrong_mode = [p for p in args.peers if p not in peers.names(config.mode)]
        if wrong_mode:
            console.print(f"[yellow]Ignoring peers not available in {config.mode.upper()} mode: "
                          f"{', '.join(wrong_mode)}[/]")
    for name, reason in config.unavailable.items():
        console.print(f"[dim]{name} not measured: {escape(reason)}[/]")
    option_panels = build_panels(args, gpu, config.device)
    if args.grid:
        console.print(f"{len(config.grid.cases())} cases x {len(config.peers)} implementations "
                      f"({', '.join(p.name for p in config.peers)}).")
        results = suite.run(config, console)
    else:
        results = suite.Results(config, [], [])
    option_panels = panels.run(option_panels, console)

    args.out.mkdir(parents=True, exist_ok=True)
    env = report.environment(config.device)
    if earlier is not None:
        results = suite.merge(results, earlier)
        env["merged_from"] = earlier_env
    if args.grid:
        report.print_report(results, console)
    panels.print_panels(option_panels, console)
    written = [args.out / "bench.json", args.out / "summary.md"]
    report.write_json(results, env, written[0])
    panels.extend_json(option_panels, written[0])
    report.write_markdown(results, env, written[1])
    with written[1].open("a") as summary:
        summary.write(panels.markdown(option_panels))
    if args.plots:
        from flashattn.bench import plots  # matplotlib only when plotting
        written += plots.write_plots(results, args.out)
        written += panels.write_plots(option_panels, args.out)
    console.print(f"\nWrote {', '.join(str(p) for p in written)}")
    return 0


def render(args: argparse.Namespace, console: Console) -> int:
    """--render: the tables and plots of a bench.json's grid and memory section, nothing measured."""
    results, env = suite.load(args.render)
    args.out.mkdir(parents=True, exist_ok=True)
    report.print_report(results, console)
    written = [args.out / "summary.md"]
    report.write_markdown(results, env, written[0])
    if args.plots:
        from flashattn.bench import plots  # matplotlib only when plotting
        written += plots.write_plots(results, args.out)
    console.print(f"\nWrote {', '.join(str(p) for p in written)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
