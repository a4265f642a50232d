"""Probe: the backward as the library's dK/dV programs alone (PART 1) plus the warp-specialized dQ
kernel (bwd_ws.py), against the library's backward as it is (one grid), D128 bf16, 16k tokens."""
import json, os, sys
import torch, triton
from triton.testing import do_bench
sys.path.insert(0, os.path.dirname(__file__))
from bwd_ws import bwd_dq_ws
from flashattn.ops.triton import forward as fwd_mod, backward as B_
from flashattn.ops.triton.common import strides

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
LOG2E = 1.4426950408889634
rows = []
KV = [(64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2), (64, 128, 4, 2)]
for causal in (False, True):
    for N in (1024, 2048, 4096, 8192, 16384):
        D, H = 128, 16
        Bn = 16384 // N
        q, k, v, do = (torch.randn(Bn, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        scale = D ** -0.5
        o, lse = fwd_mod.forward(q, k, v, scale, causal)
        flops = 2.5 * 4 * Bn * H * N * N * D / (2 if causal else 1)
        tf = lambda ms: round(flops / ms / 1e9, 1)
        ref = B_.backward(do, q, k, v, o, lse, scale, causal)
        row = {"causal": causal, "N": N, "ours": tf(do_bench(lambda: B_.backward(do, q, k, v, o, lse, scale, causal)))}
        delta = torch.empty_like(lse)
        prep = lambda: B_._launch_preprocess((triton.cdiv(N, 64), H, Bn), o, do, lse, delta, *strides(o), *strides(do), N, H,
                                             HEAD_DIM=D, BLOCK_D=D, BLOCK_M=64, HAS_DLSE=False, num_warps=4, num_stages=3)
        prep()
        t_prep = do_bench(prep)
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        args = (q, k, v, do, lse, delta, dq, dk, dv, *strides(q), *strides(k), *strides(v), *strides(do),
                *strides(dq), *strides(dk), *strides(dv), N, N, H, H, 1, scale, scale * LOG2E)
        best_kv = None
        for bm, bn, w, st in KV:
            f = lambda: B_._launch_bwd((triton.cdiv(N, bn), H, Bn), *args, HEAD_DIM=D, BLOCK_D=D, BLOCK_M=bm, BLOCK_N=bn,
                                       IS_CAUSAL=causal, DOT_PRECISION="tf32", PART=1, DQ_ROWS=bm, DQ_STEP=bn,
                                       num_warps=w, num_stages=st)
            try:
                f()
                err = max((dk.float() - ref[1].float()).abs().max().item(), (dv.float() - ref[2].float()).abs().max().item())
                ms = do_bench(f)
                row[f"kv{bm}-{bn}-{w}-{st}"] = round(ms, 3) if err < 5e-2 else f"err {err:.3g}"
                if err < 5e-2:
                    best_kv = ms if best_kv is None else min(best_kv, ms)
            except Exception as e:
                row[f"kv{bm}-{bn}-{w}-{st}"] = type(e).__name__
        lse2 = (lse * LOG2E).contiguous()
        best_q = None
        for bm, bn in ((128, 64), (128, 128)):
            g = lambda: bwd_dq_ws[(triton.cdiv(N, bm), H, Bn)](q, k, v, do, dq, lse2, delta, *q.stride()[:3], N, H, scale * LOG2E,
                                                                HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, STAGES=2, IS_CAUSAL=causal,
                                                                LSE_DESC=True, num_warps=4, num_stages=2)
            g()
            err = (dq.float() - ref[0].float()).abs().max().item()
            ms = do_bench(g)
            row[f"wsq{bm}-{bn}"] = round(ms, 3) if err < 5e-2 else f"err {err:.3g}"
            if err < 5e-2:
                best_q = ms if best_q is None else min(best_q, ms)
        row["prep_ms"] = round(t_prep, 3)
        if best_kv and best_q:
            row["split_est"] = tf(t_prep + best_kv + best_q)
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "bwd_split_probe.json"), "w"), indent=1)
