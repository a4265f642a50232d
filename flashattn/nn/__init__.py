"""Attention layers (torch.nn.Module) over this library's kernels.

    FlashAttention       a self-attention layer: fused QKV projection, GQA, rotary embeddings, a
                         key-padding mask served by the packed (varlen) path, an output projection
    MultiheadAttention   a drop-in for torch.nn.MultiheadAttention: same constructor, parameters,
                         state_dict keys, forward signature and results, so torch checkpoints load

Both run wherever flash_attn_func runs: the Triton kernels on CUDA tensors, the PyTorch
implementation elsewhere (FLASHATTN_BACKEND forces one).
"""
from flashattn.nn.flash_attention import FlashAttention
from flashattn.nn.multihead import MultiheadAttention

__all__ = ["FlashAttention", "MultiheadAttention"]
