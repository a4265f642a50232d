"""Probe: a few short cells of the benchmark timed again, each several times in a row, in bf16 and
fp16 (flashattn.bench.measure.time_case, as the benchmark measures them), beside the same forward or
backward called directly (do_bench, no autograd) and the host's time per call with the GPU idle.
CELLS=d:n:causal:pass,... picks them (default: the cells a grid run found below a peer)."""
import json, os, sys, time
import torch
from triton.testing import do_bench
from flashattn import flash_attn_func
from flashattn.bench import measure, peers
from flashattn.bench.cases import Case
from flashattn.ops.triton import backward as B, forward as F

dev = torch.device("cuda")
cells = [tuple(c.split(":")) for c in os.environ.get("CELLS", "128:512:1:fwd,128:2048:1:bwd,128:1024:0:bwd").split(",")]
wanted = {p.name: p for p in peers.available("gpu", ["flashattn", "flex", "sdpa-flash"])[0]}
out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%F"), "command": " ".join(sys.argv), "rows": []}
for d, n, causal, pass_ in cells:
    d, n, causal = int(d), int(n), bool(int(causal))
    h, b = 2048 // d, 16384 // n
    for dtype in ("bf16", "fp16"):
        case = Case(dtype, b, h, n, d, causal, pass_)
        row = dict(d=d, n=n, causal=causal, pass_=pass_, dtype=dtype)
        for name, peer in wanted.items():
            row[name] = [round(measure.time_case(peer, case, dev, measure.cuda_timer).tflops or 0, 1) for _ in range(3)]
        tdt = case.torch_dtype
        q, k, v, do = (torch.randn(b, n, h, d, device=dev, dtype=tdt) for _ in range(4))
        scale = d ** -0.5
        if pass_ == "fwd":
            direct = lambda: F.forward(q, k, v, scale, causal)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            call = lambda: flash_attn_func(*leaves, causal=causal)
        else:
            o, lse = F.forward(q, k, v, scale, causal)
            direct = lambda: B.backward(do, q, k, v, o, lse, scale, causal)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            outp = flash_attn_func(*leaves, causal=causal)
            call = lambda: outp.backward(do, retain_graph=True)
        row["direct"] = round(case.flops / do_bench(direct, return_mode="median") / 1e9, 1)
        hosts = []
        for _ in range(30):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()
            hosts.append((time.perf_counter() - t0) * 1e6)
            for x in leaves:
                x.grad = None
        row["host_us_median"] = round(sorted(hosts)[15], 1)
        row["gpu_us_direct"] = round(case.flops / row["direct"] / 1e6, 1)
        out["rows"].append(row)
        print("ROW", row, flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "short_cells.json"), "w"), indent=1)
