"""Tile shapes per GPU architecture, head dim and dtype: a table, so a new shape never waits on autotuning.

How a launch gets its tile shape (`run`):
1. The table for the GPU's architecture (measured on an H100 for sm_90; other architectures start from
   the same shapes). Shapes for the CPU interpreter are small, so that the tests at tiny sequence
   lengths still cross several tiles and the causal diagonal.
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


# (head dim bucket, 16-bit?, causal) -> config, measured on an H100 with benchmarks/sweep.py (bf16,
# 16k tokens, seqlen 2k and 8k; benchmarks/results/ holds the sweep). Other GPUs reuse them: correct
# everywhere, untuned elsewhere.
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
# Backward, measured on an H100 at 8k tokens per sequence (benchmarks/results/h100-backward-experiments-
# 2026-11-22.md); the dQ programs own twice the rows of the dK/dV ones.
_T = TileConfig
_BWD = {
    (64, True, False): BackwardConfig(kv=_T(64, 64, 4, 2), q=_T(128, 64, 8, 3)),
    (64, True, True): BackwardConfig(kv=_T(64, 64, 4, 3), q=_T(128, 64, 8, 3)),
    # Head dim 128: dK/dV and dQ programs in one grid (no launch gap, and the dQ programs fill the
    # SMs as the dK/dV ones drain): +2-11% over two launches (results/h100-sweep-bwd-d128-2026-11-22).
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
# of a tail on 132 SMs): +4-12% at head dim 64 and 128 (results/h100-sweep-fwd-2026-11-22-s3.json);
# from 2k the 128-row tiles win. (key) -> (up to this sequence length, shape).
_FWD_SHORT = {
    (64, True, False): (1024, TileConfig(64, 64, 4, 3)),
    (64, True, True): (1024, TileConfig(64, 64, 4, 3)),
    (128, True, False): (1024, TileConfig(64, 64, 4, 3)),
    (128, True, True): (1024, TileConfig(64, 64, 4, 3)),
}

# Backwards of head dim 64 up to these lengths (B*N = 16k, so 16-32 sequences) run faster with 32-row
# steps in the dK/dV programs and 64-row dQ programs (bf16, benchmarks/sweep.py ->
# results/h100-sweep-bwd-short-2026-11-22.json, TFLOP/s against the main table's shape): 512 249.8 /
# 241.2, 1k 282.0 / 290.9; causal 512 174.0 / 165.9, 1k 231.1 / 225.1. Head dim 128 kept its
# shape at 1k and 2k (the best of ten).
_BWD_SHORT = {
    (64, True, False): (512, BackwardConfig(kv=_T(32, 64, 4, 3), q=_T(64, 64, 4, 2))),
    (64, True, True): (1024, BackwardConfig(kv=_T(32, 64, 4, 3), q=_T(64, 64, 4, 2))),
}

# The warp-specialized forward (forward._attn_fwd_ws: TMA loads, a producer warp group and two
# consumer warp groups), plain calls only, Hopper only, from the length where it measured faster than
# _FWD's shapes on the H100 (bf16, 16k tokens; benchmarks/probe/fwd_threshold.py, fwd_ws_tiles.py,
# fwd_d256_probe.py and fwd_ws_short.py -> results/h100-fwd-ws-2026-11-22.json). TMA-fed tiles of
# the head dim's exact width: head dims 64, 128 and 256. TFLOP/s, warp-specialized / other kernel:
#   D128 non-causal 512 328 / 346, 1k 431 / 411, 2k 505 / 456, 4k 537 / 474, 8k 555 / 496, 16k 573 / 451
#   D128 causal (every tile masked: the loop may not branch) 1k 285 / 321, 2k 374 / 371, 4k 441 / 419,
#   8k 468 / 449, 16k 508 / 466
#   D64 non-causal, 256-row tiles: 1k 348 / 408, 2k 399 / 428 (a tie in fwd_ws_short.py's three
#   rounds), 4k 442-462 / 431-440, 8k 473 / 442, 16k 448 / 429; D64 causal was slower at every length
#   (358 / 425 at 16k)
#   D256 (O stored by pointers, see the kernel) non-causal 512 406-407 / 322-324, 1k 520 / 405,
#   2k 565 / 467, 4k 589 / 495, 8k 579 / 511, 16k 598 / 508; causal 512 247-250 / 209-211,
#   1k 366 / 292, 2k 450 / 369, 4k 514 / 433, 8k 542 / 477, 16k 590 / 501
# (key) -> (from this sequence length, shape); num_warps=4 is what the warp specialization needs.
_FWD_WS = {
    (64, True, False): (4096, TileConfig(256, 128, 4, 2)),
    (128, True, False): (1024, TileConfig(128, 128, 4, 2)),
    (128, True, True): (2048, TileConfig(128, 128, 4, 2)),
    (256, True, False): (512, TileConfig(128, 64, 4, 2)),
    (256, True, True): (512, TileConfig(128, 64, 4, 2)),
}

# The one-pass backward for Hopper (backward_sm90: Gluon, 5 products, dQ added into fp32), plain
# fp16/bf16 calls at head dims 64 and 128, from the length where it measured faster than the portable
# backward on the H100 (bf16, 16k tokens, the whole backward call; benchmarks/probe/bwd_sm90.py ->
# results/h100-bwd-sm90-2026-11-22-b.json (head dim 128) and -c.json (head dim 64, 128-row steps)).
# TFLOP/s, one-pass / its deterministic=True build / portable (deterministic either way):
#   D128 non-causal 1k 343 / 323 / 352, 2k 425 / 390 / 372, 4k 452 / 424 / 383, 8k 505 / 437 / 388,
#                   16k 506 / 465 / 408
#   D128 causal 2k 328 / 256 / 320, 4k 402 / 328 / 336, 8k 431 / 388 / 369, 16k 493 / 400 / 373
#   D64 non-causal 2k 318 / 308 / 329, 4k 362 / 344 / 342, 8k 377 / 356 / 347, 16k 397 / 367 / 342
#   D64 causal 2k 256 / 243 / 279, 4k 319 / 298 / 319, 8k 355 / 323 / 335, 16k 389 / 341 / 344
# (head dim, causal) -> (from this length, and from this length with deterministic=True, or None).
# D128 causal from 2k: 328 / 320 there in -b.json, 331 / 314 in -e-convert-head.json (its
# onepass_convert_launch column is this build: 325).
_BWD_ONEPASS = {(64, False): (4096, 8192), (64, True): (8192, None),
                (128, False): (2048, 2048), (128, True): (2048, 8192)}

# The ping-pong forward for Hopper (forward_sm90: Gluon, FlashAttention-3's schedule), plain fp16/bf16
# calls with a positive scale, from the length where it measured faster than the kernels above on the
# H100, and persistent (one program per SM taking the next untaken tile from an atomic counter) up to
# the length where that measured faster than one program per tile (bf16, 16k tokens;
# benchmarks/probe/fwd_sm90.py -> results/h100-fwd-sm90-2026-11-22-d.json). TFLOP/s, ping-pong
# persistent / one program per tile / the kernel the tables chose before / cuDNN in the same run:
#   D128 non-causal 512 392 / 297 / 344 / 511, 1k 486 / 412 / 442 / 584, 2k 550-575 / 512 / 489 / 612,
#                   4k 588-596 / 550 / 524 / 605, 8k 583 / 593 / 554 / 624, 16k 626 / 614 / 572 / 643
#   D128 causal 512 215 / 172 / 228 / 318, 1k 341 / 281 / 316 / 426, 2k 441-469 / 401 / 383 / 491,
#               4k 516-528 / 483 / 428 / 529, 8k 540-558 / 550 / 463 / 556, 16k 613-637 / 593 / 509 / 558
#   D256 non-causal 512 373 / 361 / 412 / 499, 1k 485 / 479 / 506 / 595, 2k 555-580 / 582 / 557 / 644,
#                   4k 599 / 617 / 587 / 662, 8k 602-621 / 645 / 592 / 671, 16k 669-688 / 661 / 629 / 691
#   D256 causal 512 229 / 211 / 250 / 308, 1k 355-359 / 327 / 361 / 440, 2k 462-476 / 450 / 441 / 523,
#               4k 527-531 / 505 / 501 / 565, 8k 564-584 / 565 / 530 / 588, 16k 671-681 / 651 / 582 / 594
#   (a range: the same build timed twice in that run). With the tiles in a fixed order instead
#   (program p took p, p + grid, ...) persistent D128 causal 16k measured 454 against 608 (-c.json).
#   D64 (one program per tile, -b.json) non-causal 2k 357 / 429, 16k 429 / 482 (ping-pong / before);
#   causal 2k 276 / 356, 16k 423 / 413: not listed (a 64-wide step is too little matrix work for its
#   softmax and barriers)
# (head dim, causal) -> (from this sequence length, persistent up to this one or None).
_FWD_PINGPONG = {(128, False): (512, 4096), (128, True): (1024, math.inf),
                 (256, False): (2048, None), (256, True): (2048, math.inf)}

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


def run(kind: str, head_dim: int, dtype: torch.dtype, causal: bool, seqlen: int, device: torch.device,
        launch: Callable[[Config], None], extra: str = "") -> Config:
    """Launch `kind` ("fwd", "fwd_ws" or "bwd") through `launch(cfg)` with the shape chosen as the module
    docstring says; returns the shape used. `extra` separates kernels specialised differently
    (e.g. by options) that may prefer other shapes."""
    base = _table_config(kind, head_dim, dtype, causal, device, seqlen)
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
