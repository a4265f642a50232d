"""The kernels an H100 runs for plain bf16 calls compile for sm_90 on any machine and fit its shared
memory, each Hopper kernel takes exactly the shapes its table lists, and the warp-specialized ones keep
their warp groups (CI has no GPU: without this it never compiles them). tests/ops/sm90_compile.py does
the compiling, in a process without the interpreter (which replaces the kernels and, once a test has
run one, some of the language's functions); the Gluon kernels (flashattn/ops/triton/forward_sm90.py,
backward_sm90.py), which have no interpreter and are tested numerically on an sm_90 GPU only
(tests/ops/test_attention.py, test_ping_pong_* and test_one_pass_*), compile here in every build."""
import json
import os
import subprocess
import sys
from pathlib import Path

from flashattn.ops.triton import configs

H100_SHARED = 232448   # bytes of shared memory a block may use on sm_90
REPO = Path(__file__).resolve().parents[2]


def _compiled(*args: str) -> list[dict]:
    """The JSON rows of tests/ops/sm90_compile.py run with these arguments."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLASHATTN_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(REPO / "tests/ops/sm90_compile.py"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_every_gluon_build_compiles_and_fits():
    rows = _compiled("gluon")
    # Forward: head dims x causal x (program per tile, persistent, packed and persistent); backward: head dims x causal
    # x deterministic x packed.
    assert len(rows) == 3 * 2 * 3 + 3 * 2 * 2 * 2
    too_big = [row for row in rows if row["shared"] > H100_SHARED]
    assert not too_big, too_big
    for row in rows:
        if row["kernel"] == "_attn_fwd_sm90":
            # The consumer warp groups and the producer warp (rounded up to a warp group).
            assert row["num_warps"] == (row["CONSUMERS"] + 1) * row["launch_warps"], row
        else:
            # The deterministic build adds the dQ writer warp (rounded up to a warp group).
            assert row["num_warps"] == row["launch_warps"] + (4 if row["DETERMINISTIC"] else 0), row


def test_sm90_kernels_compile_and_fit():
    rows = _compiled()
    assert {row["kernel"] for row in rows} == {"_attn_fwd", "_attn_fwd_ws", "_attn_fwd_sm90", "_bwd_preprocess",
                                               "_bwd", "_attn_bwd_sm90", "_dq_convert"}
    too_big = [row for row in rows if row["shared"] > H100_SHARED]
    assert not too_big, too_big

    def shapes(kernel: str, warps: int) -> set[tuple[int, int, bool]]:
        ran = [row for row in rows if row["kernel"] == kernel]
        assert all(row["num_warps"] == warps for row in ran), ran
        return {(row["head_dim"], row["seqlen"], row["causal"]) for row in ran}

    lengths = (512, 4096)
    # 4 warps launched: a producer and two consumers, each rounded up to a warp group.
    ping_pong = {(d, n, causal) for (d, causal), (start, _) in configs._FWD_PINGPONG.items() for n in lengths
                 if n >= start}
    assert ping_pong and shapes("_attn_fwd_sm90", 12) == ping_pong
    ws = {(d, n, causal) for (d, _, causal), (start, _) in configs._FWD_WS.items() for n in lengths if n >= start}
    assert shapes("_attn_fwd_ws", 12) == ws - ping_pong
    one_pass = {(d, n, causal) for (d, causal), (start, _) in configs._BWD_ONEPASS.items() for n in lengths
                if n >= start}
    assert shapes("_attn_bwd_sm90", 8) == one_pass


def test_varlen_builds_compile_and_fit():
    """Packed sequences run the kernels' VARLEN builds (early exits, sequence offsets): the Hopper ones
    exactly where the sm_90 tables list the longest sequence's length, the portable ones elsewhere."""
    rows = _compiled("varlen")
    longest = {row["longest"] for row in rows}       # sm90_compile.VARLEN_LONGEST
    assert len(longest) == 3
    assert {row["kernel"] for row in rows} == {"_attn_fwd", "_attn_fwd_ws", "_attn_fwd_sm90", "_bwd_preprocess",
                                               "_bwd", "_attn_bwd_sm90", "_dq_convert"}
    too_big = [row for row in rows if row["shared"] > H100_SHARED]
    assert not too_big, too_big

    def shapes(kernel: str, deterministic: bool = False) -> set[tuple[int, int, bool]]:
        return {(row["head_dim"], row["longest"], row["causal"]) for row in rows
                if row["kernel"] == kernel and row["deterministic"] == deterministic}

    ping_pong = {(d, n, causal) for (d, causal), (start, _) in configs._FWD_PINGPONG.items() for n in longest
                 if n >= start}
    assert ping_pong and shapes("_attn_fwd_sm90") == ping_pong
    ws = {(d, n, causal) for (d, _, causal), (start, _) in configs._FWD_WS.items() for n in longest
          if n >= start}
    assert shapes("_attn_fwd_ws") == ws - ping_pong
    for deterministic in (False, True):
        one_pass = {(d, n, causal) for (d, causal), starts in configs._BWD_ONEPASS.items() for n in longest
                    if starts[deterministic] is not None and n >= starts[deterministic]}
        assert shapes("_attn_bwd_sm90", deterministic) == one_pass


def test_wide_builds_compile_and_fit():
    """The portable kernels' WIDE builds (64-bit tile bases, for tensors past 2^31 elements within a
    sequence; common.py) compile for sm_90 at every head dim."""
    rows = _compiled("wide")
    assert {row["kernel"] for row in rows} == {"_attn_fwd", "_bwd_preprocess", "_bwd"}
    assert len({(row["head_dim"], row["causal"]) for row in rows}) == 6
    too_big = [row for row in rows if row["shared"] > H100_SHARED]
    assert not too_big, too_big


def test_dropout_builds_compile_and_fit():
    """The portable kernels with dropout (four keys' keep decisions per Philox call, joined into the
    tile and transposed for dK/dV: common.dropout_keep) compile for sm_90 at every head dim."""
    rows = _compiled("dropout")
    assert {row["kernel"] for row in rows} == {"_attn_fwd", "_bwd_preprocess", "_bwd"}
    assert len({(row["head_dim"], row["causal"]) for row in rows}) == 6
    too_big = [row for row in rows if row["shared"] > H100_SHARED]
    assert not too_big, too_big
