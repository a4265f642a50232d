"""Compile a @gluon.jit kernel for sm_90 on a CPU-only box and report resources/SASS."""
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

def desc_sig(desc):
    # exact signature string the launcher would produce for a gluon TensorDescriptor
    return mangle_type(desc)

def gcompile(fn, signature, constexprs, num_warps=4, arch=90, show=True, **options):
    src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, **options))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), f.name], capture_output=True, text=True).stdout
    fig = {kk.lower(): int(v) for kk, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    fig["shared_dynamic"] = k.metadata.shared
    for name in ["HGMMA", "UTMALDG", "UTMASTG", "LDL", "STL", "MUFU.EX2", "SYNCS"]:
        fig[name] = len(re.findall(r"\b" + re.escape(name), sass))
    fig["setmaxnreg"] = k.asm["ptx"].count("setmaxnreg")
    fig["num_warps"] = k.metadata.num_warps
    if show:
        print(fn.__name__, " ".join(f"{a}={b}" for a, b in fig.items()))
    return k, fig, sass
