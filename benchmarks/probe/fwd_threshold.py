"""Forward D128 bf16, the library's warp-specialized kernel against its other kernel, 512 to 16k tokens
(16k tokens per batch, 16 heads): where should the warp-specialized one take over?"""
import json, os
import torch
from triton.testing import do_bench
from flashattn.ops.triton import configs, forward as F

real = configs.warp_specialized
rows = []
for causal in (False, True):
    for N in (512, 1024, 2048, 4096, 8192, 16384):
        B, H, D = 16384 // N, 16, 128
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * B * H * N * N * D / (2 if causal else 1)
        row = {"causal": causal, "N": N}
        outs = {}
        for name, flag in (("ws", True), ("plain", False)):
            configs.warp_specialized = lambda *a, flag=flag: flag
            f = lambda: F.forward(q, k, v, D ** -0.5, causal)
            outs[name] = f()
            row[name] = round(flops / do_bench(f) / 1e9, 1)
        configs.warp_specialized = real
        row["max_diff"] = (outs["ws"][0].float() - outs["plain"][0].float()).abs().max().item()
        row["default_is_ws"] = real(D, q.dtype, causal, N, q.device)
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "fwd_threshold.json"), "w"), indent=1)
