"""Probe: the one-pass Gluon backward (flashattn/ops/triton/backward_sm90.py) against the portable
backward (backward.py, deterministic) and a float64 reference: errors on odd shapes, then TFLOP/s of the
whole backward call (preprocess, kernel, dQ conversion) on the bench grid (16k tokens, H*D = 2048).
TIMING_ONLY=1 skips the error checks."""
import json, os, sys, time
import torch
from triton.testing import do_bench
from flashattn.ops.triton import configs, forward as F, backward as B, backward_sm90 as G
from flashattn.ops.variant import Variant

out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%F"), "command": " ".join(sys.argv),
       "errors": [], "timing": []}
det = lambda causal: Variant(causal=causal, window_right=0 if causal else -1, deterministic=True)
configs.one_pass_backward = lambda *args, **kwargs: True     # every length, to find where it wins


def portable(fn):
    """fn() with the portable backward (the one-pass kernel switched off)."""
    configs.one_pass_backward = lambda *args, **kwargs: False
    try:
        return fn()
    finally:
        configs.one_pass_backward = lambda *args, **kwargs: True


def ref64(q, k, v, do, causal, scale):
    qf, kf, vf, dof = (x.double().transpose(1, 2).requires_grad_(x is not do) for x in (q, k, v, do))
    g = qf.shape[1] // kf.shape[1]
    kk, vv = kf.repeat_interleave(g, 1), vf.repeat_interleave(g, 1)
    s = qf @ kk.transpose(-1, -2) * scale
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(sk - sq).logical_not(), float("-inf"))
    o = torch.softmax(s, -1).nan_to_num() @ vv
    o.backward(dof)
    return [x.grad.transpose(1, 2) for x in (qf, kf, vf)]


shapes = [(1, 128, 128, 2, 2, 128), (2, 1025, 1025, 4, 2, 64), (1, 300, 17, 2, 2, 64), (1, 17, 300, 2, 1, 64), (2, 1025, 1025, 4, 2, 128), (1, 17, 300, 2, 1, 128), (1, 300, 17, 2, 2, 128),
          (2, 513, 700, 6, 2, 64), (1, 1, 129, 2, 2, 64), (1, 2048, 2048, 4, 4, 128), (1, 777, 1500, 8, 1, 64)]
QUICK = os.environ.get("QUICK") == "1"   # a few shapes, bf16 only, D128 timings
for dtype in () if os.environ.get("TIMING_ONLY") else (torch.bfloat16,) if QUICK else (torch.bfloat16, torch.float16):
    for (b, sq, sk, h, hk, d) in (shapes[1:4] if os.environ.get("D64_BM64") else shapes[4:7] + shapes[9:10] if QUICK
                                  else shapes):
        for causal in (False, True):
            torch.manual_seed(0)
            q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(b, sk, hk, d, device="cuda", dtype=dtype) for _ in range(2))
            do = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
            scale = d ** -0.5
            o, lse = F.forward(q, k, v, scale, causal)
            row = dict(dtype=str(dtype)[6:], b=b, sq=sq, sk=sk, h=h, hk=hk, d=d, causal=causal)
            try:
                got = B.backward(do, q, k, v, o, lse, scale, causal)[:3]
                row["took_sm90"] = G.applies(q, k, v, do, Variant(causal=causal, window_right=0 if causal else -1), False)
                same = portable(lambda: B.backward(do, q, k, v, o, lse, scale, causal))[:3]
                again = [B.backward(do, q, k, v, o, lse, scale, det(causal))[:3] for _ in range(2)]
                row["det_bitwise"] = all(torch.equal(a, b) for a, b in zip(*again))
                row["ddq_det"] = round((again[0][0].double() - ref64(q, k, v, do, causal, scale)[0]).abs().max().item(), 5)
                exact = ref64(q, k, v, do, causal, scale)
                for name, x, y, z in zip("qkv", got, same, exact):
                    row["d" + name] = [round((x.double() - z).abs().max().item(), 5), round((y.double() - z).abs().max().item(), 5)]
                row["ok"] = (all(row["d" + n][0] <= 2 * row["d" + n][1] + 1e-3 for n in "qkv") and row["det_bitwise"]
                             and row["ddq_det"] <= 2 * row["dq"][1] + 1e-3)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                row["ok"] = False
            out["errors"].append(row)
            print("ERR", row, flush=True)

for d in (128,) if QUICK else (64,) if os.environ.get("D64_BM64") else (128, 64):
    h = 2048 // d
    for causal in (False, True):
        for n in (512, 1024, 2048, 4096, 8192, 16384):
            b = 16384 // n
            q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            scale = d ** -0.5
            o, lse = F.forward(q, k, v, scale, causal)
            flops = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)
            tf = lambda fn: round(flops / do_bench(fn, warmup=25, rep=100) / 1e9, 1)
            row = dict(d=d, causal=causal, n=n, block_m=G.BLOCK_M[d],
                       onepass=tf(lambda: B.backward(do, q, k, v, o, lse, scale, causal)),
                       deterministic=tf(lambda: B.backward(do, q, k, v, o, lse, scale, det(causal))),
                       portable=portable(lambda: tf(lambda: B.backward(do, q, k, v, o, lse, scale, causal))))
            delta = torch.empty_like(lse)
            dq_acc = torch.zeros(b, h, n, d, device="cuda", dtype=torch.float32)
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            from flashattn.ops.triton.common import strides, LOG2E, cdiv
            if os.environ.get("D64_BM64") and d == 64:
                # The same with 64-row steps at head dim 64 (the table's choice is 128).
                G.BLOCK_M[64] = 64
                row["onepass_bm64"] = tf(lambda: B.backward(do, q, k, v, o, lse, scale, causal))
                row["deterministic_bm64"] = tf(lambda: B.backward(do, q, k, v, o, lse, scale, det(causal)))
                G.BLOCK_M[64] = 128
            kern = lambda: G._launch_bwd_sm90((cdiv(n, G.BLOCK_N), h, b), q, k, v, do, lse, delta, dq_acc, dq_acc, dk, dv,
                *strides(q), *strides(k), *strides(v), *strides(do), *strides(dk), *strides(dv), n, n, h, 1, scale,
                scale * LOG2E.value, HEAD_DIM=d, BLOCK_M=G.BLOCK_M[d], BLOCK_N=G.BLOCK_N, IS_CAUSAL=causal,
                STAGES=G.STAGES, DQ_STAGES=G.DQ_STAGES, DETERMINISTIC=False, num_warps=G.NUM_WARPS, num_stages=1)
            row["kernel_only"] = tf(kern)
            out["timing"].append(row)
            print("TIME", row, flush=True)

path = os.path.join(os.environ.get("OUT", "."), "bwd_sm90.json")
json.dump(out, open(path, "w"), indent=1)
print("bad:", [r for r in out["errors"] if not r["ok"]])
for r in out["timing"]:
    print(f"d{r['d']} {'causal' if r['causal'] else 'full  '} {r['n']:>6}  onepass {r['onepass']:>6}  kernel {r['kernel_only']:>6}  "
          f"deterministic {r['deterministic']:>6}  portable {r['portable']:>6}  "
          f"bm64 {r.get('onepass_bm64', '-')} / {r.get('deterministic_bm64', '-')}")
