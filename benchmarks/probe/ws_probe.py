"""Probe: Triton's automatic warp specialization (tl.range(warp_specialize=True) + TMA descriptors)
for the forward, against the library's forward and cuDNN, D64/D128, 16k tokens, model dim 2048."""
import json, os, sys, time
import torch, triton
from triton.testing import do_bench
sys.path.insert(0, os.path.dirname(__file__))
from fwd_ws import fwd_ws
import flashattn
from torch.nn.attention import sdpa_kernel, SDPBackend

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
torch.manual_seed(0)
rows = []
out = os.environ.get("OUT", ".")


def ws_call(q, k, v, causal, bm, bn, warps, stages, **flags):
    B, N, H, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(N, bm), H, B)
    def f():
        fwd_ws[grid](q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                     N, H, D ** -0.5 * 1.4426950408889634, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
                     IS_CAUSAL=causal, STAGES=stages, **flags, num_warps=warps, num_stages=stages)
        return o
    return f

NC = {"ws": (128, 128, 4, 2, {}), "ws-tail": (128, 128, 4, 2, {"TAIL": True})}
CA = {"ws-m0": (128, 128, 4, 2, {}), "ws-m1": (128, 128, 4, 2, {"MASKMODE": 1}),
      "ws-m0-norev": (128, 128, 4, 2, {"REVERSE": False}), "ws-m1-bn64": (128, 64, 4, 2, {"MASKMODE": 1})}
D256 = {"ws-bn64": (128, 64, 4, 2, {}), "ws-bm64-bn64": (64, 64, 4, 2, {}), "ws-bn32": (128, 32, 4, 2, {})}
for D in (128, 256):
    for causal in (False, True):
        for N in (2048, 8192, 16384):
            B, H = 16384 // N, 2048 // D
            q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * B * H * N * N * D / (2 if causal else 1)
            tf = lambda ms: flops / ms / 1e9
            ref = flashattn.flash_attn_func(q, k, v, causal=causal)
            row = {"D": D, "causal": causal, "N": N}
            row["ours"] = tf(do_bench(lambda: flashattn.flash_attn_func(q, k, v, causal=causal)))
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                row["cudnn"] = tf(do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)))
            table = D256 if D == 256 else CA if causal else NC
            for name, cfg in table.items():
                if D == 256 and causal and name != "ws-bn64":
                    continue
                try:
                    f = ws_call(q, k, v, causal, *cfg[:4], **cfg[4])
                    err = (f().float() - ref.float()).abs().max().item()
                    row[name] = round(tf(do_bench(f)), 1) if err < 2e-2 else f"err {err:.3g}"
                except Exception as e:
                    row[name] = f"{type(e).__name__}: {str(e)[:80]}"
            rows.append(row)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
json.dump(rows, open(os.path.join(out, "ws_probe.json"), "w"), indent=1)
# Lengths that are not multiples of the tiles.
for causal, flags in ((False, {"TAIL": True}), (True, {"MASKMODE": 1}), (True, {})):
    q, k, v = (torch.randn(2, 1000, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = flashattn.flash_attn_func(q, k, v, causal=causal)
    f = ws_call(q, k, v, causal, 128, 128, 4, 2, **flags)
    print("tail", causal, flags, "max err", (f().float() - ref.float()).abs().max().item(), flush=True)
