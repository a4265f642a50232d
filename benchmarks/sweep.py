"""Time candidate tile shapes for the Triton kernels on the GPU at hand (bf16, 16k tokens).

Used to fill the tables in flashattn/ops/triton/configs.py; prints the best shape per cell and writes
every measurement as JSON. Run by benchmarks/gpu_run.sh, or alone:
    python benchmarks/sweep.py --out sweep.json --head-dims 64,128 --seqlens 2048,8192
"""
from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import triton
from triton.testing import do_bench

from flashattn.ops.triton import backward as triton_backward
from flashattn.ops.triton import configs
from flashattn.ops.triton import forward as triton_forward

CANDIDATES_FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                  (128, 32, 4, 3), (64, 128, 4, 3)]
CANDIDATES_BWD = [(64, 64, 4, 2), (32, 64, 4, 3), (64, 64, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2),
                  (128, 64, 8, 2), (32, 64, 8, 2), (64, 64, 4, 3)]


def _flops(b, h, n, d, causal, bwd):
    f = 4 * b * h * n * n * d / (2 if causal else 1)
    return f * 2.5 if bwd else f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--passes", default="fwd,bwd")
    ap.add_argument("--out", default="sweep.json")
    args = ap.parse_args()
    rows = []
    for d, n, causal in itertools.product([int(x) for x in args.head_dims.split(",")],
                                          [int(x) for x in args.seqlens.split(",")], (False, True)):
        h, b = 2048 // d, 16384 // n
        q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        scale = 1 / math.sqrt(d)
        key = (configs._bucket(d), True, causal)
        for pass_, cands, table in (("fwd", CANDIDATES_FWD, configs._FWD), ("bwd", CANDIDATES_BWD, configs._BWD)):
            if pass_ not in args.passes.split(","):
                continue
            original = table[key]
            best = None
            for cand in cands:
                table[key] = configs.TileConfig(*cand)
                try:
                    if pass_ == "fwd":
                        fn = lambda: triton_forward.forward(q, k, v, scale, causal)
                    else:
                        o, lse = triton_forward.forward(q, k, v, scale, causal)
                        fn = lambda: triton_backward.backward(do, q, k, v, o, lse, scale, causal)
                    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                    tf = _flops(b, h, n, d, causal, pass_ == "bwd") / ms / 1e9
                except Exception as e:  # noqa: BLE001 - out of shared memory and the like
                    ms, tf = None, None
                    print(f"{pass_} d{d} n{n} causal={causal} {cand}: {type(e).__name__} {str(e)[:80]}")
                rows.append(dict(pass_=pass_, d=d, n=n, causal=causal, cfg=cand, ms=ms, tflops=tf))
                if tf and (best is None or tf > best[1]):
                    best = (cand, tf)
            table[key] = original
            print(f"BEST {pass_} d{d} n{n} causal={int(causal)}: {best[0] if best else None} "
                  f"{best[1] if best else 0:.0f} TFLOP/s (current {original})", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
