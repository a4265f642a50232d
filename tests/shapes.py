"""The problem shape the kernel tests are parametrised over (with a readable pytest id), and its inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from conftest import DEVICE


@dataclass(frozen=True)
class Shape:
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int

    @property
    def id(self) -> str:
        heads = f"h{self.nheads}" + (f"k{self.nheads_k}" if self.nheads_k != self.nheads else "")
        return f"b{self.batch}-q{self.seqlen_q}-k{self.seqlen_k}-{heads}-d{self.head_dim}"


def random_inputs(shape: Shape, dtype: torch.dtype):
    """q, k, v and an output gradient do, standard normal, on the tests' device."""
    q = torch.randn(shape.batch, shape.seqlen_q, shape.nheads, shape.head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(shape.batch, shape.seqlen_k, shape.nheads_k, shape.head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn_like(k)
    do = torch.randn_like(q)
    return q, k, v, do
