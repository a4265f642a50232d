"""Probe: where a short backward's time goes in the benchmark's own measurement (out.backward under
do_bench with its L2 flush, flashattn.bench.measure.time_case) against the kernels alone (the library's
backward called directly; torch.profiler's kernel time of out.backward), the host time of one call
with the GPU idle, and the host time from out.backward's start to each kernel launch of ours (when
that exceeds the GPU time of the L2 flush before it, the GPU waits inside the timed region).
FlexAttention through the same time_case beside it. bf16, 16k tokens, H*D = 2048."""
import json, os, sys, time
import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench
from flashattn import flash_attn_func
from flashattn.bench import measure, peers
from flashattn.bench.cases import Case
from flashattn.ops.triton import backward as B, launch

CELLS = [(128, 512, True), (128, 1024, False), (128, 2048, True), (64, 512, False), (128, 512, False)]
dev = torch.device("cuda")
out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%F"), "command": " ".join(sys.argv), "rows": []}
stamps = []
original = launch.Launcher._launch
def stamped(self, *args, **kwargs):
    stamps.append((self.fn.__name__, time.perf_counter()))
    return original(self, *args, **kwargs)
launch.Launcher._launch = stamped
wanted = {p.name: p for p in peers.available("gpu", ["flashattn", "flex"])[0]}
for d, n, causal in CELLS:
    h, b = 2048 // d, 16384 // n
    case = Case("bf16", b, h, n, d, causal, "bwd")
    row = dict(d=d, n=n, causal=causal)
    for name, peer in wanted.items():
        m = measure.time_case(peer, case, dev, measure.cuda_timer)
        row[f"bench_{name}"] = round(m.tflops, 1) if m.tflops else m.error
    q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o = flash_attn_func(q, k, v, causal=causal)
    g = torch.randn_like(o)
    fn = lambda: o.backward(g, retain_graph=True)
    row["bench_style_no_flush_ms"] = do_bench(fn, grad_to_none=[q, k, v], return_mode="median")
    from flashattn.ops.triton import forward as F
    qd, kd, vd = (x.detach() for x in (q, k, v))
    od, lsed = F.forward(qd, kd, vd, d ** -0.5, causal)
    row["direct_ms"] = do_bench(lambda: B.backward(g, qd, kd, vd, od, lsed, d ** -0.5, causal), return_mode="median")
    row["bench_ms"] = case.flops / row["bench_flashattn"] / 1e9 if isinstance(row["bench_flashattn"], float) else None
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            q.grad = k.grad = v.grad = None
            fn()
        torch.cuda.synchronize()
    kern = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            kern[e.key[:60]] = round(e.device_time_total / 10 / 1e3, 4)
    row["kernels_ms"] = kern
    hosts, leads = [], []
    for _ in range(20):
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        stamps.clear()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        hosts.append((t1 - t0) * 1e6)
        leads.append([(nm, round((t - t0) * 1e6, 1)) for nm, t in stamps])
    row["host_us_median"] = sorted(hosts)[10]
    row["launch_at_us"] = leads[10]
    out["rows"].append(row)
    print("ROW", row, flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "bwd_short_gap.json"), "w"), indent=1)
