"""Probe: run the one-pass backward kernel of backward_sm90 a few times at D128, 16k tokens, causal and
not, for `ncu` to profile (benchmarks/probe/README.md has the command)."""
import sys
import torch
from flashattn.ops.triton import forward as F, backward_sm90 as G
from flashattn.ops.triton.common import LOG2E, cdiv, strides

d, n, h = 128, int(sys.argv[1]) if len(sys.argv) > 1 else 16384, 16
b = 16384 // n
for causal in (False, True):
    q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = d ** -0.5
    o, lse = F.forward(q, k, v, scale, causal)
    delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()
    dq_acc = torch.zeros(b, h, n, d, device="cuda", dtype=torch.float32)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for _ in range(3):
        G._launch_bwd_sm90((cdiv(n, G.BLOCK_N), h, b), q, k, v, do, lse, delta, dq_acc, dk, dv,
                           *strides(q), *strides(k), *strides(v), *strides(do), *strides(dk), *strides(dv),
                           n, n, h, 1, scale, scale * LOG2E.value, HEAD_DIM=d, BLOCK_M=G.BLOCK_M,
                           BLOCK_N=G.BLOCK_N, IS_CAUSAL=causal, STAGES=G.STAGES, num_warps=G.NUM_WARPS,
                           num_stages=1)
    torch.cuda.synchronize()

if len(sys.argv) > 2:
    # Timing three ways: do_bench (L2 flushed between calls), back-to-back launches, one launch.
    from triton.testing import do_bench
    for causal in (False, True):
        q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        scale = d ** -0.5
        o, lse = F.forward(q, k, v, scale, causal)
        delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()
        dq_acc = torch.zeros(b, h, n, d, device="cuda", dtype=torch.float32)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        run = lambda: G._launch_bwd_sm90((cdiv(n, G.BLOCK_N), h, b), q, k, v, do, lse, delta, dq_acc, dk, dv,
                                         *strides(q), *strides(k), *strides(v), *strides(do), *strides(dk),
                                         *strides(dv), n, n, h, 1, scale, scale * LOG2E.value, HEAD_DIM=d,
                                         BLOCK_M=G.BLOCK_M, BLOCK_N=G.BLOCK_N, IS_CAUSAL=causal,
                                         STAGES=G.STAGES, num_warps=G.NUM_WARPS, num_stages=1)
        run()
        flops = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)
        t_bench = do_bench(run, warmup=25, rep=100)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(); e0.record()
        for _ in range(20):
            run()
        e1.record(); torch.cuda.synchronize()
        t_loop = e0.elapsed_time(e1) / 20
        torch.cuda.synchronize(); e0.record(); run(); e1.record(); torch.cuda.synchronize()
        t_one = e0.elapsed_time(e1)
        print(f"causal={causal} do_bench {flops / t_bench / 1e9:.1f}  loop {flops / t_loop / 1e9:.1f}  "
              f"one {flops / t_one / 1e9:.1f} TFLOP/s", flush=True)
