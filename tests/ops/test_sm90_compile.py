"""The Triton kernels an H100 runs for plain bf16 calls compile for sm_90 on any machine and fit its
shared memory, and the warp-specialized forward keeps its producer and two consumer warp groups (CI
has no GPU: without this it never compiles them). tests/ops/sm90_compile.py does the compiling, in a
process without the interpreter; tests/ops/test_backward_sm90.py does the same for the Gluon kernel."""
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
    assert {row["kernel"] for row in rows} == {"_attn_fwd", "_attn_fwd_ws", "_bwd_preprocess", "_bwd"}
    too_big = [row for row in rows if row["shared"] > H100_SHARED]
    assert not too_big, too_big
    ws = [row for row in rows if row["kernel"] == "_attn_fwd_ws"]
    assert ws and all(row["num_warps"] == 12 for row in ws), ws   # 4 launched: producer + 2 consumers
    # The warp-specialized forward takes exactly the shapes its table lists.
    expected = {(d, n, causal) for (d, _, causal), (start, _) in configs._FWD_WS.items()
                for n in (512, 4096) if n >= start}
    assert {(row["head_dim"], row["seqlen"], row["causal"]) for row in ws} == expected
