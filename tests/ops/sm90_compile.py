"""Compile, for sm_90 and without a GPU, every Triton and Gluon kernel the library's forward and backward
would launch on an H100 for plain bf16 calls (the sm_90 tables' shapes, and the Hopper kernels where
the tables send them), and report each kernel's shared memory and warps as JSON lines.

With the argument `gluon`, compile every build of the Gluon kernels instead (head dims, causal,
persistent or deterministic, packed sequences or not), those no table sends a call to included; with
`varlen`, the packed-sequence (VARLEN) builds that bf16 varlen calls launch: the portable kernels, and
the Hopper kernels where the tables send the longest sequence; with `wide`, the portable kernels' WIDE
builds (tiles from 64-bit bases, for tensors past 2^31 elements within a sequence); with `dropout`,
the portable kernels' dropout builds.

Run by tests/ops/test_sm90_compile.py in a process of its own: the kernels must be real @triton.jit
functions, which the interpreter the other tests use (TRITON_INTERPRET=1) replaces. The library's
host code runs as on the GPU; only the launch is replaced by a compile (Triton's own binder and
compiler, with the target fixed to sm_90), and the device checks are told they are on sm_90.
"""
import json
import os
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile, make_backend
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import create_function_from_signature

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without the interpreter"

from flashattn.ops.triton import backward, configs, forward, forward_sm90, launch   # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
CUDA = torch.device("cuda", 0)


def compile_sm90(fn, args: tuple, kwargs: dict, num_warps: int, num_stages: int):
    """What JITFunction.run would compile for these arguments, for sm_90."""
    backend = make_backend(SM90)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    bound, specialization, options = binder(*args, **opts, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, {**opts, **kwargs}, bound, specialization, options)
    source = (GluonASTSource if fn.is_gluon() else ASTSource)(fn, signature, constexprs, attrs)
    return triton_compile(source, target=SM90, options=options.__dict__)


def _on_cuda(fn):
    """fn with every torch.device argument replaced by CUDA."""
    return lambda *args, **kwargs: fn(*(CUDA if isinstance(x, torch.device) else x for x in args), **kwargs)


def _compile_instead_of_launch() -> list[dict]:
    """Replace every launch by a compile for sm_90 and the device checks by an H100's answers; the
    rows of what was compiled accumulate in the returned list."""
    compiled = []

    def compile_instead(self, grid, args, num_warps, num_stages, pdl, kwargs):
        kernel = compile_sm90(self.fn, args, {**kwargs, "launch_pdl": True} if pdl else kwargs, num_warps, num_stages)
        compiled.append(dict(kernel=self.fn.__name__, shared=kernel.metadata.shared,
                             num_warps=kernel.metadata.num_warps, launch_warps=num_warps))

    launch.Launcher._launch = compile_instead
    configs._capability = lambda index: (9, 0)
    configs.sm_resources = lambda device: (132, 227 * 1024)
    forward_sm90._tile_counter = lambda device: torch.zeros(1, dtype=torch.int32)   # no CUDA streams here
    # The tables are asked about the CPU tensors' device: answer for an H100's.
    for name in ("_table_config", "warp_specialized", "ping_pong_forward", "ping_pong_persistent",
                 "one_pass_backward"):
        setattr(configs, name, _on_cuda(getattr(configs, name)))
    return compiled


def main() -> None:
    compiled = _compile_instead_of_launch()
    for head_dim in (64, 128, 256):
        for seqlen in (512, 4096):
            for causal in (False, True):
                q = torch.zeros(1, seqlen, 2, head_dim, dtype=torch.bfloat16)
                start = len(compiled)
                out, lse = forward.forward(q, q, q, head_dim ** -0.5, causal)
                backward.backward(q, q, q, q, out, lse, head_dim ** -0.5, causal)
                for row in compiled[start:]:
                    print(json.dumps(dict(head_dim=head_dim, seqlen=seqlen, causal=causal, **row)), flush=True)


VARLEN_LONGEST = (700, 4096, 8192)     # the longest sequence of each packed batch that varlen() compiles


def varlen() -> None:
    """The packed-sequence builds (VARLEN), bf16, causal or not, deterministic or not: batches whose
    longest sequence is 700 (the portable kernels, and the ping-pong forward at head dim 128), 4096 and
    8192 (the Hopper kernels the tables list at that length)."""
    from flashattn.ops.variant import Variant

    compiled = _compile_instead_of_launch()
    for longest in VARLEN_LONGEST:
        lens = [300, longest, 17]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        for head_dim in (64, 128, 256):
            for causal in (False, True):
                for deterministic in (False, True):
                    q = torch.zeros(1, sum(lens), 2, head_dim, dtype=torch.bfloat16)
                    variant = Variant(causal=causal, window_right=0 if causal else -1, cu_seqlens_q=cu,
                                      cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
                                      deterministic=deterministic)
                    start = len(compiled)
                    if not deterministic:
                        out, lse = forward.forward(q, q, q, head_dim ** -0.5, variant)
                    backward.backward(q, q, q, q, out, lse, head_dim ** -0.5, variant)
                    for row in compiled[start:]:
                        print(json.dumps(dict(head_dim=head_dim, longest=longest, causal=causal,
                                              deterministic=deterministic, **row)), flush=True)


def wide() -> None:
    """The WIDE builds of the portable kernels (common.py) for plain bf16 calls, causal or not, at
    each head dim: the offset check answers yes, and the Hopper kernels are not chosen."""
    compiled = _compile_instead_of_launch()
    for module in (forward, backward):
        module.wide = lambda *args: True
    for name in ("warp_specialized", "ping_pong_forward", "one_pass_backward"):
        setattr(configs, name, lambda *args, **kwargs: False)
    for head_dim in (64, 128, 256):
        for causal in (False, True):
            q = torch.zeros(1, 4096, 2, head_dim, dtype=torch.bfloat16)
            start = len(compiled)
            out, lse = forward.forward(q, q, q, head_dim ** -0.5, causal)
            backward.backward(q, q, q, q, out, lse, head_dim ** -0.5, causal)
            for row in compiled[start:]:
                print(json.dumps(dict(head_dim=head_dim, causal=causal, **row)), flush=True)


def dropout() -> None:
    """The portable kernels' dropout builds (the tile's keep mask from Philox, common.dropout_keep) for
    bf16 calls at each head dim, causal or not (the Hopper kernels take no dropout)."""
    from flashattn.ops.variant import Variant

    compiled = _compile_instead_of_launch()
    for head_dim in (64, 128, 256):
        for causal in (False, True):
            q = torch.zeros(1, 4096, 2, head_dim, dtype=torch.bfloat16)
            variant = Variant(causal=causal, window_right=0 if causal else -1, dropout_p=0.1, seed=2 ** 40 + 3)
            start = len(compiled)
            out, lse = forward.forward(q, q, q, head_dim ** -0.5, variant)
            backward.backward(q, q, q, q, out, lse, head_dim ** -0.5, variant)
            for row in compiled[start:]:
                print(json.dumps(dict(head_dim=head_dim, causal=causal, **row)), flush=True)


POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DK": "*bf16", "DV": "*bf16",
            "LSE": "*fp32", "DELTA": "*fp32", "DQ_ACC": "*fp32", "SEM": "*i32", "COUNTER": "*i32"}
# The packed-sequence arguments: these types with VARLEN, None (a constexpr) without, as the launches pass them.
VARLEN_ARGS = {"CU_SEQLENS_Q": "*i32", "CU_SEQLENS_K": "*i32", "max_seqlen_q": "i32"}


def gluon_builds() -> None:
    from flashattn.ops.triton import backward_sm90 as B, forward_sm90 as F

    def kind(name: str) -> str:
        if name in POINTERS:
            return POINTERS[name]
        if name in ("softmax_scale", "qk_scale"):
            return "fp32"
        return "constexpr" if name.isupper() or name == "num_warps" else "i32"

    builds = [(F._attn_fwd_sm90, F.NUM_WARPS, dict(F.build_constexprs(d, c), PERSISTENT=persistent, VARLEN=varlen))
              for d in F.HEAD_DIMS for c in (False, True)
              for persistent, varlen in ((False, False), (True, False), (True, True))]   # packed: persistent
    builds += [(B._attn_bwd_sm90, B.NUM_WARPS, dict(B.build_constexprs(d, det), IS_CAUSAL=c, VARLEN=varlen))
               for d in B.HEAD_DIMS for c in (False, True) for det in (False, True) for varlen in (False, True)]
    for fn, warps, constexprs in builds:
        signature = {p.name: kind(p.name) for p in fn.params}
        unset = {name: None for name in VARLEN_ARGS if name in signature and not constexprs["VARLEN"]}
        signature.update({name: VARLEN_ARGS[name] if constexprs["VARLEN"] else "constexpr"
                          for name in VARLEN_ARGS if name in signature})
        source = GluonASTSource(fn=fn, signature=signature, constexprs={**constexprs, **unset, "num_warps": warps})
        kernel = triton_compile(source, target=SM90, options=dict(num_warps=warps))
        print(json.dumps(dict(kernel=fn.__name__, launch_warps=warps, **constexprs, shared=kernel.metadata.shared,
                              num_warps=kernel.metadata.num_warps)), flush=True)


if __name__ == "__main__":
    sys.exit({"gluon": gluon_builds, "varlen": varlen, "wide": wide, "dropout": dropout}.get(sys.argv[1] if sys.argv[1:] else "", main)())
