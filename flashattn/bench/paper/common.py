"""What the paper's sections share: the run's context, the three implementations compared (with the
paper's Fig. 3 options: dropout and a key-padding mask), and the report's number formats and hardware
facts."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console

from flashattn import flash_attn_func
from flashattn.bench.cases import Case, format_seqlen
from flashattn.bench.peers import SUBJECT, Peer, standard_attention

Tensor = torch.Tensor

OURS, STANDARD, SDPA = SUBJECT, "standard", "sdpa"
NAMES = (OURS, STANDARD, SDPA)           # the order of every table and legend
LABELS = {OURS: "flashattn (ours)", STANDARD: "standard attention", SDPA: "torch SDPA"}
PLAIN, FIG3 = "plain", "dropout+padding"  # the two variants of the memory and speed sections


class Skip(Exception):
    """A section that cannot run here: the report marks it skipped with this reason."""


@dataclass
class Context:
    mode: str                 # "gpu" or "cpu"
    device: torch.device
    console: Console
    out: Path
    options: dict             # the command line's section options (gpt2 steps, ...)

    @property
    def gpu(self) -> bool:
        return self.mode == "gpu"

    def log(self, text: str) -> None:
        self.console.print(f"  [dim]{text}[/]", highlight=False)


# ----------------------------------------------------------------------------- implementations

def padding_mask(batch: int, seqlen: int, device: torch.device, seed: int = 0) -> Tensor:
    """A key-padding mask (batch, seqlen), True = a real token: each sequence's length drawn
    uniformly from [seqlen / 2, seqlen] (seeded), padding at the end, as a padded batch has."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seqlen // 2), seqlen + 1, (batch, 1), generator=g)
    return (torch.arange(seqlen)[None, :] < lengths).to(device)


def attention_fn(name: str, case: Case, device: torch.device, dropout_p: float = 0.0,
                 padding: bool = False) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """`name`'s attention for `case` (ours in (B, N, H, D), standard and SDPA in (B, H, N, D)), with
    dropout and a key-padding mask (padding=True: padding_mask's, as a bool mask in every one, so all
    three do the same work over the padded length)."""
    mask = padding_mask(case.batch, case.seqlen, device) if padding else None
    causal = case.causal
    if name == OURS:
        bias = mask[:, None, None, :] if mask is not None else None
        return lambda q, k, v: flash_attn_func(q, k, v, dropout_p, causal=causal, attn_bias=bias)
    if name == STANDARD:
        return lambda q, k, v: standard_attention(q, k, v, causal, dropout_p, mask)
    if name == SDPA:
        allowed = mask[:, None, None, :] if mask is not None else None
        if allowed is not None and causal:
            allowed = allowed & torch.ones(case.seqlen, case.seqlen, dtype=torch.bool, device=device).tril()
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p,
                                                              is_causal=causal and allowed is None)
    raise ValueError(f"unknown implementation {name!r} (choose from {', '.join(NAMES)})")


def peers(variant: str = PLAIN, dropout_p: float = 0.1) -> list[Peer]:
    """The three implementations as the suite's Peers (measure.time_row, measure.peak_memory):
    plain, or the Fig. 3 variant (dropout `dropout_p` and a key-padding mask)."""
    fig3 = variant == FIG3
    p = dropout_p if fig3 else 0.0

    def build(name):
        return lambda case, device: attention_fn(name, case, device, p, fig3)
    return [Peer(name, "bnhd" if name == OURS else "bhnd", build(name), description=LABELS[name])
            for name in NAMES]


# ----------------------------------------------------------------------------- formats

def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2 ** 20:,.0f}" if n >= 2 ** 20 else f"{n / 2 ** 20:.2f}"


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x" if x < 100 else f"{x:,.0f}x"


def sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def seq(n: int) -> str:
    return format_seqlen(n)


def status_cell(result: dict) -> str:
    """A cell for a result that did not produce a number."""
    return {"oom": "OOM", "skipped": "-", "error": "err"}.get(result.get("status"), "-")


def over_ours(results: dict, other: str, field: str) -> float | None:
    """results[other][field] / results[ours][field] when both measured: their time or memory over ours
    (> 1: ours is faster or smaller)."""
    mine, theirs = results.get(OURS, {}), results.get(other, {})
    if mine.get("status") == "ok" and theirs.get("status") == "ok" and mine.get(field):
        return theirs[field] / mine[field]
    return None


def cell(result: dict, field: str, fmt: Callable[[float], str]) -> str:
    """A table cell: the measured field, formatted, or what happened instead."""
    return fmt(result[field]) if result.get("status") == "ok" else status_cell(result)


def save(fig, out: Path, key: str, dpi: int = 110) -> list[str]:
    """Write a section's figure to out/<key>.png and close it; the names written."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(out / f"{key}.png", dpi=dpi)
    plt.close(fig)
    return [f"{key}.png"]


def range_text(values: list[float], fmt: Callable[[float], str] = times) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt(lo) if math.isclose(lo, hi, rel_tol=0.005) else f"{fmt(lo)} to {fmt(hi)}"


def log_slope(xs: list[float], ys: list[float]) -> float | None:
    """The least-squares slope of log y against log x: 1 = linear growth, 2 = quadratic."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(points) < 2:
        return None
    mx = statistics.fmean(p[0] for p in points)
    my = statistics.fmean(p[1] for p in points)
    var = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / var if var else None


def compare(ratio: float | None, lo: float, hi: float, what: str) -> str:
    """'within / above / below the paper's lo-hi x' for a measured ratio."""
    if ratio is None:
        return f"not measured, so not comparable with the paper's {lo:g}-{hi:g}x {what}"
    if ratio < lo:
        return f"below the paper's {lo:g}-{hi:g}x {what}"
    if ratio > hi:
        return f"above the paper's {lo:g}-{hi:g}x {what}"
    return f"within the paper's {lo:g}-{hi:g}x {what}"


# ----------------------------------------------------------------------------- hardware

# name: (HBM bandwidth B/s, dense 16-bit tensor FLOP/s, on-chip SRAM per SM bytes, SMs). The paper ran an
# A100 (40 GB: 1.555 TB/s; it quotes 1.5-2.0 TB/s for the 40 and 80 GB parts, 192 KB of SRAM per SM).
GPUS = {
    "A100": (1.555e12, 312e12, 192 * 1024, 108),
    "H100": (3.35e12, 989e12, 256 * 1024, 132),
    "H200": (4.8e12, 989e12, 256 * 1024, 132),
}


def gpu_facts(device_name: str) -> tuple[str, tuple] | None:
    """(the known GPU's short name, its facts) for a device name, or None."""
    for short, facts in GPUS.items():
        if short in device_name:
            return short, facts
    return None


def hardware_paragraph(device_name: str, device_type: str) -> str:
    """How this device compares with the paper's A100: the ratio of compute to memory bandwidth
    decides whether standard attention's extra HBM traffic costs time."""
    if device_type != "cuda":
        return (f"This run is on a CPU ({device_name}) at tiny sizes: it shows the report is produced and the "
                "code paths agree, not the paper's GPU figures. On a CPU there is no small fast SRAM beside a "
                "large slow HBM in the paper's sense, and flashattn runs its PyTorch path.")
    a100 = GPUS["A100"]
    found = gpu_facts(device_name)
    if found is None:
        return (f"This run is on {device_name}; the paper's A100 has {a100[0] / 1e12:.2f} TB/s of HBM bandwidth "
                f"and {a100[1] / 1e12:.0f} TFLOP/s of fp16 tensor throughput.")
    short, (bw, flops, sram, sms) = found
    if short == "A100":
        return f"This run is on an A100 ({device_name}), the paper's GPU."
    return (f"This run is on an {short} ({device_name}): {bw / 1e12:.2f} TB/s of HBM bandwidth and "
            f"{flops / 1e12:.0f} TFLOP/s of dense bf16/fp16 tensor throughput against the paper's A100 (40 GB) at "
            f"{a100[0] / 1e12:.2f} TB/s and {a100[1] / 1e12:.0f} TFLOP/s: {bw / a100[0]:.1f}x the bandwidth and "
            f"{flops / a100[1]:.1f}x the compute, so {flops / bw:.0f} FLOPs per HBM byte against "
            f"{a100[1] / a100[0]:.0f}. Standard attention's softmax and masking stay bound by memory on both, and "
            f"the balance between compute and traffic is about the same; each SM has {sram // 1024} KB of on-chip "
            f"SRAM (L1 and shared memory) against {a100[2] // 1024} KB, {sms} SMs against {a100[3]}.")


SOFTWARE = ("The paper's baseline was PyTorch's attention of 2022 (matmul, softmax, matmul, each result written "
            "to HBM); standard attention here is the same three steps on today's PyTorch and cuBLAS. torch SDPA, "
            "which did not exist then, is itself IO-aware: on a GPU it dispatches to FlashAttention-2, cuDNN's "
            "fused attention or the memory-efficient kernel, so ours against SDPA compares two implementations "
            "of the paper's idea, not the idea against its baseline.")
