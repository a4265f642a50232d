"""Which Triton kernel runs a call: the one place that decides.

Five kernel families serve the Triton backend:
    split-kv          decode.py: short queries against long keys (flash-decoding: keys split across
                      programs, GQA heads packed into one tile), forward only, any GPU
    portable          forward.py `_attn_fwd` and backward.py `_bwd`: every option, every dtype and
                      head dim, any GPU Triton supports (and the CPU interpreter)
    ping-pong         forward_sm90.py: FlashAttention-3's schedule in Gluon, plain forward, Hopper
    warp-specialized  forward.py `_attn_fwd_ws`: Triton's automatic warp specialization, plain
                      forward, Hopper
    one-pass          backward_sm90.py: 5 products per tile with dQ added into fp32, plain
                      backward, Hopper

`kernel_for` gives the family for one pass of one call. The Hopper kernels take only what they
implement (`forward_sm90.DTYPES` / `HEAD_DIMS` and their peers): plain attention (causal or not, GQA,
any lengths, packed sequences; no option, no bias gradient), inputs that TMA descriptors can address
(common.tma_ready), and only where the GPU architecture's own tables in configs.py list them for this
head dim, causal flag and length: those tables hold where each kernel measured faster than the
portable one (benchmarks/TUNING.md). Everything else runs the portable kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flashattn.ops.triton import backward_sm90, configs, decode, forward_sm90
from flashattn.ops.triton.common import options, tma_ready
from flashattn.ops.variant import Variant

PORTABLE = "portable"
PING_PONG = "ping-pong"
WARP_SPECIALIZED = "warp-specialized"
ONE_PASS = "one-pass"
SPLIT_KV = "split-kv"
# The split-KV forward (decode.py) serves a short query against any key length; it implements these
# options and no dropout, bias, mask, block mask or packed sequences.
SPLIT_KV_MAX_QUERIES = 16


def _split_kv(q: torch.Tensor, variant: Variant) -> bool:
    return (q.shape[1] <= SPLIT_KV_MAX_QUERIES and variant.dropout_p == 0.0 and variant.bias is None
            and variant.mask is None and variant.block_mask is None and not variant.varlen)


def kernel_for(pass_: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: Variant,
               softmax_scale: float, dout: torch.Tensor | None = None, bias_grad: bool = False) -> str:
    """The kernel family that runs `pass_` ("fwd" or "bwd") of this call; inputs as the launchers
    receive them ((B, S, H, D), last dim contiguous). In order:

    forward   split-kv         seqlen_q <= SPLIT_KV_MAX_QUERIES (decoding; the dense kernels' tiles
                               would hold one query row of one head), without dropout, bias, mask,
                               block mask or packed sequences
              ping-pong        plain, fp16/bf16, head dim 64/128/256, softmax_scale > 0 (the kernel
                               takes the row max before scaling), listed in configs' ping-pong table
              warp-specialized plain, listed in configs' warp-specialized table (fp16/bf16, head
                               dims 64/128/256)
    backward  one-pass         plain, no bias gradient, fp16/bf16, head dim 64/128/256, listed in
                               configs' one-pass table (its deterministic column with
                               variant.deterministic)
    and for both, TMA-addressable q, k, v (and dout); otherwise portable. A call with its own
    tile_size always runs the portable kernels (the others' tiles are fixed). Plain includes packed
    sequences (Variant.is_plain_or_varlen), looked up in the tables at their longest sequence.
    """
    if variant.tile_size:
        return PORTABLE          # the caller's tiles: the Hopper and split-KV kernels' are fixed
    if pass_ == "fwd" and _split_kv(q, variant):
        return SPLIT_KV
    if not variant.is_plain_or_varlen:
        return PORTABLE
    head_dim, causal, device = q.shape[-1], variant.causal, q.device
    seqlen = max(variant.max_seqlen_q, variant.max_seqlen_k) if variant.varlen else max(q.shape[1], k.shape[1])
    if pass_ == "fwd":
        if (q.dtype in forward_sm90.DTYPES and head_dim in forward_sm90.HEAD_DIMS and softmax_scale > 0
                and configs.ping_pong_forward(head_dim, causal, seqlen, device) and tma_ready(q, k, v)):
            return PING_PONG
        if configs.warp_specialized(head_dim, q.dtype, causal, seqlen, device) and tma_ready(q, k, v):
            return WARP_SPECIALIZED
        return PORTABLE
    if (not bias_grad and q.dtype in backward_sm90.DTYPES and head_dim in backward_sm90.HEAD_DIMS
            and configs.one_pass_backward(head_dim, q.dtype, causal, seqlen, device, variant.deterministic)
            and tma_ready(q, k, v, dout)):
        return ONE_PASS
    return PORTABLE


@dataclass(frozen=True)
class Program:
    """One kind of program of a kernel: it holds `rows` rows of one side on chip (`owns`: "queries" or
    "keys") while the other side streams past `step` rows at a time, so that side is read from memory
    once per owned block (the paper's Theorem 2 counts those passes)."""
    role: str          # "fwd", "split-kv", "dkdv", "dk", "dv", "dq", "dkdv+dq"
    owns: str
    rows: int
    step: int


@dataclass(frozen=True)
class Tiles:
    """The kernel family that runs one pass of a call and the tile shapes of its programs."""
    kernel: str
    programs: tuple[Program, ...]


def tiles(pass_: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: Variant,
          softmax_scale: float, dout: torch.Tensor | None = None, bias_grad: bool = False) -> Tiles:
    """The family (kernel_for) and the tiles that `pass_` of this call runs with in this process
    (configs.chosen: after a launch of the same shape, the shape that launch used). Arguments as
    kernel_for's; the launchers' own preprocessing programs (backward's delta, dQ's conversion) are
    row-wise passes and not listed."""
    kernel = kernel_for(pass_, q, k, v, variant, softmax_scale, dout, bias_grad)
    head_dim, dtype, causal, device = q.shape[-1], q.dtype, variant.causal, q.device
    seqlen = max(variant.max_seqlen_q, variant.max_seqlen_k) if variant.varlen else max(q.shape[1], k.shape[1])
    if kernel == SPLIT_KV:
        t, _ = decode.plan(q.shape[0], k.shape[2], q.shape[1] * (q.shape[2] // k.shape[2]), k.shape[1], head_dim,
                           q.element_size(), False, 0, device)
        return Tiles(kernel, (Program("split-kv", "queries", t.block_m, t.block_n),))
    if kernel == PING_PONG:
        return Tiles(kernel, (Program("fwd", "queries", forward_sm90.BLOCK_M[head_dim], forward_sm90.BLOCK_N[head_dim]),))
    if kernel == WARP_SPECIALIZED:
        t = configs.chosen("fwd_ws", head_dim, dtype, causal, seqlen, device)
        return Tiles(kernel, (Program("fwd", "queries", t.block_m, t.block_n),))
    if kernel == ONE_PASS:
        return Tiles(kernel, (Program("dkdv+dq", "keys", backward_sm90.BLOCK_N[head_dim],
                                      backward_sm90.BLOCK_M[head_dim]),))
    opts = options(variant, q, k, softmax_scale)
    if pass_ == "fwd":
        t = opts.tiles(configs.chosen("fwd", head_dim, dtype, causal, seqlen, device, opts.extra, variant.tile_size))
        return Tiles(kernel, (Program("fwd", "queries", t.block_m, t.block_n),))
    cfg = configs.chosen("bwd", head_dim, dtype, causal, seqlen, device,
                         opts.extra + ("+dbias" if bias_grad else ""), variant.tile_size)
    kv, qc = opts.tiles(cfg.kv), opts.tiles(cfg.q)
    programs = [Program("dv" if cfg.dk is not None else "dkdv", "keys", kv.block_n, kv.block_m)]
    if cfg.dk is not None:
        dk = opts.tiles(cfg.dk)
        programs.append(Program("dk", "keys", dk.block_n, dk.block_m))
    programs.append(Program("dq", "queries", qc.block_m, qc.block_n))
    return Tiles(kernel, tuple(programs))
