import sys, os, subprocess, traceback
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, triton
torch.manual_seed(0)
print(torch.cuda.get_device_name(), triton.__version__)
from triton.experimental.gluon import language as gl

def ref_attn(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal).to(q.dtype)

# 1. tiny TMA + wgmma example
import ex_wgmma
(q, k, s), (ad, bd, cd) = ex_wgmma.make_descs(device="cuda")
ex_wgmma.qk_tile_kernel[(2,)](ad, bd, cd, num_warps=4)
torch.cuda.synchronize()
print("1 qk_tile max err", (s - q.float() @ k.float().T).abs().max().item())

# 2. plain FA
import ex_fa
for D in (64, 128):
    for causal in (False, True):
        for nw in (4, 8):
            q, k, v = (torch.randn(2, 3, 512, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            try:
                o = ex_fa.attention(q, k, v, causal, num_warps=nw)
                print(f"2 fa D={D} causal={causal} nw={nw} err", (o.float() - ref_attn(q, k, v, causal).float()).abs().max().item())
            except Exception as e:
                print(f"2 fa D={D} causal={causal} nw={nw} FAILED", type(e).__name__, str(e)[:300])

# 3. warp-specialized FA
import ex_ws
for D in (64, 128):
    for nw, mx in ((4, None), (4, 168), (8, 168)):
        q, k, v = (torch.randn(2, 3, 512, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        try:
            o = ex_ws.attention_ws(q, k, v, STAGES=2 if D == 128 else 3, num_warps=nw, maxnreg=mx)
            print(f"3 ws D={D} nw={nw} maxnreg={mx} err", (o.float() - ref_attn(q, k, v, False).float()).abs().max().item())
        except Exception as e:
            print(f"3 ws D={D} nw={nw} maxnreg={mx} FAILED", type(e).__name__, str(e)[:300])

# timing (rough)
q, k, v = (torch.randn(4, 16, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
flops = 4 * 4 * 16 * 4096 * 4096 * 128
for name, fn in [("fa nw4", lambda: ex_fa.attention(q, k, v, False, num_warps=4)),
                 ("fa nw8", lambda: ex_fa.attention(q, k, v, False, num_warps=8)),
                 ("ws nw4", lambda: ex_ws.attention_ws(q, k, v, STAGES=2, num_warps=4, maxnreg=168)),
                 ("ws nw8", lambda: ex_ws.attention_ws(q, k, v, STAGES=2, num_warps=8, maxnreg=168)),
                 ("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))]:
    try:
        ms = triton.testing.do_bench(fn)
        print(f"T {name}: {ms:.3f} ms {flops / ms / 1e9:.1f} TFLOPS")
    except Exception as e:
        print("T", name, "FAILED", str(e)[:200])

# 4. device-side descriptor
import ex_devdesc
x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16); y = torch.empty_like(x)
try:
    ex_devdesc.devdesc_copy[(4,)](x, y, 256, 64, 64, 64); torch.cuda.synchronize()
    print("4a devdesc without allocator OK?", torch.equal(y, x * 2))
except Exception as e:
    print("4a devdesc without allocator FAILED:", type(e).__name__, str(e)[:300])
triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
ex_devdesc.devdesc_copy[(4,)](x, y, 256, 64, 64, 64); torch.cuda.synchronize()
print("4b devdesc with allocator ok", torch.equal(y, x * 2))

# 5. plain triton TensorDescriptor passed to gluon kernel
from triton.tools.tensor_descriptor import TensorDescriptor as TD
try:
    a = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16); b = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(256, 64, device="cuda", dtype=torch.float32)
    ex_wgmma.qk_tile_kernel[(2,)](TD.from_tensor(a, [128, 64]), TD.from_tensor(b, [64, 64]), TD.from_tensor(c, [128, 64]), num_warps=4)
    torch.cuda.synchronize(); print("5 plain TD OK?!")
except Exception as e:
    print("5 plain triton TensorDescriptor FAILED:", type(e).__name__, str(e)[:300])

# 6. TRITON_INTERPRET with gluon
code = r'''
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
@gluon.jit
def k(x, y, N: gl.constexpr):
    l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    o = gl.arange(0, N, layout=l)
    gl.store(y + o, gl.load(x + o) * 2)
x = torch.arange(128, dtype=torch.float32); y = torch.empty_like(x)
k[(1,)](x, y, 128)
print("interp ok", torch.equal(y, x * 2))
'''
r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True)
print("6 TRITON_INTERPRET rc", r.returncode, (r.stdout + r.stderr)[-600:])
