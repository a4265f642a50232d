"""Speed: forward + backward time against sequence length, plain and with dropout and a padding mask
(the paper's Fig. 3 setting), ours beside standard attention and SDPA, with the speedups.

Each cell is one call `attention(q, k, v).backward(dout)` timed by the suite (measure.time_row: on a
GPU, do_bench medians in interleaved rounds, L2 flushed; on a CPU, perf_counter medians). The batch
keeps the tokens fixed (batch = tokens / N, at least 1); an implementation that runs out of memory at
one length is not tried at longer ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from flashattn.bench import measure
from flashattn.bench.cases import MEMORY_PASS, Case
from flashattn.bench.measure import Measurement
from flashattn.bench.paper import common
from flashattn.bench.paper.common import FIG3, NAMES, OURS, PLAIN, SDPA, STANDARD
from flashattn.bench.report import markdown_table

KEY = "speed"
TITLE = "Faster than standard attention"
CLAIM = ("Forward + backward, dropout and masking included, FlashAttention is 2-4x faster than standard "
         "attention (PyTorch) over sequence lengths 128 to 64k on an A100 (Fig. 3, left; Section 4.3: up to 3x "
         "faster than the PyTorch implementation), although it does more FLOPs (the backward recomputes S and P).")
GPU_ONLY = None


@dataclass(frozen=True)
class Sizes:
    dtype: str
    nheads: int
    headdim: int
    tokens: int                 # batch = max(1, tokens // seqlen)
    seqlens: tuple[int, ...]
    dropout_p: float
    rounds: int


GPU = Sizes("bf16", nheads=16, headdim=64, tokens=16384,
            seqlens=(128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536), dropout_p=0.1, rounds=3)
CPU = Sizes("fp32", nheads=2, headdim=32, tokens=256, seqlens=(64, 128, 256), dropout_p=0.1, rounds=1)


def sizes_for(ctx: common.Context) -> Sizes:
    sizes = GPU if ctx.gpu else CPU
    if ctx.options.get("speed_seqlens"):
        from dataclasses import replace
        sizes = replace(sizes, seqlens=tuple(ctx.options["speed_seqlens"]))
    return sizes


def run(ctx: common.Context) -> dict:
    sizes = sizes_for(ctx)
    timer = measure.cuda_timer if ctx.gpu else measure.cpu_timer
    rows = []
    for variant in (PLAIN, FIG3):
        peers = common.peers(variant, sizes.dropout_p)
        cases = [Case(sizes.dtype, max(1, sizes.tokens // n), sizes.nheads, n, sizes.headdim, False, MEMORY_PASS)
                 for n in sizes.seqlens]
        # Untimed: compiles, cuBLAS and cuDNN plans, clocks settled (the suite's warm-up pass).
        measure.time_row(peers, cases[0], ctx.device, timer)
        out_of_memory: dict[str, int] = {}
        for case in cases:
            ctx.log(f"{variant} N={common.seq(case.seqlen)} B={case.batch}")
            active = [p for p in peers if p.name not in out_of_memory]
            results = measure.time_row(active, case, ctx.device, timer, sizes.rounds) if active else {}
            for name, m in results.items():
                if m.status == "oom":
                    out_of_memory[name] = case.seqlen
            for name, first in out_of_memory.items():
                results.setdefault(name, Measurement("skipped", error=f"out of memory from N={common.seq(first)}"))
            rows.append({"variant": variant, "seqlen": case.seqlen, "batch": case.batch,
                         "results": {name: results[name].as_dict() for name in NAMES}})
    return {"sizes": asdict(sizes), "rows": rows,
            "timing": ("do_bench medians of interleaved rounds, L2 flushed (measure.py)" if ctx.gpu
                       else "perf_counter medians (measure.py)")}


def speedup(row: dict, over: str) -> float | None:
    """`over`'s time / ours (> 1: ours is faster)."""
    return common.over_ours(row["results"], over, "ms")


def markdown(data: dict, env: dict) -> str:
    sizes = data["sizes"]
    lines = [f"Measured: {sizes['dtype']}, H={sizes['nheads']}, d={sizes['headdim']}, non-causal, batch = "
             f"{sizes['tokens']} / N (at least 1); dropout+padding: dropout {sizes['dropout_p']} and a key-padding "
             "mask (lengths uniform in [N/2, N]) in all three. Time of one forward + backward in ms "
             f"({data['timing']}); speedup = their time / ours.", ""]
    headers = ["variant", "N", "B"] + [f"{n} ms" for n in NAMES] + ["standard / ours", "SDPA / ours"]
    table = [[row["variant"], common.seq(row["seqlen"]), str(row["batch"])]
             + [common.cell(row["results"][n], "ms", common.ms) for n in NAMES]
             + [common.times(speedup(row, STANDARD)), common.times(speedup(row, SDPA))] for row in data["rows"]]
    lines += markdown_table(headers, table, right=set(range(1, len(headers))))
    lines += ["", f"![forward + backward time and speedup]({KEY}.png)", ""]

    fig3 = [r for r in data["rows"] if r["variant"] == FIG3]
    plain = [r for r in data["rows"] if r["variant"] == PLAIN]
    std_fig3 = [(r["seqlen"], speedup(r, STANDARD)) for r in fig3 if speedup(r, STANDARD)]
    std_plain = [speedup(r, STANDARD) for r in plain if speedup(r, STANDARD)]
    sdpa_by = {v: [speedup(r, SDPA) for r in rows if speedup(r, SDPA)] for v, rows in ((PLAIN, plain), (FIG3, fig3))}
    oom = {r["seqlen"] for r in fig3 if r["results"][STANDARD].get("status") in ("oom", "skipped")
           and "memory" in r["results"][STANDARD].get("error", "")}
    text = "**Measured figure**: "
    if std_fig3:
        best_n, best = max(std_fig3, key=lambda p: p[1])
        text += (f"standard attention's time over ours (above 1: ours is faster) is "
                 f"{common.range_text([s for _, s in std_fig3])} with dropout and padding (the most, "
                 f"{common.times(best)}, at N={common.seq(best_n)}) and {common.range_text(std_plain)} plain. ")
    else:
        text += "standard attention ran in no cell beside ours. "
    if oom:
        text += f"Standard attention runs out of memory from N={common.seq(min(oom))}, ours runs to " \
                f"N={common.seq(max(r['seqlen'] for r in fig3 if r['results'][OURS].get('status') == 'ok'))}. "
    if any(sdpa_by.values()):
        text += "SDPA's time over ours (below 1: SDPA is faster) is " + " and ".join(
            f"{common.range_text(v)} {name}" for name, v in sdpa_by.items() if v) + "."
    median = sorted(s for _, s in std_fig3)[len(std_fig3) // 2] if std_fig3 else None
    differ = ("**Where they differ and why**: the median speedup over standard attention with dropout and padding is "
              f"{common.times(median)}, {common.compare(median, 2, 4, 'range')}. " if median else
              "**Where they differ and why**: ")
    cost = _option_cost(plain, fig3)
    if cost:
        n, ours, sdpa = cost
        differ += (f"Dropout and the padding mask cost ours more than SDPA: at N={common.seq(n)} ours takes "
                   f"{common.times(ours)} its plain time with them, SDPA {common.times(sdpa)}. Our Hopper kernels take "
                   "neither option, so such a call runs on our portable kernels, which also draw the dropout mask from "
                   "Philox in the forward and again in the backward (benchmarks/TUNING.md); the speedup over standard "
                   "attention shrinks by as much. ")
    differ += common.hardware_paragraph(env.get("device", "?"), env.get("device_type", "cpu")) + " " + common.SOFTWARE
    if env.get("device_type") == "cuda":
        differ += (" At short N the call is too small to fill the GPU and time goes to launches (standard attention "
                   "runs several kernels, ours one or two per pass), so the ratio there measures host overhead more "
                   "than IO.")
    return "\n".join(lines + [text, "", differ]) + "\n"


def _option_cost(plain: list[dict], fig3: list[dict]) -> tuple[int, float, float] | None:
    """(N, ours' dropout+padding time over its plain time, SDPA's) at the longest N where both ran
    both variants."""
    def ms(row: dict, name: str) -> float | None:
        result = row["results"][name]
        return result.get("ms") if result.get("status") == "ok" else None

    plain_at = {r["seqlen"]: r for r in plain}
    found = []
    for r in fig3:
        p = plain_at.get(r["seqlen"])
        ratio = {name: ms(r, name) / ms(p, name) for name in (OURS, SDPA) if p and ms(r, name) and ms(p, name)}
        if len(ratio) == 2:
            found.append((r["seqlen"], ratio[OURS], ratio[SDPA]))
    return max(found) if found else None


def _draw_times(ax, rows: list[dict], title: str) -> None:
    from flashattn.bench import plots
    colors = plots.colors_for(list(NAMES))
    for name in NAMES:
        pts = [(r["seqlen"], r["results"][name]["ms"]) for r in rows if r["results"][name].get("status") == "ok"]
        if pts:
            plots.line(ax, common.LABELS[name], *zip(*pts), colors[name], subject=name == OURS)
    plots.seqlen_axis(ax, [r["seqlen"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("fwd + bwd ms (log)")
    ax.set_title(title, fontsize=9)


def _draw_speedup(ax, rows: list[dict]) -> None:
    from flashattn.bench import plots
    colors = plots.colors_for(list(NAMES))
    for variant, style in ((PLAIN, "--"), (FIG3, "-")):
        for over in (STANDARD, SDPA):
            pts = [(r["seqlen"], speedup(r, over)) for r in rows if r["variant"] == variant and speedup(r, over)]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", markersize=3, color=colors[over],
                        label=f"{over} / ours, {variant}")
    ax.axhspan(2, 4, color="tab:green", alpha=0.1, label="paper: 2-4x over standard")
    ax.axhline(1, color="gray", linewidth=0.8)
    plots.seqlen_axis(ax, sorted({r["seqlen"] for r in rows}))
    ax.set_yscale("log", base=2)
    ax.set_ylabel("speedup of ours (log; above 1: ours is faster)")
    ax.set_title("Speedup (their time / ours)", fontsize=9)
    ax.legend(fontsize=7)


def plot(data: dict, out: Path) -> list[str]:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, variant in zip(axes, (PLAIN, FIG3)):
        _draw_times(ax, [r for r in data["rows"] if r["variant"] == variant], f"Forward + backward, {variant}")
    axes[0].legend(fontsize=8)
    _draw_speedup(axes[2], data["rows"])
    return common.save(fig, out, KEY)


def panel(ax, data: dict) -> None:
    _draw_speedup(ax, data["rows"])
    ax.set_title("Speed: fwd + bwd speedup of ours", fontsize=9)
