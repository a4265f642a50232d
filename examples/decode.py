"""Greedy decoding with a KV cache, end to end: a small Llama-style model in plain PyTorch, its
prompts prefilled as one packed batch, then decoded one token at a time against a paged cache, and
checked token for token against the same model run without any cache.

    python examples/decode.py                       # paged cache, pages of 16 slots
    python examples/decode.py --page-size 0         # contiguous cache (batch, max_len, kv_heads, head_dim)
    python examples/decode.py --device cuda --dtype bfloat16 --new-tokens 64

The model is the usual decoder block, written out here so that every tensor's layout is visible:
token embedding, RMSNorm, grouped-query attention (8 query heads share 2 KV heads) with rotary
position embeddings (GPT-NeoX style: dim c pairs with dim c + head_dim / 2), a SwiGLU MLP, a final
RMSNorm and an untied LM head. Its weights are random, drawn from a seeded generator: the point is
the plumbing, not the text, and nothing is downloaded.

What each phase shows:

- Prefill. The prompts have different lengths and are packed back to back without padding
  (total_tokens, heads, head_dim); cu_seqlens marks where each starts, and
  flash_attn_varlen_func(causal=True) keeps every prompt to its own keys. The model rotates q and k
  itself, and writes each layer's rotated k and v into the cache with plain indexing: a sequence's
  position p lives in page block_table[b, p // page_size], row p % page_size (or at [b, p] in a
  contiguous cache). Writing the cache is the model's job; the library only reads it here.
- Decode. One call of flash_attn_with_kvcache per layer and step does the rest: given the new
  token's UNROTATED q and k, and the cos/sin tables (max_positions, head_dim / 2), it rotates both at
  position cache_seqlens[b], writes k and v into slot cache_seqlens[b] of sequence b (in place,
  through the block table), and attends q to slots 0 .. cache_seqlens[b]. Each sequence has its own
  length. The library does not advance cache_seqlens: every layer of one step must see the same
  lengths, so the caller adds 1 after the last layer.
- Check. The same weights run again without a cache: at every step the whole prompt plus the tokens
  generated so far goes through the model (flash_attn_func, causal, one sequence at a time) and the
  last position's logits pick the next token. Both runs must produce the same tokens; the script
  prints both lists and "tokens match: True", and exits with status 1 if they differ. The cache
  starts filled with NaN, so a read of a slot that no token was written to would show in the logits.

The two runs compute the same values in different orders (one tiled softmax over a cache versus a
recomputation over the whole sequence), so their logits agree to rounding, not bit for bit. In
float32 (the default) that rounding (about 1e-6 here) is far below the usual gap between the best and
second-best logit, so greedy decoding picks the same tokens. In bfloat16 or float16 a near-tie between two logits can
flip the argmax and the sequences then diverge: that is the reduced precision, not a cache bug, which
is why float32 is the default for the equality check. The largest logit difference is printed too.

On a CUDA device the attention calls run flashattn's Triton kernels; on the CPU they run its PyTorch
implementation of the same algorithm, and the defaults finish in a few seconds.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashattn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Tensor = torch.Tensor


@dataclass
class Config:
    vocab: int = 512
    dim: int = 128
    heads: int = 8
    kv_heads: int = 2              # grouped-query attention: 4 query heads per KV head
    hidden: int = 352              # SwiGLU width
    layers: int = 2
    rope_theta: float = 10000.0
    max_positions: int = 2048      # rows of the rotary tables: bounds the cache's length per sequence
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass
class KVCache:
    """One k and one v tensor per layer, and the tokens already cached per sequence.

    Paged: k[i], v[i] are pools of pages (num_pages, page_size, kv_heads, head_dim) and block_table
    (batch, max_blocks) int32 names the page holding each block of page_size positions of each
    sequence. Contiguous: k[i], v[i] are (batch, max_len, kv_heads, head_dim) and block_table is None.
    """
    k: list[Tensor]
    v: list[Tensor]
    seqlens: Tensor                # int32 (batch,)
    block_table: Tensor | None
    page_size: int

    def write(self, layer: int, seq: Tensor, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v (tokens, kv_heads, head_dim) of sequence seq[t] at position pos[t]."""
        if self.block_table is None:
            where = (seq, pos)
        else:
            where = (self.block_table[seq, pos // self.page_size].long(), pos % self.page_size)
        self.k[layer][where] = k
        self.v[layer][where] = v


class Llama:
    """A Llama-style decoder with random weights; attention is whatever `attend` the caller passes
    (a packed prefill, a cached decode step, or a plain causal forward), all else is shared."""

    def __init__(self, cfg: Config, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        gen = torch.Generator().manual_seed(seed)

        def weight(*shape: int, std: float) -> Tensor:   # drawn on the CPU: the same weights on any device
            return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

        d, hd = cfg.dim, cfg.head_dim
        self.embed = weight(cfg.vocab, d, std=1.0)
        self.layers = [dict(
            attn_norm=torch.ones(d, device=device, dtype=dtype),
            wq=weight(cfg.heads * hd, d, std=d ** -0.5),
            wk=weight(cfg.kv_heads * hd, d, std=d ** -0.5),
            wv=weight(cfg.kv_heads * hd, d, std=d ** -0.5),
            wo=weight(d, cfg.heads * hd, std=(cfg.heads * hd) ** -0.5),
            mlp_norm=torch.ones(d, device=device, dtype=dtype),
            w_gate=weight(cfg.hidden, d, std=d ** -0.5),
            w_up=weight(cfg.hidden, d, std=d ** -0.5),
            w_down=weight(d, cfg.hidden, std=cfg.hidden ** -0.5),
        ) for _ in range(cfg.layers)]
        self.final_norm = torch.ones(d, device=device, dtype=dtype)
        self.lm_head = weight(cfg.vocab, d, std=d ** -0.5)
        # Rotary tables (max_positions, head_dim / 2), float32: row p holds cos and sin of p * theta^(-2c/hd).
        inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angles = torch.outer(torch.arange(cfg.max_positions, dtype=torch.float64), inv_freq)
        self.cos = angles.cos().to(device, torch.float32)
        self.sin = angles.sin().to(device, torch.float32)

    # -- the pieces --------------------------------------------------------------------------------

    def rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)).to(x.dtype) * weight

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        """x (tokens, heads, head_dim) rotated at positions pos (tokens,), GPT-NeoX style (dim c with
        c + head_dim / 2), in float32 like the cache API."""
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)

    def forward(self, tokens: Tensor, attend) -> Tensor:
        """Logits (tokens, vocab) float32 of the token ids `tokens` (tokens,). attend(layer, q, k, v)
        gets the layer's UNROTATED q (tokens, heads, head_dim), k and v (tokens, kv_heads, head_dim)
        and returns the attention output (tokens, heads, head_dim)."""
        cfg = self.cfg
        x = self.embed[tokens]
        for i, w in enumerate(self.layers):
            h = self.rms_norm(x, w["attn_norm"])
            q = (h @ w["wq"].T).view(-1, cfg.heads, cfg.head_dim)
            k = (h @ w["wk"].T).view(-1, cfg.kv_heads, cfg.head_dim)
            v = (h @ w["wv"].T).view(-1, cfg.kv_heads, cfg.head_dim)
            x = x + attend(i, q, k, v).reshape(-1, cfg.heads * cfg.head_dim) @ w["wo"].T
            h = self.rms_norm(x, w["mlp_norm"])
            x = x + (F.silu(h @ w["w_gate"].T) * (h @ w["w_up"].T)) @ w["w_down"].T
        return (self.rms_norm(x, self.final_norm) @ self.lm_head.T).float()

    # -- the three ways to run it ------------------------------------------------------------------

    def prefill(self, prompts: list[Tensor], cache: KVCache) -> Tensor:
        """Run the prompts as one packed batch and fill the cache; logits (batch, vocab) of each
        prompt's last token."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)             # (batch + 1,), from 0
        seq = torch.repeat_interleave(torch.arange(len(prompts), device=self.device), lengths)
        pos = torch.arange(int(lengths.sum()), device=self.device) - cu_seqlens[seq]   # position within its prompt
        max_len = int(lengths.max())

        def attend(layer, q, k, v):
            q, k = self.rotate(q, pos), self.rotate(k, pos)
            cache.write(layer, seq, pos, k, v)
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True)

        logits = self.forward(torch.cat(prompts), attend)
        cache.seqlens.copy_(lengths)
        return logits[cu_seqlens[1:].long() - 1]

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """One new token per sequence (batch,): append it to the cache and return its logits
        (batch, vocab). Sequence b's token sits at position cache.seqlens[b]."""
        def attend(layer, q, k, v):                     # (batch, heads, head_dim): one token each
            out = flash_attn_with_kvcache(
                q[:, None], cache.k[layer], cache.v[layer], k=k[:, None], v=v[:, None],
                rotary_cos=self.cos, rotary_sin=self.sin, cache_seqlens=cache.seqlens,
                block_table=cache.block_table, causal=True, rotary_interleaved=False)
            return out[:, 0]

        logits = self.forward(tokens, attend)
        cache.seqlens += 1                              # after every layer has written this step's slot
        return logits

    def last_logits(self, tokens: Tensor) -> Tensor:
        """No cache: the whole sequence (tokens,) through the model, logits (vocab,) of its last token."""
        pos = torch.arange(len(tokens), device=self.device)

        def attend(layer, q, k, v):
            q, k = self.rotate(q, pos), self.rotate(k, pos)
            return flash_attn_func(q[None], k[None], v[None], causal=True)[0]

        return self.forward(tokens, attend)[-1]


def allocate_cache(model: Llama, lengths: list[int], page_size: int, seed: int) -> KVCache:
    """An empty cache for sequences of up to lengths[b] tokens. With page_size > 0, sequence b gets
    ceil(lengths[b] / page_size) pages taken from a shuffled pool, so its pages are scattered as in a
    server's allocator; unused block_table entries point at page 0 (never read: the library reads
    only the blocks that hold slots 0 .. cache_seqlens[b]). With page_size 0, one (batch, max_len) slab."""
    cfg, batch = model.cfg, len(lengths)
    shape_tail = (cfg.kv_heads, cfg.head_dim)
    if page_size:
        blocks = [-(-n // page_size) for n in lengths]
        pool = torch.randperm(sum(blocks), generator=torch.Generator().manual_seed(seed)).tolist()
        table = torch.zeros(batch, max(blocks), dtype=torch.int32)
        for b, n in enumerate(blocks):
            table[b, :n] = torch.tensor([pool.pop() for _ in range(n)])
        shape, block_table = (sum(blocks), page_size) + shape_tail, table.to(model.device)
        capacity = max(blocks) * page_size
    else:
        capacity = max(lengths)
        shape, block_table = (batch, capacity) + shape_tail, None
    if capacity > cfg.max_positions:
        raise ValueError(f"the cache holds {capacity} positions per sequence, the rotary tables {cfg.max_positions}")
    # NaN in every slot no sequence has written: a read of an unwritten slot would show in the logits.
    def empty() -> Tensor:
        return torch.full(shape, float("nan"), device=model.device, dtype=model.dtype)
    return KVCache([empty() for _ in range(cfg.layers)], [empty() for _ in range(cfg.layers)],
                   torch.zeros(batch, dtype=torch.int32, device=model.device), block_table, page_size)


def generate_cached(model: Llama, prompts: list[Tensor], new_tokens: int, page_size: int,
                    seed: int) -> tuple[list[list[int]], list[Tensor]]:
    """Greedy decoding with the cache: the first new token from the prefill's logits, each next one
    from a decode step on the previous. Returns the new tokens per sequence and each step's logits."""
    cache = allocate_cache(model, [len(p) + new_tokens for p in prompts], page_size, seed)
    logits = [model.prefill(prompts, cache)]
    for _ in range(new_tokens - 1):
        logits.append(model.decode_step(logits[-1].argmax(-1), cache))
    steps = torch.stack([step.argmax(-1) for step in logits], dim=1)          # (batch, new_tokens)
    return steps.tolist(), logits


def generate_uncached(model: Llama, prompts: list[Tensor], new_tokens: int) -> tuple[list[list[int]], list[Tensor]]:
    """Greedy decoding by recomputation: every step runs each whole sequence through the model."""
    sequences = [p.clone() for p in prompts]
    logits = []
    for _ in range(new_tokens):
        step = torch.stack([model.last_logits(s) for s in sequences])          # (batch, vocab)
        logits.append(step)
        sequences = [torch.cat((s, t[None])) for s, t in zip(sequences, step.argmax(-1))]
    return [s[len(p):].tolist() for s, p in zip(sequences, prompts)], logits


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Greedy decoding with flashattn's KV cache, checked against "
                                                 "a run without cache.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="float32 (default) keeps the token check exact; in 16-bit dtypes a near-tie "
                             "between two logits may flip the argmax")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per sequence")
    parser.add_argument("--batch", type=int, default=3, help="number of prompts")
    parser.add_argument("--min-prompt", type=int, default=5, help="shortest prompt length")
    parser.add_argument("--max-prompt", type=int, default=40, help="longest prompt length")
    parser.add_argument("--prompt-lengths", type=lambda s: [int(n) for n in s.split(",")], default=None,
                        help="comma-separated prompt lengths, e.g. 16,8 (overrides --batch and the min/max)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--page-size", type=int, default=16,
                        help="slots per page of the paged cache, a multiple of 16; 0 = a contiguous cache")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.new_tokens < 1 or args.batch < 1 or args.layers < 1 or not 1 <= args.min_prompt <= args.max_prompt:
        parser.error("need --new-tokens, --batch, --layers >= 1 and 1 <= --min-prompt <= --max-prompt")
    if args.prompt_lengths is not None:
        if min(args.prompt_lengths) < 1:
            parser.error("--prompt-lengths must all be >= 1")
        args.batch = len(args.prompt_lengths)
    if args.page_size < 0 or args.page_size % 16:
        parser.error(f"--page-size must be a multiple of 16 (flash_attn_with_kvcache's pages), or 0 for a "
                     f"contiguous cache; got {args.page_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = Llama(Config(layers=args.layers), device, dtype, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    lengths = args.prompt_lengths or torch.randint(args.min_prompt, args.max_prompt + 1, (args.batch,),
                                                   generator=gen).tolist()
    prompts = [torch.randint(model.cfg.vocab, (n,), generator=gen).to(device) for n in lengths]
    layout = f"paged, {args.page_size} slots per page" if args.page_size else "contiguous"
    print(f"{args.layers} layers, {model.cfg.heads} query heads / {model.cfg.kv_heads} KV heads, head dim "
          f"{model.cfg.head_dim}, {args.dtype} on {device}; prompt lengths {lengths}; cache: {layout}")

    cached, cached_logits = generate_cached(model, prompts, args.new_tokens, args.page_size, args.seed)
    uncached, uncached_logits = generate_uncached(model, prompts, args.new_tokens)
    for b in range(args.batch):
        print(f"sequence {b}  with cache: {cached[b]}")
        print(f"sequence {b}  no cache:   {uncached[b]}")
    match = cached == uncached
    # Logits are comparable only while both runs fed the same tokens: up to the first divergence.
    same = [i for i in range(args.new_tokens) if all(c[:i] == u[:i] for c, u in zip(cached, uncached))]
    diff = max((cached_logits[i] - uncached_logits[i]).abs().max().item() for i in same)
    print(f"max |logit difference| over {len(same)} comparable steps: {diff:.3g}")
    print(f"tokens match: {match}")
    return 0 if match and math.isfinite(diff) else 1


if __name__ == "__main__":
    sys.exit(main())
