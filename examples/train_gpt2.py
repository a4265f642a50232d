"""GPT-2 small trained on the bytes of Python's standard library, with its attention chosen at the
command line: this library's ("flashattn"), standard attention written out ("standard": matmul,
softmax, matmul, as Hugging Face's eager GPT-2 does), or torch's F.scaled_dot_product_attention
("sdpa"). The FlashAttention paper's Table 2 trains GPT-2 this way against Hugging Face's model.

    python examples/train_gpt2.py                                   # all three, 300 steps each, context 1024, batch 8
    python examples/train_gpt2.py --attention flashattn --context 4096 --batch 2
    python examples/train_gpt2.py --longest                         # the longest context each trains at batch 1
    python examples/train_gpt2.py --device cpu --layers 2 --heads 2 --dim 64 --context 64 --batch 4 --steps 20

The model is GPT-2 (Radford et al., 2019) as nanoGPT writes it: learned token and position
embeddings, pre-LayerNorm blocks of causal self-attention (one fused QKV projection, 12 heads of 64)
and a GELU MLP of 4x the width, a final LayerNorm, and an output layer tied to the token embedding;
12 layers of width 768 by default, GPT-2 small's shape. One change: the vocabulary is the 256 byte
values, since the data are bytes (no tokenizer, nothing downloaded). GPT-2 small's 124M parameters
include 38.6M of its 50257-token embedding; with 256 tokens the same model has 85M.

Data: the .py files of Python's standard library (sysconfig's "stdlib" path, without site-packages),
sorted by path and concatenated, up to --data-bytes. Batches are windows at offsets drawn from a
generator seeded with --seed, so every run sees the same batches.

Training: AdamW (betas 0.9, 0.95; weight decay 0.1 on the matrices), a linear warm-up over the first
tenth of the steps then a cosine decay to a tenth of --lr, gradients clipped at norm 1; bf16 autocast
on CUDA, float32 elsewhere. Every attention starts from the same weights (the same seed) and sees the
same batches; dropout is 0 by default, so the loss curves differ by rounding alone. Throughput is
measured over the steps after the first tenth (kernel compilation, allocator warm-up), with the GPU
synchronised at both ends: tokens/s = batch x context x steps / time.

The longest context (--longest): for each attention, one training step at batch 1 at contexts
doubling from --longest-start until one runs out of memory (or --longest-cap, or --longest-budget
seconds), then bisection between the last that fit and the first that did not, to 1/8 of the
former. Memory is freed between probes.

On a CUDA device the flashattn attention runs this library's Triton kernels; on the CPU, its PyTorch
path (plain causal calls go to torch's fused CPU kernel, flashattn/ops/cpu.py).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import sysconfig
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flashattn import flash_attn_qkvpacked_func

Tensor = torch.Tensor
ATTENTIONS = ("flashattn", "standard", "sdpa")


@dataclass(frozen=True)
class GPTConfig:
    context: int = 1024       # positions (the learned position embedding's rows)
    vocab: int = 256          # byte values
    layers: int = 12
    heads: int = 12
    dim: int = 768
    dropout: float = 0.0      # on the embeddings, the attention probabilities and the residual branches


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, attention: str):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim ({cfg.dim}) must be a multiple of heads ({cfg.heads})")
        self.attention, self.heads, self.dropout = attention, cfg.heads, cfg.dropout
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        qkv = self.c_attn(x).view(b, t, 3, self.heads, c // self.heads)        # (B, T, 3, H, D)
        p = self.dropout if self.training else 0.0
        if self.attention == "flashattn":
            y = flash_attn_qkvpacked_func(qkv, dropout_p=p, causal=True)        # (B, T, H, D)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)                                 # each (B, H, T, D)
            if self.attention == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:
                # The whole (T, T) score matrix of every head, in memory: what FlashAttention avoids.
                scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
                future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
                probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
                y = F.dropout(probs, p, training=self.training) @ v
            y = y.transpose(1, 2)                                                # (B, T, H, D)
        return self.resid_drop(self.c_proj(y.reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, attention: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg, attention)
        self.ln_2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * cfg.dim, cfg.dim), nn.Dropout(cfg.dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, attention: str):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.dim)
        self.wpe = nn.Embedding(cfg.context, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, attention) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.lm_head.weight = self.wte.weight                                   # tied, as in GPT-2
        for name, param in self.named_parameters():                             # GPT-2's initialisation
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() >= 2:
                # The projections into the residual stream are scaled down by the depth.
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith("c_proj.weight") or ".mlp.2." in name \
                    else 0.02
                nn.init.normal_(param, 0.0, std)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of predicting targets (B, T) from idx (B, T), T <= cfg.context."""
        t = idx.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence of {t} tokens, but the model has {self.cfg.context} positions")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


def stdlib_bytes(limit: int) -> Tensor:
    """The standard library's .py files (sorted by path, site-packages excluded), concatenated and cut
    at `limit` bytes: a uint8 tensor."""
    if limit < 2:
        raise ValueError(f"limit must be at least 2 bytes, got {limit}")
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            chunk = path.read_bytes()
        except OSError:
            continue
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    data = b"".join(chunks)[:limit]
    if len(data) < 2:
        raise RuntimeError(f"no Python source found under {root} (the standard library's path)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def batch_at(data: Tensor, offsets: Tensor, context: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Inputs and next-byte targets (B, context) from windows of `data` starting at `offsets`."""
    windows = torch.stack([data[o:o + context + 1] for o in offsets.tolist()]).to(device, torch.long)
    return windows[:, :-1], windows[:, 1:]


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        device.type, enabled=False)


def _optimizer(model: GPT, lr: float, device: torch.device) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _lr_at(step: int, steps: int, lr: float) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TrainResult:
    attention: str
    context: int
    batch: int
    steps: int
    params: int
    losses: list[float] = field(default_factory=list)
    step_ms: float | None = None         # mean over the timed steps
    tokens_per_s: float | None = None
    peak_bytes: int | None = None        # CUDA: the most allocated at once (weights, optimizer state included)
    error: str | None = None             # why it stopped (out of memory, ...)


def train(cfg: GPTConfig, attention: str, data: Tensor, *, steps: int, batch: int, lr: float = 6e-4,
          seed: int = 0, device: torch.device = torch.device("cpu"),
          log: Callable[[str], None] = print) -> TrainResult:
    """`steps` AdamW steps of a freshly initialised model (seeded: the same weights for every
    attention) on batches drawn from `data` (seeded: the same batches). An out-of-memory error ends the
    run early and is recorded in the result's `error`, with the losses so far."""
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps} and {batch}")
    if len(data) <= cfg.context + 1:
        raise ValueError(f"{len(data)} bytes of data cannot fill a window of {cfg.context + 1}")
    torch.manual_seed(seed)
    model = GPT(cfg, attention).to(device)
    model.train()
    optimizer = _optimizer(model, lr, device)
    result = TrainResult(attention, cfg.context, batch, steps, sum(p.numel() for p in model.parameters()))
    offsets = torch.Generator().manual_seed(seed + 1)
    warm = max(1, steps // 10)                    # untimed: kernel compilation, allocator warm-up
    losses: list[Tensor] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = None
    try:
        for step in range(steps):
            if step == warm:
                _sync(device)
                start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr)
            x, y = batch_at(data, torch.randint(len(data) - cfg.context - 1, (batch,), generator=offsets),
                            cfg.context, device)
            with _autocast(device):
                loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if log is not None and (step % max(1, steps // 5) == 0 or step == steps - 1):
                log(f"  {attention} context {cfg.context} step {step:4d}: loss {loss.item():.4f}")
        _sync(device)
        if start is not None:
            timed = steps - warm
            result.step_ms = (time.perf_counter() - start) * 1e3 / timed
            result.tokens_per_s = batch * cfg.context / (result.step_ms / 1e3)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        result.error = "out of memory"
    result.losses = [float(x) for x in torch.stack(losses).tolist()] if losses else []
    if device.type == "cuda":
        result.peak_bytes = torch.cuda.max_memory_allocated(device)
    del model, optimizer, losses
    free_memory(device)
    return result


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA allocation failure, from the caching allocator or from a library (cuBLAS) that allocates
    its own workspace."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "ALLOC_FAILED" in str(exc)))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _one_step(cfg: GPTConfig, attention: str, device: torch.device, seed: int) -> None:
    torch.manual_seed(seed)
    model = GPT(cfg, attention).to(device)
    optimizer = _optimizer(model, 1e-4, device)
    tokens = torch.randint(cfg.vocab, (1, cfg.context + 1), device=device)
    with _autocast(device):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    _sync(device)


def trains_at(cfg: GPTConfig, attention: str, device: torch.device, seed: int = 0) -> bool:
    """Whether one training step at batch 1 and context cfg.context fits in the device's memory."""
    try:
        _one_step(cfg, attention, device, seed)
        fits = True
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        fits = False
    free_memory(device)
    return fits


def longest_context(cfg: GPTConfig, attention: str, device: torch.device, *, start: int = 1024,
                    cap: int = 131072, budget_s: float = 60.0, granule: int = 256,
                    log: Callable[[str], None] | None = print) -> dict:
    """The longest context (a multiple of `granule`, at most `cap`) at which one training step at
    batch 1 fits: contexts doubling from `start`, then bisection to 1/8 of the longest that fit. Stops
    early when `budget_s` seconds have passed (the figure is then a lower bound). Returns longest (None
    if `start` did not fit), first_oom (None if none ran out), why it stopped, and every probe."""
    began = time.perf_counter()
    probes, good, bad = [], None, None

    def probe(n: int) -> bool:
        t0 = time.perf_counter()
        fits = trains_at(replace(cfg, context=n), attention, device)
        probes.append({"context": n, "fits": fits, "seconds": round(time.perf_counter() - t0, 2)})
        if log is not None:
            log(f"  {attention}: context {n}: {'fits' if fits else 'out of memory'}")
        return fits

    def out_of_time() -> bool:
        return time.perf_counter() - began > budget_s

    n, stop = start, "cap"
    while n <= cap:
        if probe(n):
            good = n
            if out_of_time():
                stop = "time budget"
                break
            n *= 2
        else:
            bad, stop = n, "out of memory"
            break
    if good is not None and good < cap and n > cap:     # doubling passed the cap: try the cap itself
        if probe(cap):
            good = cap
        else:
            bad, stop = cap, "out of memory"
    if good is not None and bad is not None:
        resolution = max(granule, good // 8)
        while bad - good > resolution:
            if out_of_time():
                stop = "time budget"
                break
            mid = (good + bad) // 2 // granule * granule
            if mid <= good:
                break
            if probe(mid):
                good = mid
            else:
                bad = mid
    return {"attention": attention, "longest": good, "first_oom": bad, "stopped_by": stop, "cap": cap,
            "seconds": round(time.perf_counter() - began, 1), "probes": probes}


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first entries average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", default=",".join(ATTENTIONS),
                        help=f"comma-separated, from {', '.join(ATTENTIONS)} (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-bytes", type=int, default=32 * 2 ** 20)
    parser.add_argument("--longest", action="store_true",
                        help="find the longest context each attention trains at batch 1 instead of training")
    parser.add_argument("--longest-start", type=int, default=1024)
    parser.add_argument("--longest-cap", type=int, default=131072)
    parser.add_argument("--longest-budget", type=float, default=60.0, help="seconds per attention")
    args = parser.parse_args(argv)
    args.attention = [a.strip() for a in args.attention.split(",") if a.strip()]
    unknown = [a for a in args.attention if a not in ATTENTIONS]
    if unknown or not args.attention:
        parser.error(f"--attention takes names from {', '.join(ATTENTIONS)}, got {unknown or 'none'}")
    for name in ("context", "batch", "steps", "layers", "heads", "dim", "data_bytes", "longest_start", "longest_cap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.dropout < 1.0:
        parser.error("--dropout must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = GPTConfig(context=args.context, layers=args.layers, heads=args.heads, dim=args.dim, dropout=args.dropout)
    if args.longest:
        for attention in args.attention:
            found = longest_context(cfg, attention, device, start=args.longest_start, cap=args.longest_cap,
                                    budget_s=args.longest_budget)
            print(f"{attention}: longest context at batch 1: {found['longest']} (first out of memory: "
                  f"{found['first_oom']}; stopped by {found['stopped_by']}, {found['seconds']} s)")
        return 0
    data = stdlib_bytes(args.data_bytes)
    print(f"{len(data) / 2 ** 20:.1f} MiB of standard-library source; {args.layers} layers, {args.heads} heads, "
          f"width {args.dim}, context {args.context}, batch {args.batch}, {args.steps} steps on {device}")
    results = [train(cfg, attention, data, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                     device=device) for attention in args.attention]
    first = results[0]
    window = max(1, args.steps // 20)
    for r in results:
        memory = f", peak {r.peak_bytes / 2 ** 30:.2f} GiB" if r.peak_bytes is not None else ""
        speed = f"{r.tokens_per_s:,.0f} tokens/s, {r.step_ms:.1f} ms/step" if r.tokens_per_s else "not timed"
        gap = ""
        if r is not first and r.losses and first.losses:
            n = min(len(r.losses), len(first.losses))
            diff = max(abs(a - b) for a, b in zip(smoothed(r.losses[:n], window), smoothed(first.losses[:n], window)))
            gap = f"; max |smoothed loss - {first.attention}'s| {diff:.4f}"
        final = f"final loss {r.losses[-1]:.4f}" if r.losses else "no loss"
        print(f"{r.attention}: {r.params / 1e6:.1f}M parameters, {speed}{memory}, {final}{gap}"
              + (f" ({r.error})" if r.error else ""))
    return 0 if all(r.losses and math.isfinite(r.losses[-1]) and not r.error for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
