"""FlashAttention: a self-attention layer (fused QKV projection, attention, output projection).

The layer is the usual transformer attention block written around this library's entry points: a
padded batch with a key-padding mask is packed (flashattn.bert_padding.unpad_input), attended with
flash_attn_varlen_func, and unpacked (pad_input), so the projections and the attention do no work
on padding and no sequence sees another's tokens; without a mask it calls flash_attn_func. Traced
(torch.compile, torch.export) or captured (CUDA graphs), where packing's read of the lengths cannot
happen, the mask goes to flash_attn_func as a bool attn_bias instead (FlashAttention.forward).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flashattn.bert_padding import _check_mask, pad_input, unpad_input
from flashattn.interface import _check_tensor, _is_int, flash_attn_func
from flashattn.ops.capabilities import TRITON
from flashattn.varlen import flash_attn_varlen_func

Tensor = torch.Tensor

# Explicit tile sides: tl.dot's minimum (16) up to the largest tile the kernels are written for.
BLOCK_SIZES = (16, 32, 64, 128, 256)


def tile_shared_memory(block_size: int, head_dim: int, dtype: torch.dtype, backward: bool = False) -> int:
    """Bytes of shared memory one program of the Triton kernels needs for square tiles of
    `block_size` rows and keys, with one pipeline stage (the fewest the kernels run with; more stages
    multiply the streamed tiles). An estimate of what the kernels stage in shared memory:

    forward   the Q tile and one K and one V tile: 3 x block_size x width elements
    backward  K and V (held), Q and dO (streamed), and the P and dS tiles:
              4 x block_size x width + 2 x block_size^2 elements

    width: the head dim rounded up to a power of two, at least 16 (the kernels' tile width,
    flashattn/ops/triton/common.py's block_d)."""
    width = max(16, 1 << (head_dim - 1).bit_length())
    element = torch.empty((), dtype=dtype).element_size()
    if backward:
        return element * (4 * block_size * width + 2 * block_size * block_size)
    return element * 3 * block_size * width


def block_size_problem(block_size: int, head_dim: int, dtype: torch.dtype, limit: int, device_name: str,
                       backward: bool) -> str | None:
    """Why square tiles of `block_size` do not fit `limit` bytes of shared memory per program (the
    device's opt-in maximum per block), naming the sizes that do; None when they fit."""
    need = tile_shared_memory(block_size, head_dim, dtype, backward)
    if need <= limit:
        return None
    fits = [b for b in BLOCK_SIZES if tile_shared_memory(b, head_dim, dtype, backward) <= limit]
    passes = "forward and backward" if backward else "forward"
    return (f"block_size={block_size} needs about {need / 1024:.0f} KiB of shared memory per program "
            f"({passes}, head dim {head_dim}, {str(dtype).removeprefix('torch.')}, one pipeline stage), but "
            f"{device_name} holds {limit / 1024:.0f} KiB per block: block sizes that fit: "
            f"{', '.join(map(str, fits)) if fits else 'none'}; or block_size=None for the tuned tiles")


def _shared_memory_limit(device: torch.device) -> tuple[int, str] | None:
    """(bytes of shared memory a block may opt into, the device's name) on CUDA; None elsewhere (the
    PyTorch path and the Triton interpreter have no such limit)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", None) or props.shared_memory_per_block
    return int(limit), f"{device} ({props.name})"


def rotate(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotary position embeddings, GPT-NeoX style (dim c pairs with dim c + head_dim / 2, the whole
    head dim rotated), computed in float32 (float64 for float64 x) and returned in x's dtype.

    x: (..., nheads, head_dim) with head_dim even; positions: integers broadcastable to x's leading
    dims (...), the position of each token within its own sequence."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = base ** (-2.0 * torch.arange(half, device=x.device, dtype=work) / head_dim)   # (half,)
    angles = positions.to(work)[..., None, None] * inv_freq                                   # (..., 1, half)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half].to(work), x[..., half:].to(work)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def _unpack_probs(probs: Tensor, real: Tensor) -> Tensor:
    """The packed path's probabilities (batch, nheads, max_seqlen, max_seqlen), sequence b's i-th real
    token at row/column i, back at the tokens' padded positions: (batch, nheads, seqlen, seqlen), 0 in
    every row and column of a padding position. `real`: (batch, seqlen) bool."""
    batch, nheads, longest = probs.shape[0], probs.shape[1], probs.shape[2]
    seqlen = real.shape[1]
    # Each position's row in its packed sequence; padding points at an appended zero row/column.
    local = torch.where(real, real.cumsum(dim=1) - 1, longest)                       # (B, S)
    padded = F.pad(probs, (0, 1, 0, 1))                                               # (B, H, M + 1, M + 1)
    rows = padded.gather(2, local[:, None, :, None].expand(batch, nheads, seqlen, longest + 1))
    return rows.gather(3, local[:, None, None, :].expand(batch, nheads, seqlen, seqlen))   # (B, H, S, S)


class FlashAttention(nn.Module):
    """Self-attention: a fused QKV projection, exact attention by FlashAttention, an output projection.

    Args:
        hidden_size: the model dim; a multiple of num_heads. head_dim = hidden_size // num_heads, at
            most 256 (the kernels' limit).
        num_heads: query heads.
        block_size: None (default): the kernels' tuned tiles (flashattn/ops/triton/configs.py's
            tables for the GPU, head dim and dtype). An int: the side of the square tiles (block_m =
            block_n = block_size) the Triton kernels cut the score matrix into, in the forward and the
            backward; a power of two from 16 to 256. On a CUDA device it must fit the device's shared
            memory (tile_shared_memory: the forward's needs, and the backward's when gradients are
            being recorded), checked at the first forward on each device and dtype; a tile that does
            not fit raises ValueError naming the sizes that do. On other devices any valid size is
            accepted (the PyTorch path has no such limit). Passed to flash_attn_func /
            flash_attn_varlen_func as tile_size: the portable Triton kernels (and the PyTorch path's
            loops) run exactly these tiles.
        causal: each token attends to itself and the tokens before it in its own sequence.
        dropout: dropout probability on the attention probabilities, in [0, 1); applied only in
            training mode (self.training), 0 in eval. (Not on the projections: add nn.Dropout around
            the layer for that.) Dropout's random numbers come from flash_attn_func's Philox stream,
            seeded from torch's default generator (torch.manual_seed makes it reproducible).
        softmax_scale: defaults to 1 / sqrt(head_dim).
        num_kv_heads: key/value heads (GQA/MQA); a divisor of num_heads; defaults to num_heads.
        rotary: apply rotary position embeddings (GPT-NeoX style: dim c pairs with c + head_dim / 2,
            the whole head dim, frequencies rotary_base ** (-2c / head_dim)) to q and k. Positions are
            counted per sequence: with an attention_mask, each real token's position is its index
            among its sequence's real tokens, so left- and right-padded batches rotate as the
            unpadded sequences do. head_dim must be even.
        rotary_base: keyword only; the rotary embeddings' base (theta), 10000 by default.
        bias: keyword only; whether both projections have a bias (default True).
        device, dtype: keyword only; where and in which dtype the parameters are created.

    Parameters (flash-attn's MHA names and layout): Wqkv, a Linear(hidden_size, (num_heads +
    2 * num_kv_heads) * head_dim) whose output is q's heads, then k's, then v's, each head's
    head_dim values contiguous; out_proj, a Linear(num_heads * head_dim, hidden_size).

    Raises ValueError or TypeError, naming the observed value, for an argument out of range here and
    for a bad input in forward.
    """

    def __init__(self, hidden_size: int, num_heads: int, block_size: int | None = None, causal: bool = False,
                 dropout: float = 0.0, softmax_scale: float | None = None, num_kv_heads: int | None = None,
                 rotary: bool = False, *, rotary_base: float = 10000.0, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            if not (_is_int(value) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        head_dim = hidden_size // num_heads
        if head_dim > TRITON.max_head_dim:
            raise ValueError(f"head_dim = hidden_size / num_heads = {hidden_size} / {num_heads} = {head_dim}: the "
                             f"kernels take head dims up to {TRITON.max_head_dim}; use more heads")
        if num_kv_heads is None:
            num_kv_heads = num_heads
        if not (_is_int(num_kv_heads) and num_kv_heads >= 1 and num_heads % num_kv_heads == 0):
            raise ValueError(f"num_kv_heads must be an int that divides num_heads ({num_heads}) (GQA/MQA), got "
                             f"{num_kv_heads!r}")
        if block_size is not None and not (_is_int(block_size) and block_size in BLOCK_SIZES):
            raise ValueError(f"block_size must be None (the tuned tiles) or a power of two from 16 to 256 "
                             f"({', '.join(map(str, BLOCK_SIZES))}), got {block_size!r}")
        for name, flag in (("causal", causal), ("rotary", rotary), ("bias", bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                              and not isinstance(softmax_scale, bool)
                                              and math.isfinite(softmax_scale)):
            raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
        if rotary and head_dim % 2:
            raise ValueError(f"rotary embeddings rotate pairs of dims: head_dim = {hidden_size} / {num_heads} = "
                             f"{head_dim} must be even")
        if not (isinstance(rotary_base, (int, float)) and math.isfinite(rotary_base) and rotary_base > 0):
            raise ValueError(f"rotary_base must be a finite float > 0, got {rotary_base!r}")

        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = (hidden_size, num_heads, num_kv_heads,
                                                                              head_dim)
        self.block_size, self.causal, self.dropout = block_size, causal, float(dropout)
        self.softmax_scale = None if softmax_scale is None else float(softmax_scale)
        self.rotary, self.rotary_base = rotary, float(rotary_base)
        factory = dict(device=device, dtype=dtype)
        self.Wqkv = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **factory)
        self._tiles_checked: set = set()      # (device, dtype, backward) whose shared memory holds block_size

    def extra_repr(self) -> str:
        parts = [f"hidden_size={self.hidden_size}", f"num_heads={self.num_heads}"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"num_kv_heads={self.num_kv_heads}")
        for name, default in (("block_size", None), ("causal", False), ("dropout", 0.0), ("softmax_scale", None),
                              ("rotary", False)):
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)}")
        return ", ".join(parts)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, return_attention: bool = False):
        """Attend each token to the tokens of its own sequence.

        Args:
            hidden_states: (batch, seqlen, hidden_size), in the parameters' dtype and on their device.
            attention_mask: optional key-padding mask (batch, seqlen): bool with True = a real token,
                or an integer tensor of 0/1 with 1 = a real token (Hugging Face's attention_mask).
                Any pattern: right- or left-padded, rows all real or all padding. The real tokens are
                packed (unpad_input: one device synchronisation, to read the longest sequence) and
                run through flash_attn_varlen_func, so padding costs no work in the projections or the
                attention and no token sees another sequence.
                Under torch.compile or torch.export, and while a CUDA graph is being captured, where
                nothing can be read from the device and shapes must not depend on values, the padded
                batch is attended as it is instead: the mask becomes flash_attn_func's bool attn_bias
                (padding keys masked), rotary positions come from the mask's cumulative sum, and the
                padding rows of the output are set to 0. The same result (the same real tokens
                attending to each other in the same order; with dropout, other random draws), with
                the padding computed and discarded; an integer mask's values are not checked there
                (nonzero = a real token).
            return_attention: also return the attention probabilities.

        Returns:
            out: (batch, seqlen, hidden_size); with attention_mask, exactly 0 at padding positions
                (out_proj's bias is not added there).
            With return_attention, (out, probs): probs (batch, num_heads, seqlen, seqlen) float32 (float64
                for float64 inputs), softmax(scale * q k^T) after rotary, causal and the mask, as
                flash_attn_func(return_attn_probs=True) returns them: computed densely by the O(N^2)
                PyTorch path, a debugging aid, detached (no gradient); entries that dropout dropped are
                negated (torch.signbit gives them); 0 in the rows and columns of padding positions.
        """
        self._check_inputs(hidden_states, attention_mask, return_attention)
        if self.block_size is not None and not torch.compiler.is_compiling():
            # Not while traced: the check is cached per device in a Python set, which a graph would guard
            # on (a recompilation once it changes); a tile that does not fit still raises at launch.
            self._check_tiles(hidden_states)
        dropout_p = self.dropout if self.training else 0.0
        if attention_mask is None:
            return self._dense(hidden_states, dropout_p, return_attention)
        if torch.compiler.is_compiling() or (hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self._masked(hidden_states, attention_mask, dropout_p, return_attention)
        return self._packed(hidden_states, attention_mask, dropout_p, return_attention)

    def _split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., (H + 2 Hk) * D) -> q (..., H, D), k and v (..., Hk, D): views, no copy."""
        heads = qkv.view(*qkv.shape[:-1], self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        return heads.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=-2)

    def _dense(self, x: Tensor, dropout_p: float, return_attention: bool):
        batch, seqlen, _ = x.shape
        q, k, v = self._split_heads(self.Wqkv(x))                            # (B, S, H or Hk, D)
        if self.rotary:
            positions = torch.arange(seqlen, device=x.device)                 # (S,), shared by the batch
            q, k = rotate(q, positions, self.rotary_base), rotate(k, positions, self.rotary_base)
        result = flash_attn_func(q, k, v, dropout_p, self.softmax_scale, self.causal,
                                 return_attn_probs=return_attention, tile_size=self.block_size)
        out = result[0] if return_attention else result                      # (B, S, H, D)
        out = self.out_proj(out.reshape(batch, seqlen, self.num_heads * self.head_dim))
        return (out, result[2]) if return_attention else out

    def _packed(self, x: Tensor, attention_mask: Tensor, dropout_p: float, return_attention: bool):
        batch, seqlen, _ = x.shape
        x_packed, indices, cu_seqlens, max_seqlen, _ = unpad_input(x, attention_mask)   # (total, hidden)
        q, k, v = self._split_heads(self.Wqkv(x_packed))                     # (total, H or Hk, D)
        real = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        if self.rotary:
            # A token's position: how many real tokens of its sequence precede it.
            positions = (real.cumsum(dim=1) - 1).flatten().index_select(0, indices)   # (total,)
            q, k = rotate(q, positions, self.rotary_base), rotate(k, positions, self.rotary_base)
        result = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                        self.softmax_scale, self.causal, return_attn_probs=return_attention,
                                        tile_size=self.block_size)
        out = result[0] if return_attention else result                      # (total, H, D)
        out = self.out_proj(out.reshape(-1, self.num_heads * self.head_dim))  # (total, hidden)
        out = pad_input(out, indices, batch, seqlen)                           # (B, S, hidden), 0 at padding
        return (out, _unpack_probs(result[2], real)) if return_attention else out

    def _masked(self, x: Tensor, attention_mask: Tensor, dropout_p: float, return_attention: bool):
        """The key-padding mask without packing (traced or captured: see forward): static shapes, no read
        of the mask on the host. Sequence b's real tokens attend to its real keys (the mask, as a bool
        attn_bias (B, 1, 1, S)); with causal, keys at or before the query's position, which among real
        tokens is the packed path's order. Padding rows are computed and then zeroed, output and
        probabilities, so they get no gradient, as in the packed path."""
        batch, seqlen, _ = x.shape
        real = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0   # (B, S)
        q, k, v = self._split_heads(self.Wqkv(x))                            # (B, S, H or Hk, D)
        if self.rotary:
            positions = real.cumsum(dim=1) - 1                                # (B, S): index among real tokens
            q, k = rotate(q, positions, self.rotary_base), rotate(k, positions, self.rotary_base)
        result = flash_attn_func(q, k, v, dropout_p, self.softmax_scale, self.causal,
                                 return_attn_probs=return_attention, attn_bias=real[:, None, None, :],
                                 tile_size=self.block_size)
        out = result[0] if return_attention else result                      # (B, S, H, D)
        out = self.out_proj(out.reshape(batch, seqlen, self.num_heads * self.head_dim))
        out = torch.where(real[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        if not return_attention:
            return out
        probs = result[2]
        return out, torch.where(real[:, None, :, None], probs, torch.zeros((), dtype=probs.dtype, device=probs.device))

    def _check_inputs(self, hidden_states, attention_mask, return_attention) -> None:
        _check_tensor("hidden_states", hidden_states)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must have shape (batch, seqlen, hidden_size={self.hidden_size}), got "
                             f"{tuple(hidden_states.shape)}")
        weight = self.Wqkv.weight
        if hidden_states.dtype != weight.dtype:
            raise TypeError(f"hidden_states is {hidden_states.dtype} but the layer's parameters are {weight.dtype}: "
                            f"pass hidden_states.to({weight.dtype}) or convert the layer with .to(dtype)")
        if hidden_states.device != weight.device:
            raise ValueError(f"hidden_states is on {hidden_states.device} but the layer's parameters are on "
                             f"{weight.device}")
        if not isinstance(return_attention, bool):
            raise TypeError(f"return_attention must be a bool, got {return_attention!r}")
        if attention_mask is not None:
            _check_tensor("attention_mask", attention_mask)
            if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
                raise ValueError(f"attention_mask must be a key-padding mask of shape (batch, seqlen) = "
                                 f"{tuple(hidden_states.shape[:2])} (True or 1 = a real token), got shape "
                                 f"{tuple(attention_mask.shape)}")
            _check_mask("attention_mask", attention_mask, hidden_states)    # dtype and device; values: unpad_input

    def _check_tiles(self, x: Tensor) -> None:
        """block_size against the device's shared memory, once per (device, dtype, backward)."""
        backward = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        key = (x.device, x.dtype, backward)
        if key in self._tiles_checked:
            return
        found = _shared_memory_limit(x.device)
        if found is not None:
            problem = block_size_problem(self.block_size, self.head_dim, x.dtype, *found, backward=backward)
            if problem is not None:
                raise ValueError(f"FlashAttention: {problem}")
        self._tiles_checked.add(key)
