"""The options' panels (python -m flashattn.bench --block-sparse --window): what skipping tiles buys.

block-sparse  forward and backward time of flashattn with a block mask of density 1.0, 0.5, 0.25 and
              0.1 beside dense attention on the same shape. GPU: bf16, head dim 128, seqlen 16k,
              16k tokens per batch (B=1) and model dim 2048 (H=16), blocks of 128, non-causal. Each
              query block attends to round(density * n_blocks) key blocks drawn at random (the same
              count per row, so every program has the same work), or the local + global pattern of
              flashattn.sparse with about that density. Time should fall in proportion to density.
window        forward and backward time of a sliding window (default (256, 256); (1024, 0) is causal)
              against dense attention over seqlen 2k to 32k at B=1, H=16, head dim 128, bf16. Dense
              time grows like seqlen^2, the window's like seqlen: the table shows the time per 1k
              tokens, flat for the window.

varlen        forward and backward TFLOP/s of a packed batch (flash_attn_varlen_func) of random
              sequence lengths (GPU: 64 to 8k tokens, 16k tokens in all, bf16, head dim 128, H=16)
              beside the dense call on the same number of tokens in sequences of one length (4k),
              causal or not: packing should cost nothing beyond the real work. FLOPs are counted
              per sequence (4 H n^2 D each, halved when causal; backward 2.5x).

CPU mode runs the same panels at tiny sizes on the PyTorch path (which skips the same tiles). Every
cell is timed as the grid's are (measure.time_prepared: rounds, their spread, reruns of a noisy cell);
a noisy one is marked `~N%` in the tables and hollow in the plots.
Results go to the terminal, to bench.json (keys "block_sparse", "window" and "varlen"), to
summary.md and to block_sparse.png / window.png.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from flashattn import BlockMask, flash_attn_func, flash_attn_varlen_func, local_global_block_mask
from flashattn.bench import decode as decode_panel
from flashattn.bench import measure
from flashattn.bench.cases import DTYPES, format_seqlen
from flashattn.bench.measure import Measurement
from flashattn.sparse import num_blocks

Tensor = torch.Tensor
DENSITIES = (1.0, 0.5, 0.25, 0.1)
PATTERNS = ("random", "local_global")


@dataclass(frozen=True)
class SparseConfig:
    dtype: str
    batch: int
    nheads: int
    headdim: int
    seqlen: int
    block_size: int
    densities: tuple[float, ...] = DENSITIES
    pattern: str = "random"
    causal: bool = False


@dataclass(frozen=True)
class WindowConfig:
    dtype: str
    batch: int
    nheads: int
    headdim: int
    seqlens: tuple[int, ...]
    window: tuple[int, int] = (256, 256)


@dataclass(frozen=True)
class VarlenConfig:
    dtype: str
    nheads: int
    headdim: int
    total: int                   # tokens in the packed batch
    min_len: int                 # sequence lengths drawn uniformly from [min_len, max_len]
    max_len: int
    dense_seqlen: int            # the dense call's sequence length (total / dense_seqlen sequences)
    seed: int = 0


def varlen_lengths(cfg: VarlenConfig) -> list[int]:
    """Random lengths in [min_len, max_len] (seeded) summing to total; the last is what remains."""
    g = torch.Generator().manual_seed(cfg.seed)
    lengths = []
    while sum(lengths) < cfg.total:
        n = int(torch.randint(cfg.min_len, cfg.max_len + 1, (1,), generator=g))
        lengths.append(min(n, cfg.total - sum(lengths)))
    return lengths


GPU_SPARSE = SparseConfig("bf16", batch=1, nheads=16, headdim=128, seqlen=16384, block_size=128)
CPU_SPARSE = SparseConfig("fp32", batch=1, nheads=2, headdim=32, seqlen=512, block_size=64)
GPU_WINDOW = WindowConfig("bf16", batch=1, nheads=16, headdim=128, seqlens=(2048, 4096, 8192, 16384, 32768))
CPU_WINDOW = WindowConfig("fp32", batch=1, nheads=2, headdim=32, seqlens=(256, 512, 1024), window=(32, 32))
GPU_VARLEN = VarlenConfig("bf16", nheads=16, headdim=128, total=16384, min_len=64, max_len=8192, dense_seqlen=4096)
CPU_VARLEN = VarlenConfig("fp32", nheads=2, headdim=32, total=512, min_len=16, max_len=128, dense_seqlen=128)


@dataclass
class SparseRow:
    density: float               # the requested density (1.0 = every block listed)
    actual_density: float        # the block mask's
    pass_: str
    sparse: Measurement
    dense: Measurement

    def speedup(self) -> float | None:
        if self.sparse.ms and self.dense.ms:
            return self.dense.ms / self.sparse.ms
        return None

    def as_dict(self) -> dict:
        return {"density": self.density, "actual_density": self.actual_density, "pass": self.pass_,
                "block_sparse": self.sparse.as_dict(), "dense": self.dense.as_dict(),
                "dense_over_block_sparse": self.speedup()}


@dataclass
class WindowRow:
    seqlen: int
    pass_: str
    window: Measurement
    dense: Measurement

    def as_dict(self) -> dict:
        ratio = self.dense.ms / self.window.ms if self.dense.ms and self.window.ms else None
        return {"seqlen": self.seqlen, "pass": self.pass_, "window": self.window.as_dict(),
                "dense": self.dense.as_dict(), "dense_over_window": ratio}


@dataclass
class VarlenRow:
    causal: bool
    pass_: str
    varlen: Measurement
    dense: Measurement
    varlen_flops: float
    dense_flops: float
    torch_varlen: Measurement     # torch.nn.attention.varlen.varlen_attn on the same packed batch

    def tflops(self, t: Measurement, flops: float) -> float | None:
        return flops / (t.ms * 1e-3) / 1e12 if t.ms else None

    def as_dict(self) -> dict:
        ours, dense = self.tflops(self.varlen, self.varlen_flops), self.tflops(self.dense, self.dense_flops)
        peer = self.tflops(self.torch_varlen, self.varlen_flops)
        return {"causal": self.causal, "pass": self.pass_, "varlen": self.varlen.as_dict(),
                "dense": self.dense.as_dict(), "torch_varlen_attn": self.torch_varlen.as_dict(),
                "varlen_tflops": ours, "dense_tflops": dense, "torch_varlen_attn_tflops": peer,
                "varlen_over_dense_tflops": ours / dense if ours and dense else None,
                "varlen_over_torch_varlen_attn": ours / peer if ours and peer else None}


@dataclass
class Panels:
    mode: str
    device: torch.device
    sparse: SparseConfig | None = None
    sparse_rows: list[SparseRow] = field(default_factory=list)
    window: WindowConfig | None = None
    window_rows: list[WindowRow] = field(default_factory=list)
    varlen: VarlenConfig | None = None
    varlen_rows: list[VarlenRow] = field(default_factory=list)
    decode: decode_panel.DecodeConfig | None = None
    decode_rows: list[decode_panel.DecodeRow] = field(default_factory=list)


# ----------------------------------------------------------------------------- measuring

def random_block_mask(nq: int, nk: int, density: float, block_size: int, device, seed: int = 0,
                      ) -> BlockMask:
    """Each query block attends to round(density * nk) key blocks (at least one), drawn at random."""
    g = torch.Generator().manual_seed(seed)
    per_row = max(1, min(nk, round(density * nk)))
    order = torch.rand(nq, nk, generator=g).argsort(dim=1)[:, :per_row]
    mask = torch.zeros(nq, nk, dtype=torch.bool).scatter_(1, order, True)
    return BlockMask.from_dense(mask.to(device), block_size)


def local_global_mask(seqlen: int, density: float, block_size: int, device) -> BlockMask:
    """The local + global pattern (one global block) whose band width gives the density closest to
    the one asked for."""
    n = num_blocks(seqlen, block_size)
    r = torch.arange(n)[:, None]
    c = torch.arange(n)[None, :]

    def density_of(local: int) -> float:
        return (((r - c).abs() <= local) | (c < 1) | (r < 1)).float().mean().item()

    local = min(range(n), key=lambda w: abs(density_of(w) - density))
    return local_global_block_mask(seqlen, seqlen, local_blocks=local, global_blocks=1,
                                   block_size=block_size, device=device)


def _time(fn: Callable[[Tensor, Tensor, Tensor], Tensor], shape: tuple[int, ...], dtype: torch.dtype,
          pass_: str, device: torch.device, timing: tuple[measure.Timer, int]) -> Measurement:
    """fn's forward (on inputs requiring grad) or its backward, timed as the grid's cells are
    (measure.time_prepared: warm-up, rounds, reruns of a noisy cell)."""
    def prepare():
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        if pass_ == "fwd":
            return [lambda: fn(q, k, v)], [q, k, v]
        out = fn(q, k, v)
        grad = torch.randn_like(out)
        return [lambda: out.backward(grad, retain_graph=True)], [q, k, v]

    prepared, result = measure.attempt(prepare)      # out of memory, a kernel that cannot run here
    if result is None:
        timer, rounds = timing
        result = measure.time_prepared({"": prepared}, timer, rounds)[""]
    del prepared
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return result


def run_sparse(cfg: SparseConfig, device: torch.device, timing: tuple[measure.Timer, int],
               progress: Callable[[str], None]) -> list[SparseRow]:
    dtype = DTYPES[cfg.dtype]
    shape = (cfg.batch, cfg.seqlen, cfg.nheads, cfg.headdim)
    n = num_blocks(cfg.seqlen, cfg.block_size)

    def dense(q, k, v):
        return flash_attn_func(q, k, v, causal=cfg.causal)

    dense_ms = {}
    for pass_ in ("fwd", "bwd"):
        progress(f"dense {pass_}")
        dense_ms[pass_] = _time(dense, shape, dtype, pass_, device, timing)
    rows = []
    for density in cfg.densities:
        if cfg.pattern == "random":
            bm = random_block_mask(n, n, density, cfg.block_size, device)
        else:
            bm = local_global_mask(cfg.seqlen, density, cfg.block_size, device)

        def sparse(q, k, v, bm=bm):
            return flash_attn_func(q, k, v, causal=cfg.causal, block_mask=bm)

        for pass_ in ("fwd", "bwd"):
            progress(f"density {density} {pass_}")
            rows.append(SparseRow(density, bm.density(), pass_,
                                  _time(sparse, shape, dtype, pass_, device, timing), dense_ms[pass_]))
    return rows


def run_window(cfg: WindowConfig, device: torch.device, timing: tuple[measure.Timer, int],
               progress: Callable[[str], None]) -> list[WindowRow]:
    dtype = DTYPES[cfg.dtype]
    causal = cfg.window[1] == 0

    def windowed(q, k, v):
        return flash_attn_func(q, k, v, causal=causal, window_size=cfg.window)

    def dense(q, k, v):
        return flash_attn_func(q, k, v, causal=causal)

    rows = []
    for seqlen in cfg.seqlens:
        shape = (cfg.batch, seqlen, cfg.nheads, cfg.headdim)
        for pass_ in ("fwd", "bwd"):
            progress(f"seqlen {format_seqlen(seqlen)} {pass_}")
            rows.append(WindowRow(seqlen, pass_, _time(windowed, shape, dtype, pass_, device, timing),
                                  _time(dense, shape, dtype, pass_, device, timing)))
    return rows


def _attention_flops(lengths: list[int], cfg: VarlenConfig, causal: bool, pass_: str) -> float:
    forward = sum(4.0 * cfg.nheads * n * n * cfg.headdim for n in lengths) / (2 if causal else 1)
    return forward * (2.5 if pass_ == "bwd" else 1.0)


def run_varlen(cfg: VarlenConfig, device: torch.device, timing: tuple[measure.Timer, int],
               progress: Callable[[str], None]) -> list[VarlenRow]:
    dtype = DTYPES[cfg.dtype]
    lengths = varlen_lengths(cfg)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    dense_lengths = [cfg.dense_seqlen] * (cfg.total // cfg.dense_seqlen)
    rows = []
    for causal in (False, True):
        def packed(q, k, v, causal=causal):
            return flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal)

        def dense(q, k, v, causal=causal):
            return flash_attn_func(q, k, v, causal=causal)

        peer = _torch_varlen(cu, max(lengths), causal)

        for pass_ in ("fwd", "bwd"):
            progress(f"{'causal' if causal else 'non-causal'} {pass_}")
            rows.append(VarlenRow(
                causal, pass_, _time(packed, (cfg.total, cfg.nheads, cfg.headdim), dtype, pass_, device, timing),
                _time(dense, (len(dense_lengths), cfg.dense_seqlen, cfg.nheads, cfg.headdim), dtype, pass_, device,
                      timing),
                _attention_flops(lengths, cfg, causal, pass_), _attention_flops(dense_lengths, cfg, causal, pass_),
                _time(peer, (cfg.total, cfg.nheads, cfg.headdim), dtype, pass_, device, timing) if callable(peer)
                else Measurement("skipped", error=peer)))
    return rows


def _torch_varlen(cu: Tensor, longest: int, causal: bool):
    """torch.nn.attention.varlen.varlen_attn on the packed batch (a function), or why it cannot run
    (a str): it needs torch >= 2.10 and a CUDA device. Older releases take is_causal, newer ones a
    window ((-1, 0) is causal)."""
    if cu.device.type != "cuda":
        return "torch's varlen_attn runs on CUDA only"
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        return f"torch {torch.__version__} has no varlen_attn ({exc})"
    import inspect
    params = inspect.signature(varlen_attn).parameters
    kw = ({"window_size": (-1, 0) if causal else (-1, -1)} if "window_size" in params
          else {"is_causal": causal})
    return lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest, **kw)


def run(panels: Panels, console: Console) -> Panels:
    timing = measure.timing(panels.device)
    torch.manual_seed(0)
    with console.status("") as status:
        if panels.sparse is not None:
            panels.sparse_rows = run_sparse(panels.sparse, panels.device, timing,
                                            lambda text: status.update(f"block-sparse: {text}"))
        if panels.window is not None:
            panels.window_rows = run_window(panels.window, panels.device, timing,
                                            lambda text: status.update(f"window: {text}"))
        if panels.varlen is not None:
            panels.varlen_rows = run_varlen(panels.varlen, panels.device, timing,
                                            lambda text: status.update(f"varlen: {text}"))
        if panels.decode is not None:
            panels.decode_rows = decode_panel.run_decode(panels.decode, panels.device,
                                                         lambda text: status.update(f"decode: {text}"))
    return panels


# ----------------------------------------------------------------------------- reporting

def _ms(t: Measurement) -> str:
    return f"{t.ms:.3f}{measure.noise_mark(t)}" if t.ms is not None else "err"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _sparse_title(cfg: SparseConfig) -> str:
    return (f"Block-sparse vs dense, ms (lower is better) - {cfg.dtype} B={cfg.batch} H={cfg.nheads} "
            f"D={cfg.headdim} N={format_seqlen(cfg.seqlen)} blocks of {cfg.block_size}, {cfg.pattern} "
            f"{'causal' if cfg.causal else 'non-causal'}")


def _window_title(cfg: WindowConfig) -> str:
    return (f"Sliding window {cfg.window} vs dense, ms (lower is better) - {cfg.dtype} B={cfg.batch} "
            f"H={cfg.nheads} D={cfg.headdim}")


def _varlen_title(cfg: VarlenConfig) -> str:
    return (f"Packed batch (varlen) vs dense, TFLOP/s (higher is better) - {cfg.dtype} H={cfg.nheads} "
            f"D={cfg.headdim}, {cfg.total} tokens: {len(varlen_lengths(cfg))} sequences of {cfg.min_len} to "
            f"{cfg.max_len} tokens against {cfg.total // cfg.dense_seqlen} of {cfg.dense_seqlen}")


def _tflops(x: float | None, t: Measurement) -> str:
    """TFLOP/s from the timing t (marked when t is noisy)."""
    return "err" if x is None else (f"{x:.1f}" if x >= 1 else f"{x:.4f}") + measure.noise_mark(t)


def varlen_table(panels: Panels) -> Table:
    table = Table(title=_varlen_title(panels.varlen), title_justify="left")
    for header in ("causal", "pass", "varlen ms", "dense ms", "varlen TFLOP/s", "dense TFLOP/s", "varlen / dense",
                   "torch varlen_attn TFLOP/s", "varlen / torch"):
        table.add_column(header, justify="right")
    for row in panels.varlen_rows:
        d = row.as_dict()
        table.add_row("yes" if row.causal else "no", row.pass_, _ms(row.varlen), _ms(row.dense),
                      _tflops(d["varlen_tflops"], row.varlen), _tflops(d["dense_tflops"], row.dense),
                      _ratio(d["varlen_over_dense_tflops"]), _tflops(d["torch_varlen_attn_tflops"], row.torch_varlen),
                      _ratio(d["varlen_over_torch_varlen_attn"]))
    return table


def sparse_table(panels: Panels) -> Table:
    table = Table(title=_sparse_title(panels.sparse), title_justify="left")
    for header in ("density", "actual", "pass", "block-sparse", "dense", "dense / sparse", "ideal"):
        table.add_column(header, justify="right")
    for row in panels.sparse_rows:
        table.add_row(f"{row.density:g}", f"{row.actual_density:.3f}", row.pass_, _ms(row.sparse),
                      _ms(row.dense), _ratio(row.speedup()), _ratio(1 / row.actual_density))
    return table


def window_table(panels: Panels) -> Table:
    table = Table(title=_window_title(panels.window), title_justify="left")
    for header in ("seqlen", "pass", "window", "dense", "window ms / 1k tok", "dense ms / 1k tok",
                   "dense / window"):
        table.add_column(header, justify="right")
    for row in panels.window_rows:
        def per_k(t: Measurement, row=row) -> str:
            return f"{t.ms * 1024 / row.seqlen:.4f}{measure.noise_mark(t)}" if t.ms is not None else "err"

        d = row.as_dict()
        table.add_row(format_seqlen(row.seqlen), row.pass_, _ms(row.window), _ms(row.dense), per_k(row.window),
                      per_k(row.dense), _ratio(d["dense_over_window"]))
    return table


def _timings(panels: Panels) -> list[Measurement]:
    """Every timed cell of the block-sparse, window and varlen panels (the decode panel's are in its
    rows' `timings`)."""
    return ([t for r in panels.sparse_rows for t in (r.sparse, r.dense)]
            + [t for r in panels.window_rows for t in (r.window, r.dense)]
            + [t for r in panels.varlen_rows for t in (r.varlen, r.dense, r.torch_varlen)])


def _any_noisy(panels: Panels) -> bool:
    return any(t.noisy for t in _timings(panels)) or any(
        m.noisy for r in panels.decode_rows for m in r.timings.values())


def print_panels(panels: Panels, console: Console) -> None:
    for rows, make in ((panels.sparse_rows, sparse_table), (panels.window_rows, window_table),
                       (panels.varlen_rows, varlen_table)):
        if rows:
            console.print()
            console.print(make(panels))
    if panels.decode_rows:
        console.print()
        console.print(decode_panel.table(panels.decode, panels.decode_rows))
    if _any_noisy(panels):
        console.print(measure.NOISE_FOOTNOTE.replace("`", ""))
    errors = {t.error for t in _timings(panels) if t.error}
    errors |= {f"{n}: {e}" for r in panels.decode_rows for n, e in r.errors.items()}
    for error in sorted(errors):
        console.print(f"[red]err[/]: {error}")


def to_json(panels: Panels) -> dict:
    out = {}
    if panels.sparse is not None:
        out["block_sparse"] = {"config": asdict(panels.sparse),
                               "rows": [row.as_dict() for row in panels.sparse_rows]}
    if panels.window is not None:
        out["window"] = {"config": asdict(panels.window),
                         "rows": [row.as_dict() for row in panels.window_rows]}
    if panels.varlen is not None:
        out["varlen"] = {"config": asdict(panels.varlen), "lengths": varlen_lengths(panels.varlen),
                         "rows": [row.as_dict() for row in panels.varlen_rows]}
    if panels.decode is not None:
        out["decode"] = decode_panel.to_json(panels.decode, panels.decode_rows)
    return out


def extend_json(panels: Panels, path: Path) -> None:
    """Add the panels to bench.json (written by report.write_json) under their own keys."""
    data = json.loads(path.read_text())
    data.update(to_json(panels))
    path.write_text(json.dumps(data, indent=2) + "\n")


def markdown(panels: Panels) -> str:
    lines = []
    if panels.sparse_rows:
        lines += ["", _sparse_title(panels.sparse) + ":", "",
                  "| density | actual | pass | block-sparse | dense | dense / sparse |",
                  "| ---: | ---: | :--- | ---: | ---: | ---: |"]
        lines += [f"| {r.density:g} | {r.actual_density:.3f} | {r.pass_} | {_ms(r.sparse)} | {_ms(r.dense)} | "
                  f"{_ratio(r.speedup())} |" for r in panels.sparse_rows]
    if panels.window_rows:
        lines += ["", _window_title(panels.window) + ":", "",
                  "| seqlen | pass | window | dense | dense / window |", "| ---: | :--- | ---: | ---: | ---: |"]
        lines += [f"| {format_seqlen(r.seqlen)} | {r.pass_} | {_ms(r.window)} | {_ms(r.dense)} | "
                  f"{_ratio(r.as_dict()['dense_over_window'])} |" for r in panels.window_rows]
    if panels.varlen_rows:
        lines += ["", _varlen_title(panels.varlen) + ":", "",
                  "| causal | pass | varlen ms | dense ms | varlen TFLOP/s | dense TFLOP/s | varlen / dense | "
                  "torch varlen_attn TFLOP/s | varlen / torch |",
                  "| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in panels.varlen_rows:
            d = r.as_dict()
            lines.append(f"| {'yes' if r.causal else 'no'} | {r.pass_} | {_ms(r.varlen)} | {_ms(r.dense)} | "
                         f"{_tflops(d['varlen_tflops'], r.varlen)} | {_tflops(d['dense_tflops'], r.dense)} | "
                         f"{_ratio(d['varlen_over_dense_tflops'])} | "
                         f"{_tflops(d['torch_varlen_attn_tflops'], r.torch_varlen)} | "
                         f"{_ratio(d['varlen_over_torch_varlen_attn'])} |")
    text = "\n".join(lines) + "\n" if lines else ""
    if panels.decode_rows:
        text += decode_panel.markdown(panels.decode, panels.decode_rows)
    if _any_noisy(panels):
        text += "\n" + measure.NOISE_FOOTNOTE + "\n"
    return text


def write_plots(panels: Panels, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    from flashattn.bench.plots import mark_noisy

    def save(fig, ax, title: str, path: Path) -> Path:
        """The panels' common finish: grid, two-line title, legend, PNG."""
        ax.grid(True, alpha=0.3)
        ax.set_title(title.replace(" - ", "\n"), fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    written = []
    styles = {"fwd": "o-", "bwd": "s--"}
    if panels.sparse_rows:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        for pass_ in ("fwd", "bwd"):
            rows = [r for r in panels.sparse_rows if r.pass_ == pass_ and r.sparse.ms is not None]
            if not rows:
                continue
            ax.plot([r.actual_density for r in rows], [r.sparse.ms for r in rows], styles[pass_], color="black",
                    label=f"block-sparse {pass_}")
            mark_noisy(ax, [(r.actual_density, r.sparse.ms) for r in rows if r.sparse.noisy], "black",
                       styles[pass_][0])
            if rows[0].dense.ms is not None:
                dense = rows[0].dense.ms
                ax.axhline(dense, color="tab:red", linestyle=":" if pass_ == "fwd" else "-.",
                           label=f"dense {pass_}" + (" (noisy)" if rows[0].dense.noisy else ""))
                xs = [0.0, 1.0]
                ax.plot(xs, [0.0, dense], color="tab:gray", linewidth=0.8, alpha=0.6,
                        label="proportional to density" if pass_ == "fwd" else None)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("block density")
        ax.set_ylabel("ms")
        written.append(save(fig, ax, _sparse_title(panels.sparse), out / "block_sparse.png"))
    if panels.window_rows:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        seqlens = sorted({r.seqlen for r in panels.window_rows})
        for pass_ in ("fwd", "bwd"):
            rows = [r for r in panels.window_rows if r.pass_ == pass_]
            for label, get, color in (("window", lambda r: r.window, "black"), ("dense", lambda r: r.dense, "tab:red")):
                points = [(r.seqlen, get(r).ms) for r in rows if get(r).ms is not None]
                if points:
                    ax.plot(*zip(*points), styles[pass_], color=color, label=f"{label} {pass_}")
                    mark_noisy(ax, [(r.seqlen, get(r).ms) for r in rows if get(r).noisy], color, styles[pass_][0])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seqlens)
        ax.set_xticklabels([format_seqlen(n) for n in seqlens])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("sequence length (log)")
        ax.set_ylabel("ms (log): slope 1 = linear, 2 = quadratic")
        written.append(save(fig, ax, _window_title(panels.window), out / "window.png"))
    return written
