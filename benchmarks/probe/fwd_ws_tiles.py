"""Probe: tile shapes of the library's warp-specialized forward (forward._attn_fwd_ws) per head dim,
against its other forward kernel; bf16, 16k tokens, model dim 2048."""
import json, os
import torch
from triton.testing import do_bench
from flashattn.ops.triton import configs, forward as F
from flashattn.ops.triton.configs import TileConfig as T

real = configs.warp_specialized
table = configs._TABLES[(9, 0)]["fwd_ws"]
CANDS = {
    (64, False): [T(256, 128, 4, 2), T(256, 64, 4, 2), T(128, 128, 4, 2)],
    (64, True): [T(128, 128, 4, 2), T(256, 64, 4, 2)],
    (128, False): [T(128, 128, 4, 2), T(256, 64, 4, 2), T(128, 64, 4, 2)],
    (256, False): [T(128, 32, 4, 2), T(64, 64, 4, 2)],
}
rows = []
for (D, causal), cands in CANDS.items():
    for N in (1024, 2048, 8192, 16384):
        B, H = 16384 // N, 2048 // D
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * B * H * N * N * D / (2 if causal else 1)
        tf = lambda ms: round(flops / ms / 1e9, 1)
        row = {"D": D, "causal": causal, "N": N}
        configs.warp_specialized = lambda *a: False
        ref = F.forward(q, k, v, D ** -0.5, causal)
        row["other"] = tf(do_bench(lambda: F.forward(q, k, v, D ** -0.5, causal)))
        configs.warp_specialized = lambda *a: True
        for c in cands:
            table[(configs._bucket(D), True, causal)] = c
            name = f"ws{c.block_m}-{c.block_n}"
            try:
                o, lse = F.forward(q, k, v, D ** -0.5, causal)
                err = max((o.float() - ref[0].float()).abs().max().item(), (lse - ref[1]).abs().max().item())
                row[name] = tf(do_bench(lambda: F.forward(q, k, v, D ** -0.5, causal))) if err < 2e-2 else f"err {err:.3g}"
            except Exception as e:
                row[name] = f"{type(e).__name__}: {str(e)[:60]}"
        configs.warp_specialized = real
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "fwd_ws_tiles.json"), "w"), indent=1)
