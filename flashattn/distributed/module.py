"""RingFlashAttention: flashattn.nn.FlashAttention with its attention computed by ring_attn_func, for
sequences split over the ranks of a process group (context parallelism)."""
from __future__ import annotations

import torch

from flashattn.distributed import layout
from flashattn.distributed.ring import _agree, _ring, ring_attn_func
from flashattn.nn.flash_attention import FlashAttention, rotate

Tensor = torch.Tensor


class RingFlashAttention(FlashAttention):
    """Self-attention over a sequence split along the ranks of `group`: each rank passes its slice of the
    hidden states (shard_sequence's zigzag layout, dim 1) and gets its slice of the output; the result is
    FlashAttention's on the whole sequence.

    The same parameters, names and state_dict as FlashAttention (a checkpoint of either loads into the
    other), and the same arguments except block_size (the ring's blocks are cut by the layout) and a
    keyword-only `group` (None: the default process group). Rotary embeddings use each token's global
    position. The parameters are replicated: the caller sums their gradients over the ranks (an
    all_reduce, or DistributedDataParallel), as for any data split. No attention_mask: pack the
    sequences and call ring_attn_varlen_func instead.
    """

    def __init__(self, hidden_size: int, num_heads: int, causal: bool = False, dropout: float = 0.0,
                 softmax_scale: float | None = None, num_kv_heads: int | None = None, rotary: bool = False, *,
                 group=None, rotary_base: float = 10000.0, bias: bool = True, device=None, dtype=None):
        super().__init__(hidden_size, num_heads, None, causal, dropout, softmax_scale, num_kv_heads, rotary,
                         rotary_base=rotary_base, bias=bias, device=device, dtype=dtype)
        self.group = group

    def forward(self, hidden_states: Tensor) -> Tensor:
        """hidden_states: (batch, local_seqlen, hidden_size), this rank's slice; returns its output slice."""
        self._check_inputs(hidden_states, None, False)
        batch, seqlen, _ = hidden_states.shape
        q, k, v = self._split_heads(self.Wqkv(hidden_states))                # (B, S_local, H or Hk, D)
        if self.rotary:
            ring = _ring(self.group)
            total = sum(_agree(ring, q, k))
            where = torch.tensor(layout.positions(total, ring.size, ring.rank), device=hidden_states.device)
            q, k = rotate(q, where, self.rotary_base), rotate(k, where, self.rotary_base)
        out = ring_attn_func(q, k, v, self.group, self.causal, self.softmax_scale,
                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.reshape(batch, seqlen, self.num_heads * self.head_dim))
