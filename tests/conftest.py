"""Test set-up: without CUDA, the Triton kernels run under Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, i.e. before flashattn's
Triton modules are imported, hence here at the top of conftest.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _no_plans_across_tests():
    """A plan (flashattn/ops/triton/plan.py) keeps the launches it noted: a test that forces a kernel
    must not replay another test's (none exist until flashattn's Triton modules are imported)."""
    plan = sys.modules.get("flashattn.ops.triton.plan")
    if plan is not None:
        plan.clear()


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def use_backend(monkeypatch):
    """Force one backend for the duration of a test."""
    def use(name: str) -> None:
        monkeypatch.setenv("FLASHATTN_BACKEND", name)
    return use
