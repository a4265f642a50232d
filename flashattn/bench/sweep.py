"""Time candidate tile shapes for the Triton kernels on the GPU at hand (bf16, 16k tokens).

Used to fill the tables in flashattn/ops/triton/configs.py; prints the best shape per cell and writes
every measurement as JSON. Run by benchmarks/gpu_run.sh, or alone:
    python -m flashattn.bench.sweep --out sweep.json --head-dims 64,128 --seqlens 2048,8192 --passes bwd
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import asdict

import torch
import triton
from triton.testing import do_bench

from flashattn.ops.triton import backward as triton_backward
from flashattn.ops.triton import choice, configs
from flashattn.ops.triton import forward as triton_forward
from flashattn.ops.triton import plan

T, B = configs.TileConfig, configs.BackwardConfig
CANDIDATES = {
    "fwd": {64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4)],
            128: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (128, 64, 8, 4), (128, 128, 8, 3)],
            256: [(64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3)]},
    # Backward: BackwardConfig(kv=dK/dV shape, q=dQ shape[, dk=separate dK shape][, one_launch]).
    "bwd": {64: [B(kv=T(64, 64, 4, 2), q=T(128, 64, 8, 3)), B(kv=T(64, 64, 4, 3), q=T(128, 64, 8, 3)),
                 B(kv=T(64, 128, 8, 2), q=T(128, 64, 8, 2), one_launch=True),
                 B(kv=T(32, 128, 4, 2), q=T(128, 32, 4, 2), one_launch=True),
                 B(kv=T(64, 64, 4, 3), q=T(64, 64, 4, 3), one_launch=True),
                 B(kv=T(32, 64, 4, 3), q=T(64, 64, 4, 2)), B(kv=T(64, 64, 4, 2), q=T(64, 64, 4, 2), one_launch=True)],
            128: [B(kv=T(64, 64, 4, 2), q=T(64, 64, 4, 2), one_launch=True),
                  B(kv=T(64, 64, 4, 3), q=T(64, 64, 4, 3), one_launch=True),
                  B(kv=T(32, 64, 4, 2), q=T(64, 32, 4, 2), one_launch=True),
                  B(kv=T(64, 128, 8, 2), q=T(128, 64, 8, 2), one_launch=True),
                  B(kv=T(64, 64, 8, 2), q=T(64, 64, 8, 2), one_launch=True),
                  B(kv=T(64, 64, 4, 2), q=T(128, 64, 8, 3)),
                  B(kv=T(64, 128, 8, 3), q=T(128, 64, 8, 3), one_launch=True),
                  B(kv=T(32, 64, 4, 2), q=T(64, 64, 4, 2), one_launch=True),
                  B(kv=T(64, 64, 4, 2), q=T(64, 128, 4, 2), one_launch=True),
                  B(kv=T(64, 64, 4, 2), q=T(128, 64, 4, 2), one_launch=True)],
            256: [B(kv=T(32, 64, 4, 2), q=T(64, 32, 4, 3), dk=T(64, 64, 4, 2)),
                  B(kv=T(64, 32, 4, 2), q=T(64, 32, 4, 3)),
                  B(kv=T(32, 64, 4, 2), q=T(64, 32, 4, 3), dk=T(32, 64, 4, 2)),
                  B(kv=T(64, 32, 4, 2), q=T(32, 64, 4, 2), one_launch=True)]},
}
TABLES = {"fwd": "_FWD", "bwd": "_BWD"}


def _flops(b, h, n, d, causal, bwd):
    f = 4 * b * h * n * n * d / (2 if causal else 1)
    return f * 2.5 if bwd else f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--passes", default="fwd,bwd")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--budget-s", type=float, default=360, help="stop starting new cells after this")
    ap.add_argument("--out", default="sweep.json")
    args = ap.parse_args()
    rows, t0 = [], time.time()
    # Time the main tables' candidates at every length (the short tables would answer first), on the
    # portable kernels alone (the tables send plain calls to the Hopper kernels from 512-8k on).
    configs._FWD_SHORT.clear()
    configs._BWD_SHORT.clear()
    choice.kernel_for = lambda *args, **kwargs: choice.PORTABLE
    for d, n, causal in itertools.product([int(x) for x in args.head_dims.split(",")],
                                          [int(x) for x in args.seqlens.split(",")],
                                          [bool(int(c)) for c in args.causal.split(",")]):
        h, b = 2048 // d, 16384 // n
        q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        scale = 1 / math.sqrt(d)
        key = (configs._bucket(d), True, causal)
        o, lse = triton_forward.forward(q, k, v, scale, causal)
        for pass_ in args.passes.split(","):
            table = getattr(configs, TABLES[pass_])
            original = table[key]
            if time.time() - t0 > args.budget_s:
                print("budget spent, stopping", flush=True)
                break
            best = None
            for cand in CANDIDATES[pass_][configs._bucket(d)]:
                table[key] = configs.TileConfig(*cand) if isinstance(cand, tuple) else cand
                configs._chosen.clear()  # forget shapes fitted or tuned for the previous candidate
                plan.clear()             # and the launches planned with it
                try:
                    if pass_ == "fwd":
                        fn = lambda: triton_forward.forward(q, k, v, scale, causal)
                    else:
                        fn = lambda: triton_backward.backward(do, q, k, v, o, lse, scale, causal)
                    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                    tf = _flops(b, h, n, d, causal, pass_ == "bwd") / ms / 1e9
                except Exception as e:  # noqa: BLE001 - out of shared memory and the like
                    ms, tf = None, None
                    print(f"{pass_} d{d} n{n} causal={causal} {cand}: {type(e).__name__} {str(e)[:80]}")
                rows.append(dict(pass_=pass_, d=d, n=n, causal=causal,
                                 cfg=cand if isinstance(cand, tuple) else asdict(cand), ms=ms, tflops=tf))
                if tf and (best is None or tf > best[1]):
                    best = (cand, tf)
            table[key] = original
            print(f"BEST {pass_} d{d} n{n} causal={int(causal)}: {best[0] if best else None} "
                  f"{best[1] if best else 0:.0f} TFLOP/s (current {original})", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
