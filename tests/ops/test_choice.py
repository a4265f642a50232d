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


def _packed(x: torch.Tensor, lens: list[int], causal: bool = False, **options) -> Variant:
    """A Variant of packed sequences of these lengths over x's rows (x is (1, total, H, D))."""
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=x.device)
    assert cu[-1] == x.shape[1]
    return Variant(causal=causal, window_right=0 if causal else -1, cu_seqlens_q=cu, cu_seqlens_k=cu,
                   max_seqlen_q=max(lens), max_seqlen_k=max(lens), **options)


def test_packed_sequences_take_the_hopper_kernels(tables_list_everything):
    """Plain but packed (varlen) is plain for the Hopper kernels: they take the VARLEN flag."""
    x = _x(seqlen=1000)
    for causal in (False, True):
        packed = _packed(x, [300, 683, 17], causal)
        assert packed.is_plain_or_varlen and not packed.is_plain
        assert choice.kernel_for("fwd", x, x, x, packed, 0.1) == choice.PING_PONG
        assert choice.kernel_for("bwd", x, x, x, packed, 0.1, x) == choice.ONE_PASS
        y = _x(96, seqlen=1000)
        assert choice.kernel_for("fwd", y, y, y, _packed(y, [300, 700], causal), 0.1) == choice.WARP_SPECIALIZED
    for option in (dict(softcap=5.0), dict(dropout_p=0.1), dict(window_left=8)):
        assert choice.kernel_for("fwd", x, x, x, _packed(x, [1000], **option), 0.1) == choice.PORTABLE
        assert choice.kernel_for("bwd", x, x, x, _packed(x, [1000], **option), 0.1, x) == choice.PORTABLE
    # A sequence starts at any row: its descriptors' bases are 16-byte aligned only when the rows are
    # whole 16 bytes apart (tma_ready), else the portable kernels take the call.
    odd = torch.zeros(1, 1000, 1, 132, dtype=torch.float16, device=DEVICE)[..., :128]        # rows 264 bytes apart
    assert choice.kernel_for("fwd", odd, odd, odd, _packed(odd, [300, 700]), 0.1) == choice.PORTABLE
    assert choice.kernel_for("bwd", odd, odd, odd, _packed(odd, [300, 700]), 0.1, odd) == choice.PORTABLE


def test_packed_sequences_are_looked_up_at_their_longest_on_sm90(monkeypatch):
    """sm_90's own tables decide a packed call by its longest sequence, not by the packed total: a
    batch of short sequences stays on the portable kernels, one with a long sequence takes the Hopper
    kernels the tables list at that length."""
    monkeypatch.setattr(configs, "_capability", lambda index: (9, 0))
    cuda = torch.device("cuda", 0)
    # The tensors are on the CPU here: the tables answer as for a CUDA tensor of sm_90.
    for name in ("ping_pong_forward", "warp_specialized", "one_pass_backward"):
        table = getattr(configs, name)
        monkeypatch.setattr(configs, name, lambda *args, table=table, **kwargs: table(
            *(cuda if isinstance(a, torch.device) else a for a in args), **kwargs))
    start, _ = configs._FWD_PINGPONG[128, False]
    one_pass_start, _ = configs._BWD_ONEPASS[128, False]
    longest = max(start, one_pass_start)
    x = _x(128, torch.bfloat16, seqlen=64 * 64)
    short = _packed(x, [64] * 64)                                   # as many tokens, in short sequences
    assert choice.kernel_for("fwd", x, x, x, short, 0.1) == choice.PORTABLE
    assert choice.kernel_for("bwd", x, x, x, short, 0.1, x) == choice.PORTABLE
    y = _x(128, torch.bfloat16, seqlen=longest + 100)
    long = _packed(y, [longest, 1, 0, 99])
    assert choice.kernel_for("fwd", y, y, y, long, 0.1) == choice.PING_PONG
    assert choice.kernel_for("bwd", y, y, y, long, 0.1, y) == choice.ONE_PASS


def test_tiles_name_the_family_and_the_shapes_it_runs(tables_list_everything):
    """choice.tiles: the Hopper kernels' fixed tiles; the portable kernels' from the tables (the
    interpreter's on the CPU), the caller's tile_size, and the block mask's blocks."""
    from flashattn.ops.triton import backward_sm90, forward_sm90
    x = _x(128, torch.bfloat16)
    fwd = choice.tiles("fwd", x, x, x, from_causal(False), 0.1)
    assert fwd == choice.Tiles(choice.PING_PONG, (choice.Program("fwd", "queries", forward_sm90.BLOCK_M[128],
                                                                 forward_sm90.BLOCK_N[128]),))
    bwd = choice.tiles("bwd", x, x, x, from_causal(False), 0.1, x)
    assert bwd == choice.Tiles(choice.ONE_PASS, (choice.Program("dkdv+dq", "keys", backward_sm90.BLOCK_N[128],
                                                                backward_sm90.BLOCK_M[128]),))


def test_portable_tiles_follow_the_table_tile_size_and_block_mask():
    x = _x(64, torch.float32)
    table, table_bwd = (configs.chosen(kind, 64, torch.float32, False, 64, x.device) for kind in ("fwd", "bwd"))
    fwd = choice.tiles("fwd", x, x, x, from_causal(False), 0.1)
    assert fwd.kernel == choice.PORTABLE
    assert fwd.programs == (choice.Program("fwd", "queries", table.block_m, table.block_n),)
    bwd = choice.tiles("bwd", x, x, x, from_causal(False), 0.1, x)
    assert [p.role for p in bwd.programs] == ["dkdv", "dq"]
    assert bwd.programs[0] == choice.Program("dkdv", "keys", table_bwd.kv.block_n, table_bwd.kv.block_m)
    assert bwd.programs[1] == choice.Program("dq", "queries", table_bwd.q.block_m, table_bwd.q.block_n)
    square = choice.tiles("fwd", x, x, x, Variant(tile_size=16), 0.1)
    assert (square.programs[0].rows, square.programs[0].step) == (16, 16)
