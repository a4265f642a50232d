"""choice.kernel_for: which Triton kernel family runs a call. The Hopper kernels take only plain 16-bit
calls at their head dims with TMA-addressable inputs, and only where sm_90's tables list them; every
other call, and every call on another architecture or the CPU, runs the portable kernels."""
import math

import pytest
import torch

from conftest import DEVICE
from flashattn.ops.triton import choice, configs
from flashattn.ops.variant import Variant, from_causal


@pytest.fixture
def tables_list_everything(monkeypatch):
    """Every sm_90 table answers yes, so that only kernel_for's own conditions decide."""
    for name in ("ping_pong_forward", "warp_specialized", "one_pass_backward"):
        monkeypatch.setattr(configs, name, lambda *args, **kwargs: True)


def _x(head_dim=128, dtype=torch.float16, seqlen=64):
    return torch.zeros(1, seqlen, 2, head_dim, dtype=dtype, device=DEVICE)


def test_forward_takes_ping_pong_only_for_plain_16_bit_calls(tables_list_everything):
    x = _x()
    assert choice.kernel_for("fwd", x, x, x, from_causal(True), 0.1) == choice.PING_PONG
    assert choice.kernel_for("fwd", x, x, x, Variant(softcap=5.0), 0.1) == choice.PORTABLE
    # A negative scale: the ping-pong kernel takes the row max before scaling.
    assert choice.kernel_for("fwd", x, x, x, from_causal(False), -0.1) == choice.WARP_SPECIALIZED
    y = _x(96)
    assert choice.kernel_for("fwd", y, y, y, from_causal(False), 0.1) == choice.WARP_SPECIALIZED
    # A broadcast row (sequence stride 0) cannot be a TMA descriptor's row stride.
    assert choice.kernel_for("fwd", x, x, x[:, :1].expand_as(x), from_causal(False), 0.1) == choice.PORTABLE


def test_fp32_forward_takes_ping_pong_never():
    # fp32 is not in ping-pong's dtypes, and no table lists fp32 for the warp-specialized kernel.
    x = _x(dtype=torch.float32)
    assert choice.kernel_for("fwd", x, x, x, from_causal(False), 0.1) == choice.PORTABLE


def test_backward_takes_one_pass_only_for_plain_16_bit_calls(tables_list_everything):
    x = _x()
    assert choice.kernel_for("bwd", x, x, x, from_causal(True), 0.1, x) == choice.ONE_PASS
    assert choice.kernel_for("bwd", x, x, x, Variant(deterministic=True), 0.1, x) == choice.ONE_PASS
    assert choice.kernel_for("bwd", x, x, x, Variant(softcap=5.0), 0.1, x) == choice.PORTABLE
    assert choice.kernel_for("bwd", x, x, x, from_causal(False), 0.1, x, bias_grad=True) == choice.PORTABLE
    f = _x(dtype=torch.float32)
    assert choice.kernel_for("bwd", f, f, f, from_causal(False), 0.1, f) == choice.PORTABLE
    y = _x(96)
    assert choice.kernel_for("bwd", y, y, y, from_causal(False), 0.1, y) == choice.PORTABLE
    assert choice.kernel_for("bwd", x, x, x, from_causal(False), 0.1, x[:, :1].expand_as(x)) == choice.PORTABLE


def test_only_sm90_tables_list_the_hopper_kernels(monkeypatch):
    """The CPU (interpreter) and other architectures never run them; sm_90 from the listed lengths."""
    x = torch.zeros(1, 8192, 2, 128, dtype=torch.float16)         # on the CPU (the interpreter)
    assert choice.kernel_for("fwd", x, x, x, from_causal(False), 0.1) == choice.PORTABLE
    assert choice.kernel_for("bwd", x, x, x, from_causal(False), 0.1, x) == choice.PORTABLE
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(configs, "_capability", lambda index: (8, 0))
    assert not configs.ping_pong_forward(128, False, 8192, cuda)
    assert not configs.one_pass_backward(128, torch.bfloat16, False, 8192, cuda)
    monkeypatch.setattr(configs, "_capability", lambda index: (9, 0))
    assert configs.ping_pong_forward(128, False, 8192, cuda)
    assert configs.one_pass_backward(128, torch.bfloat16, False, 8192, cuda)
    assert not configs.one_pass_backward(128, torch.float32, False, 8192, cuda)


def test_sm90_tables_list_each_hopper_kernel_from_its_start_length(monkeypatch):
    """The ping-pong forward from its start length (persistent up to its last), the one-pass backward
    from its start length (and from the deterministic one with deterministic=True, never for fp32)."""
    monkeypatch.setattr(configs, "_capability", lambda index: (9, 0))
    cuda = torch.device("cuda", 0)
    for (head_dim, causal), (start, last_persistent) in configs._FWD_PINGPONG.items():
        assert configs.ping_pong_forward(head_dim, causal, start, cuda)
        assert not configs.ping_pong_forward(head_dim, causal, start - 1, cuda)
        assert configs.ping_pong_persistent(head_dim, causal, start, cuda) == (last_persistent is not None)
        if last_persistent is not None and last_persistent < math.inf:
            assert not configs.ping_pong_persistent(head_dim, causal, last_persistent + 1, cuda)
    assert not configs.ping_pong_forward(96, False, 1 << 14, cuda)
    for (head_dim, causal), (start, deterministic_start) in configs._BWD_ONEPASS.items():
        assert configs.one_pass_backward(head_dim, torch.bfloat16, causal, start, cuda)
        assert not configs.one_pass_backward(head_dim, torch.bfloat16, causal, start - 1, cuda)
        assert not configs.one_pass_backward(head_dim, torch.float32, causal, start, cuda)
        assert configs.one_pass_backward(head_dim, torch.float16, causal, 1 << 20, cuda,
                                         deterministic=True) == (deterministic_start is not None)
    assert not configs.one_pass_backward(96, torch.bfloat16, False, 1 << 14, cuda)
