"""Probe: the portable backward (backward.py, the one-pass kernel switched off) with delta from the
preprocess launch against delta computed by the programs (BackwardConfig.fused_delta, which
exists at commit 40b726b only: run it there), bf16, 16k
tokens, H*D = 2048, TFLOP/s of the whole backward call; plus the preprocess launch alone (ms).
DIMS=64,128 picks head dims; LENGTHS=512,1024 the sequence lengths."""
import json, os, sys, time
from dataclasses import replace
import torch
from triton.testing import do_bench
from flashattn.ops.triton import backward as B, configs, forward as F

out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%F"), "command": " ".join(sys.argv),
       "env": {k: v for k, v in os.environ.items() if k in ("DIMS", "LENGTHS")}, "timing": []}
configs.one_pass_backward = lambda *args, **kwargs: False
table = configs._table_config
fused = {"value": False}
configs._table_config = lambda kind, *a: (replace(table(kind, *a), fused_delta=fused["value"]) if kind == "bwd"
                                          else table(kind, *a))
DIMS = [int(x) for x in os.environ.get("DIMS", "64,128,256").split(",")]
LENGTHS = [int(x) for x in os.environ.get("LENGTHS", "512,1024,2048,4096,8192,16384").split(",")]
for d in DIMS:
    h = 2048 // d
    for causal in (False, True):
        for n in LENGTHS:
            b = 16384 // n
            q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            scale = d ** -0.5
            o, lse = F.forward(q, k, v, scale, causal)
            flops = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)
            row = dict(d=d, causal=causal, n=n)
            grads = {}
            for name, value in (("preprocess", False), ("fused", True)):
                fused["value"] = value
                configs._chosen.clear()
                fn = lambda: B.backward(do, q, k, v, o, lse, scale, causal)
                grads[name] = fn()[:3]
                row[name] = round(flops / do_bench(fn, warmup=25, rep=100) / 1e9, 1)
            row["same_grads"] = all(torch.equal(a, b_) for a, b_ in zip(grads["preprocess"], grads["fused"]))
            delta = torch.empty_like(lse)
            row["preprocess_ms"] = round(do_bench(lambda: B._launch_preprocess(
                (B.cdiv(n, B.PREPROCESS_ROWS), h, b), o, do, lse, delta, None, *B.strides(o), *B.strides(do), n, h,
                HEAD_DIM=d, BLOCK_D=d, BLOCK_M=B.PREPROCESS_ROWS, HAS_DLSE=False, ZERO_DQ=False,
                num_warps=4, num_stages=3), warmup=25, rep=100), 4)
            out["timing"].append(row)
            print("TIME", row, flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "bwd_fused_delta.json"), "w"), indent=1)
for r in out["timing"]:
    print(f"d{r['d']} {'causal' if r['causal'] else 'full  '} {r['n']:>6}  preprocess {r['preprocess']:>6}  "
          f"fused {r['fused']:>6}  x{r['fused'] / r['preprocess']:.3f}  same {r['same_grads']}  pre_ms {r['preprocess_ms']}")
