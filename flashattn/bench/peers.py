"""The implementations measured, all in this process, each in its native layout.

A peer turns a case and a device into an attention function `fn(q, k, v) -> out`; what is set up
once per shape (a FlexAttention block mask, a compiled function) happens there, outside the
timed region. Layouts: flashattn and flash-attn take (B, N, H, D); SDPA, FlexAttention and standard
attention take (B, H, N, D). Both are allocated contiguous, so no peer pays for a transpose. On the CPU,
flashattn also runs through its SDPA drop-in on SDPA's (B, H, N, D) tensors, and SDPA on flashattn's
(B, N, H, D) tensors as transposed views (as a model that projects to (B, N, H, D) calls it): torch's
fused CPU kernel, which serves both, is a little faster on (B, H, N, D), so those two entries compare
the two libraries at equal layouts.
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from flashattn import flash_attn_func, scaled_dot_product_attention
from flashattn.bench.cases import Case

Tensor = torch.Tensor
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]

SUBJECT = "flashattn"  # the library under test; every other implementation is a peer
DETERMINISTIC = "flashattn-deterministic"   # the same with deterministic=True (target: >= 0.8x SUBJECT)
SDPA_DROP_IN = "flashattn-sdpa"             # flashattn.scaled_dot_product_attention on SDPA's layout
SDPA_VIEWS = "sdpa-bnhd"                    # torch SDPA on (B, N, H, D) memory: flashattn's layout
OURS = (SUBJECT, DETERMINISTIC, SDPA_DROP_IN)   # never counted as the best peer


@dataclass(frozen=True)
class Peer:
    name: str
    layout: str                          # "bnhd" or "bhnd"
    build: Callable[[Case, torch.device], AttentionFn]
    max_seqlen: int | None = None        # O(N^2)-memory implementations stop here
    description: str = ""
    probe: Callable[[], str | None] | None = None  # why it can't run here (None: it can)
    backward_only: bool = False          # its forward is another entry's (measured once)

    def skip_reason(self, case: Case) -> str | None:
        if self.max_seqlen is not None and case.seqlen > self.max_seqlen:
            return f"seqlen > {self.max_seqlen} (O(N^2) memory)"
        if self.backward_only and case.pass_ != "bwd":
            return "backward only"
        return None


def _flashattn(case: Case, device: torch.device) -> AttentionFn:
    return lambda q, k, v: flash_attn_func(q, k, v, causal=case.causal)


def _flashattn_deterministic(case: Case, device: torch.device) -> AttentionFn:
    return lambda q, k, v: flash_attn_func(q, k, v, causal=case.causal, deterministic=True)


def _flashattn_sdpa(case: Case, device: torch.device) -> AttentionFn:
    return lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=case.causal)


def standard_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, dropout_p: float = 0.0,
                       key_padding_mask: Tensor | None = None) -> Tensor:
    """The paper's baseline (its Algorithm 0), in the inputs' dtype: S = QK^T / sqrt(d) written to
    memory, P = softmax(S) written to memory, O = PV. q, k, v (B, H, N, D); key_padding_mask (B, Nk)
    bool, True = a real key; causal aligned to the top-left corner (square calls); dropout on P. The
    scale rides on the first product's alpha (cuBLAS's epilogue, as Megatron-LM does): no extra pass
    over S. Differentiable by autograd, which keeps S, P (and the dropout mask) for the backward: O(N^2)
    memory."""
    b, h, n, d = q.shape
    nk = k.shape[2]
    s = torch.baddbmm(q.new_empty(1, 1, 1), q.reshape(b * h, n, d), k.reshape(b * h, nk, d).transpose(1, 2),
                      beta=0.0, alpha=1.0 / math.sqrt(d)).view(b, h, n, nk)
    masked = None
    if causal:
        masked = torch.ones(n, nk, dtype=torch.bool, device=q.device).triu_(1)
    if key_padding_mask is not None:
        padding = ~key_padding_mask[:, None, None, :]
        masked = padding if masked is None else masked | padding
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v)


def _standard(case: Case, device: torch.device) -> AttentionFn:
    return lambda q, k, v: standard_attention(q, k, v, case.causal)


def _sdpa_default(case: Case, device: torch.device) -> AttentionFn:
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)


def _sdpa_views(case: Case, device: torch.device) -> AttentionFn:
    """SDPA on (B, N, H, D) tensors, given as (B, H, N, D) views: how a model that projects to (B, N, H,
    D) calls it; the output goes back to the inputs' layout as a view, as flashattn's is."""
    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=case.causal)
        return out.transpose(1, 2)
    return fn


def _sdpa_forced(backend_name: str) -> Callable[[Case, torch.device], AttentionFn]:
    """SDPA restricted to one backend: it raises rather than fall back when that one can't run."""
    def build(case: Case, device: torch.device) -> AttentionFn:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, backend_name)

        def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
        return fn
    return build


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.cache
def _compiled_flex():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention
    # One compilation per shape and mask kind; the default limit (8) would silently fall back to
    # the unfused eager path in the middle of the grid.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(flex_attention, dynamic=False)


def _flex(case: Case, device: torch.device) -> AttentionFn:
    from torch.nn.attention.flex_attention import create_block_mask
    flex = _compiled_flex()
    mask = None
    if case.causal:
        mask = create_block_mask(_causal_mask_mod, B=None, H=None, Q_LEN=case.seqlen,
                                 KV_LEN=case.seqlen, device=device)
    return lambda q, k, v: flex(q, k, v, block_mask=mask)


def _flash_attn_pkg(case: Case, device: torch.device) -> AttentionFn:
    import flash_attn
    return lambda q, k, v: flash_attn.flash_attn_func(q, k, v, causal=case.causal)


def _fa4(case: Case, device: torch.device) -> AttentionFn:
    """FlashAttention-4's CuTe-DSL kernels (pip flash-attn-4; sm_90 and newer). Its function returns
    (out, lse)."""
    from flash_attn.cute import flash_attn_func as fa4
    return lambda q, k, v: fa4(q, k, v, causal=case.causal)[0]


def _needs(module: str, *attrs: str) -> Callable[[], str | None]:
    """A probe: None when `module` imports and has `attrs`, else the reason in one line."""
    def probe() -> str | None:
        try:
            loaded = importlib.import_module(module)
            for attr in attrs:
                getattr(loaded, attr)
        except Exception as exc:  # ImportError, or a broken build raising anything at import
            return describe_error(exc)
        return None
    return probe


def describe_error(exc: BaseException) -> str:
    """'Type: first line of the message', at most 160 characters: what the tables show."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


_SDPA_KERNEL = _needs("torch.nn.attention", "SDPBackend", "sdpa_kernel")
_STANDARD = "standard attention, the paper's baseline: matmul, softmax, matmul (peers.standard_attention, O(N^2))"


def registry(mode: str) -> list[Peer]:
    """Every implementation known in `mode` ("gpu" or "cpu"), flashattn first."""
    if mode == "cpu":
        return [
            Peer(SUBJECT, "bnhd", _flashattn,
                 description="this library (PyTorch path: torch's fused CPU kernel for plain calls)"),
            Peer(SDPA_DROP_IN, "bhnd", _flashattn_sdpa,
                 description="this library through its SDPA drop-in, on SDPA's layout"),
            Peer("standard", "bhnd", _standard, max_seqlen=4096, description=_STANDARD),
            Peer("sdpa", "bhnd", _sdpa_default, description="torch SDPA, default CPU backend"),
            Peer(SDPA_VIEWS, "bnhd", _sdpa_views,
                 description="torch SDPA on flashattn's (B, N, H, D) tensors as transposed views"),
        ]
    return [
        Peer(SUBJECT, "bnhd", _flashattn, description="this library (Triton kernels)"),
        Peer(DETERMINISTIC, "bnhd", _flashattn_deterministic, backward_only=True,
             description="this library with deterministic=True (bitwise reproducible backward)"),
        Peer("sdpa-flash", "bhnd", _sdpa_forced("FLASH_ATTENTION"), probe=_SDPA_KERNEL,
             description="torch SDPA, FlashAttention-2 backend"),
        Peer("sdpa-cudnn", "bhnd", _sdpa_forced("CUDNN_ATTENTION"), probe=_SDPA_KERNEL,
             description="torch SDPA, cuDNN backend"),
        Peer("sdpa-efficient", "bhnd", _sdpa_forced("EFFICIENT_ATTENTION"), probe=_SDPA_KERNEL,
             description="torch SDPA, memory-efficient backend"),
        Peer("sdpa-math", "bhnd", _sdpa_forced("MATH"), max_seqlen=4096, probe=_SDPA_KERNEL,
             description="torch SDPA, math backend (unfused)"),
        Peer("flex", "bhnd", _flex, description="torch.compile(flex_attention)",
             probe=_needs("torch.nn.attention.flex_attention", "flex_attention",
                          "create_block_mask")),
        Peer("flash-attn", "bnhd", _flash_attn_pkg, description="flash_attn.flash_attn_func",
             probe=_needs("flash_attn", "flash_attn_func")),
        Peer("fa4", "bnhd", _fa4, description="FlashAttention-4, flash_attn.cute.flash_attn_func (CuTe DSL)",
             probe=_needs("flash_attn.cute", "flash_attn_func")),
        Peer("standard", "bhnd", _standard, max_seqlen=2048, description=_STANDARD),
    ]


def names(mode: str) -> list[str]:
    return [peer.name for peer in registry(mode)]


def available(mode: str, wanted: list[str] | None = None) -> tuple[list[Peer], dict[str, str]]:
    """(peers to run, {name: why it can't run here}). flashattn always runs; `wanted` picks among
    the others (None: all)."""
    usable, unavailable = [], {}
    for peer in registry(mode):
        if wanted is not None and peer.name != SUBJECT and peer.name not in wanted:
            continue
        reason = peer.probe() if peer.probe else None
        if reason:
            unavailable[peer.name] = reason
        else:
            usable.append(peer)
    return usable, unavailable


# The memory section compares flashattn with SDPA's backends, as in the paper's memory figure.
MEMORY_PEERS = (SUBJECT, "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math")
