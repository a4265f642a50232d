"""Attention beyond one device: a sequence split over the ranks of a torch.distributed process group.

    ring_attn_func          exact attention of a sequence split over the ranks (ring / context
                            parallelism): K/V slices travel around the ring, partial results merge by
                            their log-sum-exp; forward and backward
    ring_attn_varlen_func   the same for packed sequences, which may cross rank boundaries
    positions               the global positions of a rank's rows (rotary embeddings need them)
    shard_sequence          a rank's slice of a tensor in the layout both expect (zigzag: causal work
                            balanced over the ranks)
    RingFlashAttention      flashattn.nn.FlashAttention with its attention done by ring_attn_func

NCCL moves CUDA tensors (the Triton kernels compute), gloo CPU tensors (the PyTorch path).
"""
from flashattn.distributed.layout import positions
from flashattn.distributed.ring import ring_attn_func, ring_attn_varlen_func, shard_sequence
from flashattn.distributed.module import RingFlashAttention

__all__ = ["ring_attn_func", "ring_attn_varlen_func", "shard_sequence", "positions", "RingFlashAttention"]
