"""Probe: the ping-pong Gluon forward (flashattn/ops/triton/forward_sm90.py) against the forward the
library runs without it (configs' tables: the warp-specialized or the portable kernel) and a float64
reference: errors on odd shapes (with NaN padding around strided inputs), then TFLOP/s on the bench
grid (16k tokens, H*D = 2048) beside SDPA's cuDNN and flash backends.
SHORT=1 times 512-4k only; DIMS=128,256 picks head dims; TIMING_ONLY=1 skips the error checks; STAGES_SWEEP=128:3,64:4 also times
those ring depths (head dim:slots); COMPARE_GRID=1 times both grids (persistent and one program per
tile, configs.ping_pong_persistent) as pingpong_persistent and pingpong_grid."""
import json, math, os, sys, time
import torch
import torch.nn.functional as TF
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench
from flashattn.ops.triton import configs, forward as F, forward_sm90 as P

out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%F"), "command": " ".join(sys.argv),
       "env": {k: v for k, v in os.environ.items() if k in ("SHORT", "DIMS", "TIMING_ONLY", "STAGES_SWEEP", "COMPARE_GRID")}, "errors": [], "timing": []}
forced = lambda *args: True
configs.ping_pong_forward = forced


def other(fn):
    """fn() with the ping-pong kernel switched off (the library's previous choice)."""
    configs.ping_pong_forward = lambda *args: False
    try:
        return fn()
    finally:
        configs.ping_pong_forward = forced


def ref64(q, k, v, causal, scale):
    qf, kf, vf = (x.double().transpose(1, 2) for x in (q, k, v))
    g = qf.shape[1] // kf.shape[1]
    kk, vv = kf.repeat_interleave(g, 1), vf.repeat_interleave(g, 1)
    s = qf @ kk.transpose(-1, -2) * scale
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(sk - sq).logical_not(), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1).nan_to_num() @ vv).transpose(1, 2), lse


def nan_padded(x):
    b, s, h, d = x.shape
    buf = torch.full((b, s + 7, h + 2, d), float("nan"), dtype=x.dtype, device=x.device)
    view = buf[:, 3:3 + s, 1:1 + h]
    view.copy_(x)
    return view


DIMS = [int(x) for x in os.environ.get("DIMS", "64,128,256").split(",")]
shapes = [(2, 1025, 1025, 8, 2), (1, 17, 300, 2, 1), (1, 300, 17, 2, 2), (1, 1, 129, 2, 2), (2, 513, 700, 6, 2),
          (1, 2048, 2048, 4, 4), (1, 777, 1500, 8, 1), (1, 128, 128, 2, 2), (3, 200, 64, 2, 1)]
for dtype in () if os.environ.get("TIMING_ONLY") else (torch.bfloat16, torch.float16):
    for d in DIMS:
        for (b, sq, sk, h, hk) in shapes:
            for causal in (False, True):
                torch.manual_seed(0)
                q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
                k, v = (torch.randn(b, sk, hk, d, device="cuda", dtype=dtype) for _ in range(2))
                scale = d ** -0.5
                row = dict(dtype=str(dtype)[6:], b=b, sq=sq, sk=sk, h=h, hk=hk, d=d, causal=causal)
                try:
                    row["took"] = P.applies(q, k, v, F.from_causal(causal), scale)
                    o, lse = F.forward(q, k, v, scale, causal)
                    torch.cuda.synchronize()
                    o2, lse2 = other(lambda: F.forward(q, k, v, scale, causal))
                    ro, rl = ref64(q, k, v, causal, scale)
                    rl = torch.where(torch.isinf(rl), float("inf"), rl)
                    fin = torch.isfinite(rl)
                    row["o"] = [(o.double() - ro).abs().max().item(), (o2.double() - ro).abs().max().item()]
                    row["lse"] = [(lse.double() - rl)[fin].abs().max().item() if fin.any() else 0.0,
                                  (lse2.double() - rl)[fin].abs().max().item() if fin.any() else 0.0]
                    row["lse_inf_ok"] = bool(torch.equal(torch.isinf(lse), ~fin))
                    po, pl = F.forward(*map(nan_padded, (q, k, v)), scale, causal)
                    row["nan_padding_equal"] = bool(torch.equal(po, o) and torch.equal(pl, lse))
                    row["ok"] = (row["took"] and row["o"][0] <= 2 * row["o"][1] + 1e-3 and row["lse"][0] <= 2 * row["lse"][1] + 1e-4
                                 and row["lse_inf_ok"] and row["nan_padding_equal"])
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                    row["ok"] = False
                out["errors"].append(row)
                print("ERR", row, flush=True)

lengths = (512, 1024, 2048, 4096) if os.environ.get("SHORT") else (512, 1024, 2048, 4096, 8192, 16384)
for d in DIMS:
    h = 2048 // d
    for causal in (False, True):
        for n in lengths:
            b = 16384 // n
            q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            scale = d ** -0.5
            flops = 4 * b * h * n * n * d / (2 if causal else 1)
            tf = lambda fn: round(flops / do_bench(fn, warmup=25, rep=100) / 1e9, 1)
            row = dict(d=d, causal=causal, n=n,
                       pingpong=tf(lambda: F.forward(q, k, v, scale, causal)),
                       before=other(lambda: tf(lambda: F.forward(q, k, v, scale, causal))))
            for item in filter(None, os.environ.get("STAGES_SWEEP", "").split(",")):
                sd, st = map(int, item.split(":"))
                if sd == d:
                    default, P.STAGES[d, causal] = P.STAGES[d, causal], st
                    row[f"pingpong_s{st}"] = tf(lambda: F.forward(q, k, v, scale, causal))
                    P.STAGES[d, causal] = default
            if os.environ.get("COMPARE_GRID"):
                chosen = configs.ping_pong_persistent
                for name, persistent in (("pingpong_persistent", True), ("pingpong_grid", False)):
                    configs.ping_pong_persistent = lambda *args, persistent=persistent: persistent
                    row[name] = tf(lambda: F.forward(q, k, v, scale, causal))
                configs.ping_pong_persistent = chosen
            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        row[name] = tf(lambda: TF.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
                except Exception as e:
                    row[name] = None
            out["timing"].append(row)
            print("TIME", row, flush=True)

path = os.path.join(os.environ.get("OUT", "."), "fwd_sm90.json")
json.dump(out, open(path, "w"), indent=1)
bad = [r for r in out["errors"] if not r["ok"]]
print("bad:", len(bad), "of", len(out["errors"]))
for r in bad[:12]:
    print("  ", r)
for r in out["timing"]:
    print(f"d{r['d']} {'causal' if r['causal'] else 'full  '} {r['n']:>6}  pingpong {r['pingpong']:>6}  before {r['before']:>6}  "
          f"cudnn {r['cudnn']}  sdpa_flash {r['sdpa_flash']}", {k: v for k, v in r.items() if k.startswith("pingpong_")})
