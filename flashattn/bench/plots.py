"""PNG figures: throughput vs sequence length (tflops.png) and peak memory (memory.png)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from flashattn.bench.cases import format_seqlen  # noqa: E402
from flashattn.bench.measure import MAX_RERUNS, NOISE_LIMIT  # noqa: E402
from flashattn.bench.peers import SUBJECT  # noqa: E402
from flashattn.bench.report import results_device, throughput_unit  # noqa: E402
from flashattn.bench.suite import Results  # noqa: E402


def colors_for(names: list[str]) -> dict[str, str]:
    """flashattn in black; every other implementation keeps one colour in every panel."""
    palette = plt.get_cmap("tab10").colors
    others = [name for name in names if name != SUBJECT]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(others)}
    colors[SUBJECT] = "black"
    return colors


def seqlen_axis(ax, seqlens: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqlens)
    ax.set_xticklabels([format_seqlen(n) for n in seqlens])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("sequence length")
    ax.grid(True, alpha=0.3)


def line(ax, label: str, xs: list[int], ys: list[float], color, subject: bool) -> None:
    ax.plot(xs, ys, marker="o", markersize=4, label=label, color=color,
            linewidth=2.5 if subject else 1.5, zorder=3 if subject else 2)


NOISY_LABEL = f"noisy (rounds spread > {NOISE_LIMIT:.0%} after {MAX_RERUNS} reruns)"


def mark_noisy(ax, points: list[tuple[float, float]], color, marker: str = "o") -> None:
    """Draw the noisy points of a line hollow (a white face over the line's filled marker), and give
    the axes one grey legend entry for them."""
    if not points:
        return
    ax.plot(*zip(*points), linestyle="none", marker=marker, markersize=7, markerfacecolor="white",
            markeredgecolor=color, markeredgewidth=1.5, zorder=4)
    if NOISY_LABEL not in ax.get_legend_handles_labels()[1]:
        ax.plot([], [], linestyle="none", marker="o", markersize=7, markerfacecolor="white",
                markeredgecolor="tab:gray", markeredgewidth=1.5, label=NOISY_LABEL)


def plot_throughput(results: Results, path: Path) -> None:
    """One panel per (dtype, head dim, causal, pass): throughput vs seqlen per implementation."""
    unit, factor = throughput_unit(results.config.mode)
    panel_rows = list(dict.fromkeys((r.case.dtype, r.case.headdim) for r in results.rows))
    panel_cols = list(dict.fromkeys((r.case.causal, r.case.pass_) for r in results.rows))
    colors = colors_for(results.names)
    fig, axes = plt.subplots(len(panel_rows), len(panel_cols), squeeze=False,
                             figsize=(4.2 * len(panel_cols), 3.2 * len(panel_rows) + 0.8))

    for i, (dtype, headdim) in enumerate(panel_rows):
        for j, (causal, pass_) in enumerate(panel_cols):
            ax = axes[i][j]
            rows = [r for r in results.rows if r.case.group == (dtype, headdim, causal, pass_)]
            if not rows:
                ax.axis("off")
                continue
            for name in results.names:
                cells = [(r.case.seqlen, r.results[name]) for r in rows
                         if name in r.results and r.results[name].ok]
                if cells:
                    line(ax, name, *zip(*[(x, m.tflops * factor) for x, m in cells]), colors[name],
                          subject=name == SUBJECT)
                    mark_noisy(ax, [(x, m.tflops * factor) for x, m in cells if m.noisy], colors[name])
            seqlen_axis(ax, sorted({r.case.seqlen for r in rows}))
            ax.set_ylim(bottom=0)
            ax.set_ylabel(unit)
            ax.set_title(f"hdim {headdim}, {'causal' if causal else 'non-causal'}, {pass_} "
                         f"({dtype})", fontsize=10)

    _legend_and_title(fig, axes, f"Attention {unit} vs sequence length - "
                                 f"{results_device(results)}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(results: Results, path: Path) -> None:
    """Peak extra memory of one forward + backward vs seqlen, log-log; OOM points are left out."""
    names = results.memory_names
    colors = colors_for(names)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name in names:
        points = [(r.case.seqlen, r.results[name].peak_bytes / 2 ** 20)
                  for r in results.memory_rows if name in r.results and r.results[name].ok]
        oom = [r.case.seqlen for r in results.memory_rows
               if name in r.results and r.results[name].status == "oom"]
        if points:
            label = name + (f" (OOM from {format_seqlen(min(oom))})" if oom else "")
            line(ax, label, *zip(*points), colors[name], subject=name == SUBJECT)
    seqlen_axis(ax, [r.case.seqlen for r in results.memory_rows])
    ax.set_yscale("log")
    ax.set_ylabel("peak extra memory (MiB)")
    case = results.memory_rows[0].case
    ax.set_title(f"fwd + bwd memory, B={case.batch} H={case.nheads} D={case.headdim} "
                 f"{'causal' if case.causal else 'non-causal'} {case.dtype}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _legend_and_title(fig, axes, title: str) -> None:
    """One legend for the whole figure, from every panel (a peer may be missing from some)."""
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.suptitle(title, fontsize=11)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 8),
               frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))  # 0.45 inch for the legend


def write_plots(results: Results, out: Path) -> list[Path]:
    written = []
    if results.rows:
        plot_throughput(results, out / "tflops.png")
        written.append(out / "tflops.png")
    if results.memory_rows:
        plot_memory(results, out / "memory.png")
        written.append(out / "memory.png")
    return written
