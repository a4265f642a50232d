"""Where a short call's time goes: host (Python + launch) against GPU (the kernels alone).

At short sequences a forward is over in tens of microseconds of GPU time, and the benchmark's
do_bench time becomes the host's time per call. For each case this prints and records:
    bench_ms    do_bench median, as the benchmark measures it (inputs require grad, L2 flushed)
    kernel_ms   the GPU time of this library's kernels per call (torch.profiler, device events)
    host_us     wall time per call of 20 back-to-back calls with the GPU idle at the start (the
                launch queue never fills, so this is the host's cost)
    first_us    host time of each of the first calls after a fresh compile (transients)
the host cost of each layer of one short call (--layers: the Triton launcher alone, dispatch, the
autograd function, the public function, the backward), and cProfile's top entries for the
slowest-host case. With --peers, instead: the host time per call of this library beside other
implementations (SDPA cuDNN, SDPA flash, FlashAttention-4 where importable) at one small batch, forward
and forward + backward:
    host_us     as above: wall time per call of 20 back-to-back calls from an idle GPU
    wall_us     wall time of 300 back-to-back calls / 300 (the host or the GPU, whichever is slower)
Usage:
    python -m flashattn.bench.host --out host.json [--seqlens 512,1024,2048,4096] [--head-dims 64,128,256]
        [--layers [--layers-seqlens 512,1024]]
    python -m flashattn.bench.host --peers sdpa-cudnn,sdpa-flash,fa4 --out host.json
        [--peers-seqlens 128,256,512,1024]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from flashattn import flash_attn_func
from flashattn.bench import peers as bench_peers
from flashattn.bench.cases import Case
from flashattn.ops import custom_ops, dispatch
from flashattn.ops.triton import backward as triton_backward
from flashattn.ops.triton import forward as triton_forward
from flashattn.ops.variant import from_causal

OUR_KERNELS = ("_attn_fwd", "_bwd", "_bwd_preprocess", "_attn_bwd_sm90", "_dq_convert")


def _host_us(fn, calls: int = 20, wait: bool = False) -> float:
    """Wall time per call of `calls` back-to-back calls from an idle GPU: the host's time per call, or
    with `wait` the time until the GPU has finished them too (the slower of host and GPU)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if wait:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _kernel_ms(fn, calls: int = 10) -> float:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.key_averages()
                   if any(e.key.startswith(k) for k in OUR_KERNELS))
    return total_us / calls / 1e3


def _cprofile(fn, calls: int = 50) -> str:
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    return text.getvalue()


def layers(d: int = 128, n: int = 512, causal: bool = True) -> dict[str, float]:
    """Host us per call of each layer of one call, innermost first."""
    h, b = 2048 // d, 16384 // n
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    scale, variant = d ** -0.5, from_causal(causal)
    options = (causal, -1, 0 if causal else -1, 0.0, None, 0.0, None, None, None, None, None, None, None, 0,
               False)
    out, lse = triton_forward.forward(q, k, v, scale, variant)
    dout = torch.randn_like(out)
    out_g = flash_attn_func(qg, kg, vg, causal=causal)
    calls = {
        "triton forward launcher": lambda: triton_forward.forward(q, k, v, scale, variant),
        "dispatch.forward": lambda: dispatch.forward(q, k, v, scale, variant, "triton"),
        "custom operator (no grad)": lambda: custom_ops.attention_forward(q, k, v, scale, *options, "triton"),
        "autograd function (grad)": lambda: custom_ops.attention(qg, kg, vg, scale, *options, "triton"),
        "flash_attn_func (no grad)": lambda: flash_attn_func(q, k, v, causal=causal),
        "flash_attn_func (grad)": lambda: flash_attn_func(qg, kg, vg, causal=causal),
        "triton backward launcher": lambda: triton_backward.backward(dout, q, k, v, out, lse, scale, variant),
        "out.backward": lambda: out_g.backward(dout, retain_graph=True),
    }
    result = {}
    for name, fn in calls.items():
        for _ in range(3):
            fn()
        result[name] = min(_host_us(fn) for _ in range(5))
        print(f"layer d{d} n{n} {name:28s} {result[name]:8.1f} us", flush=True)
    result["cprofile flash_attn_func (grad)"] = _cprofile(calls["flash_attn_func (grad)"])
    return result


def compare(wanted: list[str], seqlens: list[int], d: int = 128, h: int = 16) -> list[dict]:
    """Host time per call at (1, N, h, d) bf16 of flashattn and the `wanted` peers, forward (inputs
    requiring grad, as in training) and forward + backward; each figure the best of 5 repeats."""
    chosen, unavailable = bench_peers.available("gpu", wanted)
    for name, why in unavailable.items():
        print(f"peer {name} unavailable: {why}", flush=True)
    device = torch.device("cuda")
    rows = []
    for n in seqlens:
        for causal in (False, True):
            for peer in chosen:
                if peer.backward_only:
                    continue
                case = Case("bf16", 1, h, n, d, causal, "fwd")
                shape = (1, n, h, d) if peer.layout == "bnhd" else (1, h, n, d)
                q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                attn = peer.build(case, device)
                grad = torch.randn(shape, device=device, dtype=torch.bfloat16)

                def fwd():
                    return attn(q, k, v)

                def fwd_bwd():
                    attn(q, k, v).backward(grad)
                row = dict(impl=peer.name, seqlen=n, causal=causal, head_dim=d, nheads=h)
                for label, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    try:
                        for _ in range(5):   # compile, allocator and autotuning transients
                            fn()
                        row[f"{label}_host_us"] = min(_host_us(fn) for _ in range(5))
                        row[f"{label}_wall_us"] = min(_host_us(fn, 300, wait=True) for _ in range(3))
                    except Exception as exc:  # a peer that cannot run this shape: recorded, not fatal
                        row[f"{label}_error"] = bench_peers.describe_error(exc)
                rows.append(row)
                print(f"host N={n:5d} {'causal' if causal else 'full  '} {peer.name:12s} "
                      + "  ".join(f"{label} {row.get(f'{label}_host_us', float('nan')):6.0f} / "
                                  f"{row.get(f'{label}_wall_us', float('nan')):6.0f} us"
                                  for label in ("fwd", "fwd+bwd")), flush=True)
                del q, k, v
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="512,1024,2048,4096")
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--out", default="host.json")
    ap.add_argument("--layers", action="store_true", help="only the per-layer host costs")
    ap.add_argument("--layers-seqlens", default="512",
                    help="the lengths of the per-layer costs (head dim 128, causal): 1024 runs the ping-pong forward")
    ap.add_argument("--peers", default=None,
                    help="compare host time per call with these implementations (names as the benchmark's "
                         "--peers, e.g. sdpa-cudnn,sdpa-flash,fa4) instead of the per-case profile")
    ap.add_argument("--peers-seqlens", default="128,256,512,1024",
                    help="sequence lengths of --peers (batch 1, 16 heads of 128)")
    args = ap.parse_args()
    if args.peers is not None:
        rows = compare(args.peers.split(","), [int(x) for x in args.peers_seqlens.split(",")])
        with open(args.out, "w") as f:
            json.dump({"peers_host": rows, "method": "host_us: best of 5 x (20 back-to-back calls from an "
                       "idle GPU) / 20; wall_us: best of 3 x (300 calls) / 300"}, f, indent=1)
        return
    report = {f"layers_d128_n{n}_causal": layers(n=n) for n in map(int, args.layers_seqlens.split(","))}
    if args.layers:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        return
    rows, worst = [], (0.0, None)
    print(f"{'case':28s} {'bench_ms':>9s} {'kernel_ms':>9s} {'host_us':>8s}  first_us")
    for d in [int(x) for x in args.head_dims.split(",")]:
        for causal in (False, True):
            for passname in ("fwd", "bwd"):
                for n in [int(x) for x in args.seqlens.split(",")]:
                    h, b = 2048 // d, 16384 // n
                    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16,
                                           requires_grad=True) for _ in range(3))
                    if passname == "fwd":
                        def fn():
                            return flash_attn_func(q, k, v, causal=causal)
                    else:
                        out = flash_attn_func(q, k, v, causal=causal)
                        grad = torch.randn_like(out)

                        def fn():
                            out.backward(grad, retain_graph=True)
                    first = []
                    for _ in range(6):   # the first is the compile (or a cache hit) of a new shape
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        fn()
                        first.append((time.perf_counter() - t) * 1e6)
                    bench_ms = do_bench(fn, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")
                    host_us = _host_us(fn)
                    kernel_ms = _kernel_ms(fn)
                    name = f"d{d} {'causal' if causal else 'full'} {passname} n{n}"
                    row = dict(case=name, head_dim=d, causal=causal, pass_=passname, seqlen=n,
                               bench_ms=bench_ms, kernel_ms=kernel_ms, host_us=host_us,
                               first_us=[round(x) for x in first])
                    rows.append(row)
                    print(f"{name:28s} {bench_ms:9.3f} {kernel_ms:9.3f} {host_us:8.0f}  "
                          f"{' '.join(str(round(x)) for x in first[1:])}", flush=True)
                    if host_us > worst[0]:
                        worst = (host_us, fn, name)
                    del q, k, v
    report["rows"] = rows
    if worst[1] is not None:
        report["cprofile_case"] = worst[2]
        report["cprofile"] = _cprofile(worst[1])
        print(f"cProfile of {worst[2]}:\n{report['cprofile']}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
