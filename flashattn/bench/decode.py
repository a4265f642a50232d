"""The decode panel: one new query token against a KV cache, the step a language model repeats for
every token it generates. Memory-bound: the figure of merit is the bandwidth of reading K and V
(their bytes / time), beside the copy ceiling of the device.

Each cell (KV heads, batch, cache length, cache layout) times flashattn's flash_attn_with_kvcache,
flashattn's dense flash_attn_func on the same cache (the path Hugging Face models and SDPA users
decode through), torch SDPA's cuDNN backend (GQA native, enable_gqa=True) and FlashAttention-4 where
it is importable, in the same process. Every implementation is timed inside a CUDA graph of
GRAPH_CALLS calls, so the figure is the GPU's time per step, not the host's (a decode loop that
cares runs in a CUDA graph: flash_attn_with_kvcache reads no device value while one is captured);
a replay of the graph is one round of measure.time_rounds (median, spread, reruns of a noisy cell),
the implementations of a cell interleaved round by round. On the CPU each implementation is timed as
the grid's cells are.
Paged cells: a block table of random pages; the peers' figures there are those of the contiguous
cache of the same shape (timed once, in the contiguous row).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from rich.table import Table

from flashattn import flash_attn_func, flash_attn_with_kvcache
from flashattn.bench import measure
from flashattn.bench.cases import DTYPES, format_seqlen
from flashattn.bench.measure import Measurement

Tensor = torch.Tensor
GRAPH_CALLS = 20      # calls captured per graph
ROUNDS = 7            # graph replays timed per attempt (measure.time_rounds)


@dataclass(frozen=True)
class DecodeConfig:
    dtype: str
    nheads: int
    headdim: int
    kv_heads: tuple[int, ...]
    batches: tuple[int, ...]
    caches: tuple[int, ...]
    layouts: tuple[str, ...]          # "contiguous" or "paged-<page size>"
    max_cache_gb: float               # cells whose K + V exceed this are skipped


GPU_DECODE = DecodeConfig("bf16", nheads=32, headdim=128, kv_heads=(8, 32), batches=(1, 16, 64),
                          caches=(1024, 8192, 32768, 131072), layouts=("contiguous", "paged-16", "paged-256"),
                          max_cache_gb=40.0)
CPU_DECODE = DecodeConfig("fp32", nheads=4, headdim=32, kv_heads=(1,), batches=(1, 2), caches=(256,),
                          layouts=("contiguous", "paged-16"), max_cache_gb=1.0)
PEERS = ("flashattn kvcache", "flashattn dense", "SDPA cuDNN", "FlashAttention-4")
SUBJECT = PEERS[0]
OURS = PEERS[:2]


@dataclass
class DecodeRow:
    kv_heads: int
    batch: int
    cache: int
    layout: str
    kv_bytes: int
    timings: dict[str, Measurement] = field(default_factory=dict)   # ms per step; absent: not run here

    @property
    def us(self) -> dict[str, float | None]:
        """Microseconds per step of each implementation run (None: it failed)."""
        return {n: m.ms * 1e3 if m.ok else None for n, m in self.timings.items()}

    @property
    def errors(self) -> dict[str, str]:
        return {n: m.error or m.status for n, m in self.timings.items() if not m.ok}

    def tb_s(self, name: str) -> float | None:
        us = self.us.get(name)
        return self.kv_bytes / (us * 1e-6) / 1e12 if us else None

    def best_peer(self) -> str | None:
        peers = [(us, n) for n, us in self.us.items() if n not in OURS and us]
        return min(peers)[1] if peers else None

    def ratio(self) -> float | None:
        """flashattn kvcache's speed over the best peer's (> 1: faster)."""
        best, ours = self.best_peer(), self.us.get(SUBJECT)
        return self.us[best] / ours if best and ours else None

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "timings"}
        d["us"], d["errors"] = self.us, self.errors
        d["timings"] = {n: m.as_dict() for n, m in self.timings.items()}
        d["tb_s"] = {n: self.tb_s(n) for n in self.us}
        d["best_peer"], d["ours_over_best_peer"] = self.best_peer(), self.ratio()
        return d


def _time(calls: dict[str, Callable[[], object]], device: torch.device) -> dict[str, Measurement]:
    """Milliseconds per call of each implementation of one cell, their rounds interleaved
    (measure.time_rounds): on CUDA a round is one replay of a graph of GRAPH_CALLS calls, every
    graph captured before the first round, so that a disturbance in time (clocks recovering from
    the previous cell, the host) falls on every implementation alike rather than on the first one
    timed; elsewhere the grid's CPU timing. An implementation that fails to run or be captured fails
    its entry only."""
    if device.type != "cuda":
        timer, rounds = measure.timing(device)
        return measure.time_prepared({name: ([fn], []) for name, fn in calls.items()}, timer, rounds)
    results: dict[str, Measurement] = {}
    replays: dict[str, Callable[[], float]] = {}
    graphs = []
    for name, fn in calls.items():
        graph, failure = measure.attempt(lambda: _capture(fn))
        if failure is not None:
            results[name] = failure
            torch.cuda.synchronize()
            continue
        graphs.append(graph)
        replays[name] = lambda graph=graph: _replay(graph)
    results.update(measure.time_rounds(replays, ROUNDS))
    del graphs
    return {name: results[name] for name in calls}


def _capture(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of GRAPH_CALLS calls of fn, after three outside it (compile, allocate, warm up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    return graph


def _replay(graph: torch.cuda.CUDAGraph) -> float:
    """One round: ms per call over one replay."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / GRAPH_CALLS


def _fa4():
    try:
        from flash_attn.cute import flash_attn_func as fa4
    except Exception as exc:             # not installed, or its CUDA toolchain missing
        return None, f"{type(exc).__name__}: {exc}"
    return fa4, None


def _cell(cfg: DecodeConfig, kv_heads: int, batch: int, cache: int, layout: str, device: torch.device,
          fa4) -> DecodeRow:
    dtype = DTYPES[cfg.dtype]
    h, d = cfg.nheads, cfg.headdim
    kv_bytes = 2 * batch * cache * kv_heads * d * torch.finfo(dtype).bits // 8
    row = DecodeRow(kv_heads, batch, cache, layout, kv_bytes)
    q = torch.randn(batch, 1, h, d, dtype=dtype, device=device)
    k = torch.randn(batch, cache, kv_heads, d, dtype=dtype, device=device)
    v = torch.randn_like(k)

    calls: dict[str, Callable[[], object]] = {}

    def add(name: str, make: Callable[[], Callable[[], object]]) -> None:
        """An implementation's call, made up front (a failure there fails its entry)."""
        call, failure = measure.attempt(make)
        if failure is not None:
            row.timings[name] = failure
        else:
            calls[name] = call

    if layout == "contiguous":
        add(SUBJECT, lambda: lambda: flash_attn_with_kvcache(q, k, v))
        add("flashattn dense", lambda: lambda: flash_attn_func(q, k, v))
    else:
        page = int(layout.split("-")[1])
        blocks = cache // page
        table = torch.randperm(batch * blocks, device=device).reshape(batch, blocks).to(torch.int32)
        pool_k = torch.empty(batch * blocks, page, kv_heads, d, dtype=dtype, device=device)
        pool_k[table.long()] = k.view(batch, blocks, page, kv_heads, d)
        pool_v = torch.empty_like(pool_k)
        pool_v[table.long()] = v.view(batch, blocks, page, kv_heads, d)
        del k, v
        seqlens = torch.full((batch,), cache, dtype=torch.int32, device=device)
        add(SUBJECT, lambda: lambda: flash_attn_with_kvcache(q, pool_k, pool_v, cache_seqlens=seqlens,
                                                             block_table=table))
    if layout == "contiguous" and device.type == "cuda":
        def sdpa():
            from torch.nn.attention import SDPBackend, sdpa_kernel
            qt, kt, vt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()

            def call():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
            return call
        add("SDPA cuDNN", sdpa)
        if fa4 is not None:
            add("FlashAttention-4", lambda: lambda: fa4(q, k, v))
    row.timings.update(_time(calls, device))
    calls.clear()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return row


def run_decode(cfg: DecodeConfig, device: torch.device, progress: Callable[[str], None]) -> list[DecodeRow]:
    fa4, _ = _fa4() if device.type == "cuda" else (None, None)
    rows = []
    elem = torch.finfo(DTYPES[cfg.dtype]).bits // 8
    for kv_heads in cfg.kv_heads:
        for batch in cfg.batches:
            for cache in cfg.caches:
                if 2 * batch * cache * kv_heads * cfg.headdim * elem > cfg.max_cache_gb * 1e9:
                    continue
                contiguous = None
                for layout in cfg.layouts:
                    progress(f"kv heads {kv_heads}, batch {batch}, cache {format_seqlen(cache)}, {layout}")
                    row = _cell(cfg, kv_heads, batch, cache, layout, device, fa4)
                    if layout == "contiguous":
                        contiguous = row
                    elif contiguous is not None:
                        # The peers read a contiguous cache of the same shape: timed once, in that row.
                        row.timings.update({n: m for n, m in contiguous.timings.items() if n not in OURS})
                    rows.append(row)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


def title(cfg: DecodeConfig) -> str:
    return (f"Decode, one query token against a KV cache: us per step (K/V read TB/s) - {cfg.dtype} "
            f"H={cfg.nheads} D={cfg.headdim}, CUDA-graph timed")


def _cell_text(row: DecodeRow, name: str) -> str:
    us = row.us.get(name, None)
    if name not in row.us:
        return "-"
    if us is None:
        return "err"
    tb = row.tb_s(name)
    text = f"{us:.1f}{measure.noise_mark(row.timings[name])}"
    return f"{text} ({tb:.2f})" if tb is not None and tb >= 0.01 else text


def table(cfg: DecodeConfig, rows: list[DecodeRow]) -> Table:
    t = Table(title=title(cfg), title_justify="left")
    for header in ("kv heads", "batch", "cache", "layout", *PEERS, "ours / best peer"):
        t.add_column(header, justify="right")
    for r in rows:
        ratio = r.ratio()
        t.add_row(str(r.kv_heads), str(r.batch), format_seqlen(r.cache), r.layout,
                  *(_cell_text(r, n) for n in PEERS), "-" if ratio is None else f"{ratio:.2f}x")
    return t


def markdown(cfg: DecodeConfig, rows: list[DecodeRow]) -> str:
    lines = ["", title(cfg) + ":", "",
             "| kv heads | batch | cache | layout | " + " | ".join(PEERS) + " | ours / best peer |",
             "| ---: | ---: | ---: | :--- | " + " | ".join("---:" for _ in PEERS) + " | ---: |"]
    for r in rows:
        ratio = r.ratio()
        lines.append(f"| {r.kv_heads} | {r.batch} | {format_seqlen(r.cache)} | {r.layout} | "
                     + " | ".join(_cell_text(r, n) for n in PEERS)
                     + f" | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    errors = sorted({f"{n}: {e}" for r in rows for n, e in r.errors.items()})
    lines += [""] + [f"- err {e}" for e in errors[:10]]
    return "\n".join(lines) + "\n"


def to_json(cfg: DecodeConfig, rows: list[DecodeRow]) -> dict:
    return {"config": asdict(cfg), "graph_calls": GRAPH_CALLS, "rounds": ROUNDS,
            "rows": [r.as_dict() for r in rows]}
