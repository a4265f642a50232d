"""Where the backward's time goes: each launch of the Triton backward timed alone, causal and not.

For the closing notes of the speed work: the dK/dV programs and the dQ programs of `_bwd` launched
alone with the table's shapes, the preprocess, the forward, and a plain bf16 GEMM of the same inner
size as a ceiling. Prints a table and writes JSON:
    python benchmarks/ablation.py --out ablation.json [--seqlen 8192] [--head-dims 64,128,256]
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict

import torch
import triton
from triton.testing import do_bench

from flashattn.ops.triton import backward as B
from flashattn.ops.triton import configs
from flashattn.ops.triton import forward as F
from flashattn.ops.triton.common import LOG2E, strides


def _time(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--out", default="ablation.json")
    args = ap.parse_args()
    n, rows = args.seqlen, []
    for d in [int(x) for x in args.head_dims.split(",")]:
        h, b = 2048 // d, 16384 // n
        q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        scale = 1 / math.sqrt(d)
        a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
        gemm_ms = _time(lambda: a @ a.T)                       # one N x N x D product, as in QK^T
        gemm_tflops = 2 * n * n * d / gemm_ms / 1e9
        for causal in (False, True):
            o, lse = F.forward(q, k, v, scale, causal)
            cfg = configs.backward_config(d, q.dtype, causal, q.device)
            delta = torch.empty_like(lse)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

            def launch(part, tile, programs, dkdv=3):
                B._bwd[(programs, h, b)](
                    q, k, v, do, lse, delta, dq, dk, dv,
                    *strides(q), *strides(k), *strides(v), *strides(do), *strides(dq), *strides(dk),
                    *strides(dv), n, n, h, h, 1, scale, scale * LOG2E.value,
                    HEAD_DIM=d, BLOCK_D=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, IS_CAUSAL=causal,
                    DOT_PRECISION="tf32", PART=part, DQ_ROWS=cfg.q.block_m, DQ_STEP=cfg.q.block_n, DKDV=dkdv,
                    num_warps=tile.num_warps, num_stages=tile.num_stages)

            def kv_half():
                launch(1, cfg.kv, triton.cdiv(n, cfg.kv.block_n), 3 if cfg.dk is None else 1)
                if cfg.dk is not None:
                    launch(1, cfg.dk, triton.cdiv(n, cfg.dk.block_n), 2)

            fwd_flops = 4 * b * h * n * n * d / (2 if causal else 1)
            times = dict(
                forward=_time(lambda: F.forward(q, k, v, scale, causal)),
                backward=_time(lambda: B.backward(do, q, k, v, o, lse, scale, causal)),
                preprocess=_time(lambda: B._bwd_preprocess[(triton.cdiv(n, B.PREPROCESS_ROWS), h, b)](
                    o, do, lse, delta, None, *strides(o), *strides(do), n, h, HEAD_DIM=d, BLOCK_D=d,
                    BLOCK_M=B.PREPROCESS_ROWS, HAS_DLSE=False)),
                dkdv_half=_time(kv_half),
                dq_half=_time(lambda: launch(2, cfg.q, triton.cdiv(n, cfg.q.block_m))),
            )
            # Matrix-product rate inside each half: dK/dV does 4 products of 2*N*N*D (halved when
            # causal), dQ does 3.
            rate = dict(dkdv_half=4 * fwd_flops / 2 / times["dkdv_half"] / 1e9,
                        dq_half=3 * fwd_flops / 2 / times["dq_half"] / 1e9,
                        forward=fwd_flops / times["forward"] / 1e9,
                        backward=2.5 * fwd_flops / times["backward"] / 1e9)
            row = dict(head_dim=d, seqlen=n, batch=b, nheads=h, causal=causal, config=asdict(cfg),
                       ms=times, tflops=rate, gemm_tflops=gemm_tflops)
            rows.append(row)
            print(f"d{d} n{n} causal={int(causal)} gemm={gemm_tflops:.0f} | "
                  + " ".join(f"{k}={v:.3f}ms" for k, v in times.items()) + " | "
                  + " ".join(f"{k}={v:.0f}" for k, v in rate.items()), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
