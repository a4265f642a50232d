"""The kernels an H100 runs for plain bf16 calls compile for sm_90 on any machine and fit its shared
memory, each Hopper kernel takes exactly the shapes its table lists, and the warp-specialized ones keep
their warp groups (CI has no GPU: without this it never compiles them). tests/ops/sm90_compile.py does
the compiling, in a process without the interpreter; tests/ops/test_gluon_sm90.py compiles every build
of the Gluon kernels, those no table sends a call to included."""
import json
import os
import subprocess
import sys
from pathlib import Path

from flashattn.ops.triton import configs

H100_SHARED = 232448   # bytes of shared memory a block may use on sm_90
REPO = Path(__file__).resolve().parents[2]


def test_sm90_kernels_compile_and_fit():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLASHATTN_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(REPO / "tests/ops/sm90_compile.py")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
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
    ping_pong = {(d, n, causal) for (d, causal), start in configs._FWD_PINGPONG.items() for n in lengths if n >= start}
    assert ping_pong and shapes("_attn_fwd_sm90", 12) == ping_pong
    ws = {(d, n, causal) for (d, _, causal), (start, _) in configs._FWD_WS.items() for n in lengths if n >= start}
    assert shapes("_attn_fwd_ws", 12) == ws - ping_pong
    one_pass = {(d, n, causal) for (d, causal), (start, _) in configs._BWD_ONEPASS.items() for n in lengths
                if n >= start}
    assert shapes("_attn_bwd_sm90", 8) == one_pass
