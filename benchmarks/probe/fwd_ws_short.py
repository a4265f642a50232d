"""Probe: the warp-specialized forward at lengths the table had not measured (head dim 256 at 512,
head dim 64 non-causal at 4k), against the other forward kernel; bf16, 16k tokens, model dim 2048.
Three alternating rounds per cell."""
import json, os
import torch
from triton.testing import do_bench
from flashattn.ops.triton import configs, forward as F

real = configs.warp_specialized
rows = []
for D, causal, N in [(256, False, 512), (256, True, 512), (64, False, 4096), (64, False, 2048)]:
    B, H = 16384 // N, 2048 // D
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * B * H * N * N * D / (2 if causal else 1)
    row = {"D": D, "causal": causal, "N": N, "ws": [], "other": []}
    for _ in range(3):
        for name, flag in (("ws", True), ("other", False)):
            configs.warp_specialized = lambda *a, flag=flag: flag
            row[name].append(round(flops / do_bench(lambda: F.forward(q, k, v, D ** -0.5, causal)) / 1e9, 1))
    configs.warp_specialized = real
    rows.append(row)
    print(row, flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "fwd_ws_short.json"), "w"), indent=1)
