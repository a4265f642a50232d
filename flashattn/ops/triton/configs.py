"""Tile shapes per GPU architecture, head dim and dtype: a table, so a new shape never waits on autotuning.

How a launch gets its tile shape (`run`):
1. The table for the GPU's architecture (sm_90's measured on Hopper, benchmarks/TUNING.md; other
   architectures start from the same shapes). Shapes for the CPU interpreter are small, so that the
   tests at tiny sequence lengths still cross several tiles and the causal diagonal.
2. If the shape does not fit the GPU (Triton raises OutOfResources: shared memory or registers), it
   steps down (fewer pipeline stages, then smaller tiles) until one does, and remembers the result:
   correct on any GPU Triton supports, tuned where a table was measured.
3. Opt-in: FLASHATTN_AUTOTUNE=1 times a handful of candidates around the table's choice the first time
   a (kernel, GPU, head dim, dtype, causal, sequence-length bucket) is seen, keeps the fastest, and
   caches it on disk ($FLASHATTN_CACHE_DIR, default ~/.cache/flashattn), so it is paid once per machine.
"""
from __future__ import annotations

import functools
import json
import math
import os
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from triton.runtime.errors import OutOfResources


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BackwardConfig:
    """The backward's programs and their shapes.

    kv          dK/dV programs: block_m query rows per step, block_n keys owned.
    q           dQ programs: block_m query rows owned, block_n keys per step.
    dk          if set, dK gets programs of its own with this shape (block_m rows per step, block_n
                keys owned) and the kv programs compute only dV: one accumulator per program instead
                of two, which lets head dim 256 use 64-key tiles and warpgroup MMA.
    one_launch  kv and q programs in one grid (needs the same warps and stages, and no dk).
    """
    kv: TileConfig
    q: TileConfig
    dk: TileConfig | None = None
    one_launch: bool = False

    def __post_init__(self):
        if self.one_launch and (self.dk is not None or (self.kv.num_warps, self.kv.num_stages)
                                != (self.q.num_warps, self.q.num_stages)):
            raise ValueError(f"one_launch needs dk=None and equal warps/stages for kv and q: {self}")


# Under TRITON_INTERPRET=1 the kernels run on CPU tensors; BLOCK_M != BLOCK_N exercises the diagonal.
INTERPRETER = TileConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
INTERPRETER_BWD = BackwardConfig(kv=INTERPRETER, q=TileConfig(16, 32, 4, 1))


def _bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


# (head dim bucket, 16-bit?, causal) -> config (benchmarks/TUNING.md, § forward-tiles). Other GPUs
# reuse them: correct everywhere, untuned elsewhere.
_FWD = {
    (64, True, False): TileConfig(128, 64, 8, 3),
    (64, True, True): TileConfig(128, 64, 8, 3),
    (128, True, False): TileConfig(128, 64, 8, 3),
    (128, True, True): TileConfig(128, 64, 8, 3),
    (256, True, False): TileConfig(128, 64, 8, 2),
    (256, True, True): TileConfig(128, 64, 8, 2),
    # fp32 runs true fp32 products (no tensor cores): small tiles keep the spills down.
    (64, False, False): TileConfig(64, 32, 4, 2),
    (64, False, True): TileConfig(64, 32, 4, 2),
    (128, False, False): TileConfig(32, 32, 4, 2),
    (128, False, True): TileConfig(32, 32, 4, 2),
    (256, False, False): TileConfig(32, 16, 4, 2),
    (256, False, True): TileConfig(32, 16, 4, 2),
}
# Backward (§ backward-tiles): the dQ programs own twice the rows of the dK/dV ones.
_T = TileConfig
_BWD = {
    (64, True, False): BackwardConfig(kv=_T(64, 64, 4, 2), q=_T(128, 64, 8, 3)),
    (64, True, True): BackwardConfig(kv=_T(64, 64, 4, 3), q=_T(128, 64, 8, 3)),
    # Head dim 128: dK/dV and dQ programs in one grid (no launch gap, and the dQ programs fill the
    # SMs as the dK/dV ones drain).
    (128, True, False): BackwardConfig(kv=_T(64, 64, 4, 2), q=_T(64, 64, 4, 2), one_launch=True),
    (128, True, True): BackwardConfig(kv=_T(64, 64, 4, 2), q=_T(64, 64, 4, 2), one_launch=True),
    (256, True, False): BackwardConfig(kv=_T(32, 64, 4, 2), q=_T(64, 32, 4, 3), dk=_T(64, 64, 4, 2)),
    (256, True, True): BackwardConfig(kv=_T(32, 64, 4, 2), q=_T(64, 32, 4, 3), dk=_T(64, 64, 4, 2)),
    (64, False, False): BackwardConfig(kv=_T(32, 64, 4, 2), q=_T(64, 32, 4, 2)),
    (64, False, True): BackwardConfig(kv=_T(32, 64, 4, 2), q=_T(64, 32, 4, 2)),
    (128, False, False): BackwardConfig(kv=_T(32, 32, 4, 2), q=_T(32, 32, 4, 2)),
    (128, False, True): BackwardConfig(kv=_T(32, 32, 4, 2), q=_T(32, 32, 4, 2)),
    (256, False, False): BackwardConfig(kv=_T(16, 32, 4, 1), q=_T(32, 16, 4, 1)),
    (256, False, True): BackwardConfig(kv=_T(16, 32, 4, 1), q=_T(32, 16, 4, 1)),
}


# Forwards up to 1k tokens per sequence run faster with 64-row query tiles (twice the programs: less
# of a tail on 132 SMs). (key) -> (up to this sequence length, shape). § forward-tiles.
_FWD_SHORT = {
    (64, True, False): (1024, TileConfig(64, 64, 4, 3)),
    (64, True, True): (1024, TileConfig(64, 64, 4, 3)),
    (128, True, False): (1024, TileConfig(64, 64, 4, 3)),
    (128, True, True): (1024, TileConfig(64, 64, 4, 3)),
}

# Backwards of head dim 64 up to these lengths (16-32 sequences of a 16k-token batch) run faster with
# 32-row steps in the dK/dV programs and 64-row dQ programs. § backward-tiles.
_BWD_SHORT = {
    (64, True, False): (512, BackwardConfig(kv=_T(32, 64, 4, 3), q=_T(64, 64, 4, 2))),
    (64, True, True): (1024, BackwardConfig(kv=_T(32, 64, 4, 3), q=_T(64, 64, 4, 2))),
}

# The warp-specialized forward (forward._attn_fwd_ws: TMA loads, a producer warp group and two
# consumer warp groups), from the length where it measured faster than _FWD's shapes (§ warp-specialized-
# forward): (key) -> (from this sequence length, shape); num_warps=4 is what the warp specialization
# needs. Tiles of the head dim's exact width (TMA): head dims 64, 128 and 256.
_FWD_WS = {
    (64, True, False): (4096, TileConfig(256, 128, 4, 2)),
    (128, True, False): (1024, TileConfig(128, 128, 4, 2)),
    (128, True, True): (2048, TileConfig(128, 128, 4, 2)),
    (256, True, False): (512, TileConfig(128, 64, 4, 2)),
    (256, True, True): (512, TileConfig(128, 64, 4, 2)),
}

# The one-pass backward (backward_sm90), from the length where it measured faster than the portable
# backward (§ one-pass-backward; on the H200, § switch-over): (head dim, causal) -> (from this length,
# and from this length with deterministic=True, or None).
_BWD_ONEPASS = {(64, False): (2048, 2048), (64, True): (4096, None),
                (128, False): (1024, 1024), (128, True): (2048, 4096),
                (256, False): (512, 512), (256, True): (512, 2048)}

# The ping-pong forward (forward_sm90), from the length where it measured faster than the kernels
# above, and persistent (one program per SM taking the next untaken tile from an atomic counter) up to
# the length where that measured faster than one program per tile (§ ping-pong-forward; on the H200,
# § switch-over). Head dim 64 runs three consumer warp groups (forward_sm90.CONSUMERS) from 8k: below,
# the warp-specialized and portable kernels measured as fast or faster.
# (head dim, causal) -> (from this sequence length, persistent up to this one or None).
_FWD_PINGPONG = {(64, False): (8192, None), (64, True): (8192, math.inf),
                 (128, False): (512, math.inf), (128, True): (1024, math.inf),
                 (256, False): (2048, None), (256, True): (1024, math.inf)}

# Tables per compute capability; an architecture without its own table uses sm_90's shapes, and
# step 2 above makes them fit. The warp-specialized kernels are for sm_90 alone (TMA, setmaxnreg).
# "*_from" tables: key -> the first sequence length at which that kernel runs (`_listed`).
_TABLES = {(9, 0): {"fwd": _FWD, "bwd": _BWD, "fwd_short": _FWD_SHORT, "bwd_short": _BWD_SHORT,
                    "fwd_ws": {key: cfg for key, (_, cfg) in _FWD_WS.items()},
                    "fwd_ws_from": {key: start for key, (start, _) in _FWD_WS.items()},
                    "fwd_pingpong_from": {key: start for key, (start, _) in _FWD_PINGPONG.items()},
                    "fwd_pingpong_persistent_to": {key: last for key, (_, last) in _FWD_PINGPONG.items()},
                    "bwd_onepass_from": {(head_dim, causal, deterministic): start
                                         for (head_dim, causal), starts in _BWD_ONEPASS.items()
                                         for deterministic, start in zip((False, True), starts) if start is not None}}}
_DEFAULT_ARCH = (9, 0)


Config = TileConfig | BackwardConfig


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    # Cached: the table lookup runs on every attention call.
    return torch.cuda.get_device_capability(index)


def sm_resources(device: torch.device) -> tuple[int, int]:
    """(SM count, shared memory bytes per SM that blocks may use) of a CUDA device: what grids of one
    program per SM and occupancy estimates are sized by."""
    return _sm_resources(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_resources(index: int) -> tuple[int, int]:
    # Cached: asked on every call.
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, getattr(props, "shared_memory_per_multiprocessor", 228 * 1024) - 1024


def _arch_tables(device: torch.device) -> dict | None:
    """The tables measured for this CUDA device's architecture, or None when it has none."""
    return _TABLES.get(_capability(device.index if device.index is not None else torch.cuda.current_device()))


def _table_config(kind: str, head_dim: int, dtype: torch.dtype, causal: bool, device: torch.device,
                  seqlen: int | None = None) -> Config:
    if device.type != "cuda":
        return INTERPRETER_BWD if kind == "bwd" else INTERPRETER
    tables = _arch_tables(device) or _TABLES[_DEFAULT_ARCH]
    key = (_bucket(head_dim), dtype != torch.float32, causal)
    short = tables.get(kind + "_short", {}).get(key)
    if short is not None and seqlen is not None and seqlen <= short[0]:
        return short[1]
    return tables[kind][key]


def _arch_entry(table: str, key: tuple, device: torch.device):
    """`key`'s entry in `table` of the CUDA device's architecture's own tables (other architectures
    do not borrow them), or None."""
    if device.type != "cuda":
        return None
    return (_arch_tables(device) or {}).get(table, {}).get(key)


def _listed(table: str, key: tuple, seqlen: int, device: torch.device) -> bool:
    """Whether the architecture's "*_from" `table` lists `key` at this sequence length."""
    start = _arch_entry(table, key, device)
    return start is not None and seqlen >= start


def warp_specialized(head_dim: int, dtype: torch.dtype, causal: bool, seqlen: int,
                     device: torch.device) -> bool:
    """Whether a plain forward of this shape runs the warp-specialized kernel ("fwd_ws"): where the
    GPU architecture's own tables have it (sm_90), for this head dim and sequence length."""
    return _listed("fwd_ws_from", (head_dim, dtype != torch.float32, causal), seqlen, device)


def ping_pong_forward(head_dim: int, causal: bool, seqlen: int, device: torch.device) -> bool:
    """Whether a plain fp16/bf16 forward of this shape may run the ping-pong kernel: where the GPU
    architecture's own tables have it (sm_90), from the listed sequence length."""
    return _listed("fwd_pingpong_from", (head_dim, causal), seqlen, device)


def ping_pong_persistent(head_dim: int, causal: bool, seqlen: int, device: torch.device) -> bool:
    """Whether the ping-pong forward of this shape runs one program per SM (else one per tile)."""
    last = _arch_entry("fwd_pingpong_persistent_to", (head_dim, causal), device)
    return last is not None and seqlen <= last


def one_pass_backward(head_dim: int, dtype: torch.dtype, causal: bool, seqlen: int,
                      device: torch.device, deterministic: bool = False) -> bool:
    """Whether a plain fp16/bf16 backward of this shape may run the one-pass kernel: where the GPU
    architecture's own tables have it (sm_90), from the listed sequence length (the deterministic
    one's, with deterministic=True)."""
    return dtype != torch.float32 and _listed("bwd_onepass_from", (head_dim, causal, deterministic), seqlen,
                                              device)


def backward_config(head_dim: int, dtype: torch.dtype, causal: bool, device: torch.device,
                    ) -> BackwardConfig:
    return _table_config("bwd", head_dim, dtype, causal, device)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products: a tf32 dot would be 1000x less precise than the
    fp32 math users compare against. 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _smaller_tile(cfg: TileConfig) -> TileConfig | None:
    if cfg.num_stages > 1:
        return replace(cfg, num_stages=cfg.num_stages - 1)
    if max(cfg.block_m, cfg.block_n) <= 16:
        return None
    if cfg.block_n >= cfg.block_m:
        return replace(cfg, block_n=cfg.block_n // 2, num_stages=2)
    return replace(cfg, block_m=cfg.block_m // 2, num_stages=2)


def smaller(cfg: Config) -> Config | None:
    """The next shape to try when `cfg` does not fit: fewer stages, then halve the larger tile side
    (every part of a backward config at once, in separate launches)."""
    if isinstance(cfg, TileConfig):
        return _smaller_tile(cfg)
    parts = [cfg.kv, cfg.q] + ([cfg.dk] if cfg.dk else [])
    stepped = [_smaller_tile(p) for p in parts]
    if all(p is None for p in stepped):
        return None
    kv, q, *dk = [new or old for new, old in zip(stepped, parts)]
    return BackwardConfig(kv=kv, q=q, dk=dk[0] if dk else None)


def candidates(kind: str, cfg: Config) -> list[Config]:
    """The few shapes FLASHATTN_AUTOTUNE=1 times: the table's and its neighbours (at most 7)."""
    def around(t: TileConfig) -> list[TileConfig]:
        return [replace(t, num_stages=t.num_stages + 1), replace(t, num_stages=max(1, t.num_stages - 1)),
                replace(t, block_n=t.block_n * 2), replace(t, block_n=max(16, t.block_n // 2))]

    if kind == "fwd_ws":
        # Triton 3.6's warp specialization gave NaN with 3 stages and needs 4 warps: tiles only.
        others = [replace(cfg, block_n=cfg.block_n // 2)]
    elif kind == "fwd":
        others = around(cfg) + [replace(cfg, num_warps=8 if cfg.num_warps == 4 else 4)]
    else:
        others = [replace(cfg, kv=t) for t in around(cfg.kv)[:3]] + [replace(cfg, q=t) for t in around(cfg.q)[:3]]
    out = [cfg]
    for other in others:
        if other not in out:
            out.append(other)
    return out[:7]


def autotune_enabled() -> bool:
    return os.environ.get("FLASHATTN_AUTOTUNE", "0") not in ("", "0")


def _cache_path() -> Path:
    root = os.environ.get("FLASHATTN_CACHE_DIR") or Path.home() / ".cache" / "flashattn"
    return Path(root) / "tiles.json"


_lock = threading.Lock()
_chosen: dict[str, Config] = {}      # key -> the shape that ran (fitted or tuned)
_disk_loaded = False


def _load_disk() -> None:
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    try:
        stored = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return
    for key, fields in stored.items():
        _chosen.setdefault(key, _from_json(fields))


def _save_disk(key: str, cfg: Config) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = json.loads(path.read_text()) if path.exists() else {}
        stored[key] = asdict(cfg)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1, sort_keys=True))
        tmp.replace(path)
    except (OSError, ValueError):
        pass  # a read-only home directory costs a re-tune next process, nothing else


def _from_json(fields: dict) -> Config:
    if "kv" not in fields:
        return TileConfig(**fields)
    dk = fields.get("dk")
    return BackwardConfig(kv=TileConfig(**fields["kv"]), q=TileConfig(**fields["q"]),
                          dk=TileConfig(**dk) if dk else None, one_launch=fields.get("one_launch", False))


def _key(kind: str, head_dim: int, dtype: torch.dtype, causal: bool, seqlen: int, device: torch.device,
         extra: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    bucket = 1 << max(0, int(seqlen - 1).bit_length())
    return f"{kind}|{name}|d{head_dim}|{str(dtype).removeprefix('torch.')}|causal={int(causal)}|n{bucket}|{extra}"


def with_tiles(cfg: Config, tile: int) -> Config:
    """`cfg` with square tiles of side `tile` everywhere (the warps and stages of the table's shape);
    a backward's separate dK programs are folded back into the kv programs."""
    if isinstance(cfg, BackwardConfig):
        kv = replace(cfg.kv, block_m=tile, block_n=tile)
        q = replace(cfg.q, block_m=tile, block_n=tile)
        return BackwardConfig(kv, q, None, (kv.num_warps, kv.num_stages) == (q.num_warps, q.num_stages)
                              and cfg.one_launch)
    return replace(cfg, block_m=tile, block_n=tile)


def _fewer_stages(cfg: Config) -> Config | None:
    if isinstance(cfg, BackwardConfig):
        if max(cfg.kv.num_stages, cfg.q.num_stages) == 1:
            return None
        kv = replace(cfg.kv, num_stages=max(1, cfg.kv.num_stages - 1))
        q = replace(cfg.q, num_stages=max(1, cfg.q.num_stages - 1))
        return BackwardConfig(kv, q, None, cfg.one_launch and kv.num_stages == q.num_stages)
    return replace(cfg, num_stages=cfg.num_stages - 1) if cfg.num_stages > 1 else None


def _launch_tiles(cfg: Config, tile: int, launch: Callable[[Config], None]) -> Config:
    """launch(cfg) with the caller's tiles: fewer pipeline stages if the GPU cannot hold them, never
    other tiles; a ValueError when one stage does not fit either."""
    while True:
        try:
            launch(cfg)
            return cfg
        except OutOfResources as exc:
            fewer = _fewer_stages(cfg)
            if fewer is None:
                raise ValueError(f"tile_size={tile} does not fit this GPU's shared memory even with one pipeline "
                                 f"stage ({exc}); pass a smaller tile_size, or None for the tuned tiles") from exc
            cfg = fewer


def run(kind: str, head_dim: int, dtype: torch.dtype, causal: bool, seqlen: int, device: torch.device,
        launch: Callable[[Config], None], extra: str = "", tile_size: int = 0) -> Config:
    """Launch `kind` ("fwd", "fwd_ws" or "bwd") through `launch(cfg)` with the shape chosen as the module
    docstring says; returns the shape used. `extra` separates kernels specialised differently
    (e.g. by options) that may prefer other shapes. `tile_size` (0: none) is the caller's square
    tiles, run as given (no tuning, no other tiles; fewer stages where the GPU needs them)."""
    base = _table_config(kind, head_dim, dtype, causal, device, seqlen)
    if tile_size:
        return _launch_tiles(with_tiles(base, tile_size), tile_size, launch)
    if device.type != "cuda":
        launch(base)
        return base
    tune = autotune_enabled()
    if tune:
        with _lock:
            _load_disk()
    # The common case (no tuning, every table shape has fitted so far) launches without building
    # the cache key: this runs on every attention call.
    key = _key(kind, head_dim, dtype, causal, seqlen, device, extra) if tune or _chosen else None
    cfg = _chosen.get(key) if key is not None else None
    if cfg is None and tune:
        cfg = _autotune(candidates(kind, base), launch)
        with _lock:
            _chosen[key] = cfg
            _save_disk(key, cfg)
    cfg = _launch_fitting(cfg or base, launch)
    if cfg != base:
        with _lock:
            _chosen.setdefault(key or _key(kind, head_dim, dtype, causal, seqlen, device, extra), cfg)
    return cfg


def chosen(kind: str, head_dim: int, dtype: torch.dtype, causal: bool, seqlen: int, device: torch.device,
           extra: str = "", tile_size: int = 0) -> Config:
    """The shape `run` launches `kind` with for such a call in this process: the caller's square tiles,
    else a shape fitted or tuned by an earlier launch of the same key, else the table's. Launch once
    first where fitting may have stepped down (a GPU without its own table)."""
    base = _table_config(kind, head_dim, dtype, causal, device, seqlen)
    if tile_size:
        return with_tiles(base, tile_size)
    if device.type != "cuda" or not _chosen:
        return base
    return _chosen.get(_key(kind, head_dim, dtype, causal, seqlen, device, extra), base)


def _launch_fitting(cfg: Config, launch: Callable[[Config], None]) -> Config:
    """launch(cfg), stepping down while the GPU cannot run the shape; returns the shape that ran."""
    while True:
        try:
            launch(cfg)
            return cfg
        except OutOfResources:
            cfg = smaller(cfg)
            if cfg is None:
                raise


def _autotune(cands: list[Config], launch: Callable[[Config], None], timer=None) -> Config:
    """The fastest of `cands` that runs (timer(fn) -> ms; triton's do_bench by default)."""
    if timer is None:
        from triton.testing import do_bench
        timer = lambda fn: do_bench(fn, warmup=5, rep=20, return_mode="median")  # noqa: E731
    best, best_ms = cands[0], float("inf")
    for cfg in cands:
        try:
            ms = timer(lambda: launch(cfg))
        except OutOfResources:
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best
