"""Block-sparse attention masks (FlashAttention paper, section 3.3) and common sparsity patterns.

A :class:`BlockMask` says which key blocks each query block attends to. The score matrix of one
(batch, head) is cut into ``block_size x block_size`` blocks: query block r holds query rows
[r * block_size, (r + 1) * block_size), key block c holds key columns [c * block_size, ...); the last
block of each axis may be partial. Attention restricted by a block mask is exactly dense attention
with the element mask ``mask[b, h, i // block_size, j // block_size]``, combined (and-ed) with every
other mask of the call (causal, window, attn_bias); blocks that are not listed cost nothing, in the
forward and in the backward.

Pass it as ``flash_attn_func(q, k, v, block_mask=...)``. Build one with :meth:`BlockMask.from_dense`
or with the pattern helpers below, and combine them with ``|`` (union) and ``&`` (intersection).
The patterns are defined on block indices (query block r, key block c, both counted from 0 at the
top-left corner), so with seqlen_q != seqlen_k they are not shifted to the bottom-right corner the
way ``causal`` and ``window_size`` are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor
DEFAULT_BLOCK_SIZE = 128


def num_blocks(seqlen: int, block_size: int) -> int:
    """ceil(seqlen / block_size)."""
    return -(-seqlen // block_size)


def _check_block_size(block_size) -> None:
    if not (isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 16
            and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")


def _sorted_lists(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of `mask` (..., n, m): the count of True entries and their column indices, ascending,
    first (the rest of the row holds the False columns, also ascending; kernels never read them)."""
    counts = mask.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    return counts, order.to(torch.int32)


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which key blocks each query block attends to, with the index lists the kernels iterate.

    Fields (Bm is 1 or batch, Hm is 1 or nheads (query heads); 1 means shared by all):
        mask           (Bm, Hm, n_q_blocks, n_k_blocks) bool: True = the block is computed.
        kv_num_blocks  (Bm, Hm, n_q_blocks) int32: how many key blocks query block r attends to.
        kv_indices     (Bm, Hm, n_q_blocks, n_k_blocks) int32: those key blocks, ascending, in the
                       first kv_num_blocks entries of each row (the forward and the dQ loop).
        q_num_blocks   (Bm, Hm, n_k_blocks) int32: how many query blocks attend to key block c.
        q_indices      (Bm, Hm, n_k_blocks, n_q_blocks) int32: those query blocks, ascending, first
                       (the dK/dV loop).
        block_size     rows and columns per block, a power of two >= 16 (default 128).

    Build it with :meth:`from_dense` (or a pattern helper), which computes the index lists.
    """

    mask: Tensor
    kv_num_blocks: Tensor
    kv_indices: Tensor
    q_num_blocks: Tensor
    q_indices: Tensor
    block_size: int = DEFAULT_BLOCK_SIZE

    @classmethod
    def from_dense(cls, mask: Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> "BlockMask":
        """From a bool block mask of shape (n_q_blocks, n_k_blocks) or (Bm, Hm, n_q_blocks, n_k_blocks)."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"the block mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"the block mask must be a bool tensor (True = attend), got {mask.dtype}")
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4:
            raise ValueError("the block mask must have shape (n_q_blocks, n_k_blocks) or "
                             f"(batch or 1, nheads or 1, n_q_blocks, n_k_blocks), got {tuple(mask.shape)}")
        _check_block_size(block_size)
        mask = mask.contiguous()
        kv_num_blocks, kv_indices = _sorted_lists(mask)
        q_num_blocks, q_indices = _sorted_lists(mask.transpose(-1, -2))
        return cls(mask, kv_num_blocks, kv_indices.contiguous(), q_num_blocks, q_indices.contiguous(),
                   block_size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.mask.shape)

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def density(self) -> float:
        """Fraction of the blocks that are computed."""
        return self.mask.float().mean().item() if self.mask.numel() else 0.0

    def element_mask(self, seqlen_q: int, seqlen_k: int) -> Tensor:
        """The equivalent dense element mask (Bm, Hm, seqlen_q, seqlen_k) bool: O(N^2), for tests."""
        bs = self.block_size
        rows = torch.arange(seqlen_q, device=self.device) // bs
        cols = torch.arange(seqlen_k, device=self.device) // bs
        return self.mask[:, :, rows][:, :, :, cols]

    def to(self, device: torch.device | str) -> "BlockMask":
        return BlockMask(*(t.to(device) for t in (self.mask, self.kv_num_blocks, self.kv_indices,
                                                  self.q_num_blocks, self.q_indices)), self.block_size)

    def _combine(self, other: "BlockMask", op) -> "BlockMask":
        if not isinstance(other, BlockMask):
            return NotImplemented
        if other.block_size != self.block_size:
            raise ValueError(f"cannot combine block masks of block sizes {self.block_size} and "
                             f"{other.block_size}")
        return BlockMask.from_dense(op(self.mask, other.mask), self.block_size)

    def __or__(self, other: "BlockMask") -> "BlockMask":
        return self._combine(other, torch.logical_or)

    def __and__(self, other: "BlockMask") -> "BlockMask":
        return self._combine(other, torch.logical_and)


def _block_grid(seqlen_q: int, seqlen_k: int, block_size: int, device) -> tuple[Tensor, Tensor]:
    """Query block indices r (n_q, 1) and key block indices c (1, n_k)."""
    _check_block_size(block_size)
    for name, n in (("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
        if not (isinstance(n, int) and n >= 0):
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    r = torch.arange(num_blocks(seqlen_q, block_size), device=device)[:, None]
    c = torch.arange(num_blocks(seqlen_k, block_size), device=device)[None, :]
    return r, c


def _check_count(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def local_global_block_mask(seqlen_q: int, seqlen_k: int, *, local_blocks: int, global_blocks: int = 0,
                            causal: bool = False, block_size: int = DEFAULT_BLOCK_SIZE,
                            device: torch.device | str | None = None) -> BlockMask:
    """Sliding band of blocks plus global blocks (Longformer / BigBird style).

    Query block r attends to key block c iff
        |r - c| <= local_blocks              (the local band; c <= r only when causal), or
        c < global_blocks                    (the first blocks are global tokens everyone sees), or
        r < global_blocks                    (global tokens see everything; c <= r when causal).
    """
    _check_count("local_blocks", local_blocks)
    _check_count("global_blocks", global_blocks)
    r, c = _block_grid(seqlen_q, seqlen_k, block_size, device)
    dense = ((r - c).abs() <= local_blocks) | (c < global_blocks) | (r < global_blocks)
    if causal:
        dense &= c <= r
    return BlockMask.from_dense(dense, block_size)


def strided_block_mask(seqlen_q: int, seqlen_k: int, *, stride: int, local_blocks: int = 0,
                       causal: bool = False, block_size: int = DEFAULT_BLOCK_SIZE,
                       device: torch.device | str | None = None) -> BlockMask:
    """The strided pattern of the Sparse Transformer (Child et al., 2019), on blocks.

    Query block r attends to key block c iff
        (r - c) is a multiple of `stride`    (every stride-th block, counted from the diagonal), or
        |r - c| <= local_blocks              (a local band; 0: the diagonal block only),
    and, when causal, c <= r.
    """
    if not (isinstance(stride, int) and not isinstance(stride, bool) and stride >= 1):
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    _check_count("local_blocks", local_blocks)
    r, c = _block_grid(seqlen_q, seqlen_k, block_size, device)
    dense = ((r - c) % stride == 0) | ((r - c).abs() <= local_blocks)
    if causal:
        dense &= c <= r
    return BlockMask.from_dense(dense, block_size)


def butterfly_block_mask(seqlen_q: int, seqlen_k: int, *, global_blocks: int = 0, causal: bool = False,
                         block_size: int = DEFAULT_BLOCK_SIZE,
                         device: torch.device | str | None = None) -> BlockMask:
    """The flat block butterfly pattern (Pixelated Butterfly, Chen, Dao et al., 2022), the fixed
    pattern of the FlashAttention paper's block-sparse experiments.

    A butterfly factor of stride 2^s pairs block r with block r XOR 2^s; the flat butterfly is the
    union of the identity and all factors: query block r attends to key block c iff
        r == c, or r XOR c is a power of two,
    which gives each query block about 1 + log2(n_blocks) key blocks. `global_blocks` adds the
    low-rank-like global part (first blocks seen by all and seeing all, as in local_global), and
    causal keeps c <= r.
    """
    _check_count("global_blocks", global_blocks)
    r, c = _block_grid(seqlen_q, seqlen_k, block_size, device)
    x = r ^ c
    dense = (x & (x - 1)) == 0                        # x == 0 (diagonal) or a power of two
    dense |= (c < global_blocks) | (r < global_blocks)
    if causal:
        dense &= c <= r
    return BlockMask.from_dense(dense, block_size)
