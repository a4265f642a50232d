"""python -m flashattn.bench ring on the CPU (gloo, two processes, tiny sizes): the harness runs every
implementation it can here, derives the figures from the times, writes and merges its report."""
import json

from flashattn.bench import ring
from flashattn.bench.measure import Measurement

from test_bench_cli import run_bench


def test_ring_bench_writes_and_merges(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    done = run_bench("ring", "--cpu", "--tokens", "64", "--rounds", "1", "--out", str(first))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((first / "ring.json").read_text())
    rows = report["rows"]
    assert [(r["world"], r["tokens"], r["tokens_per_rank"], r["causal"], r["pass"]) for r in rows] == [
        (2, 64, 32, True, "fwd"), (2, 64, 32, True, "fwd+bwd")]
    for row in rows:
        for name in ("ring", "compute", "comm"):
            assert row["timings"][name]["status"] == "ok" and row["timings"][name]["ms"] > 0
        assert row["timings"]["cp-sdpa"]["status"] == "skipped" and "CUDA" in row["timings"]["cp-sdpa"]["error"]
        assert row["efficiency"] > 0 and 0.0 <= row["hidden"] <= 1.0
    assert rows[1]["flops"] == 3.5 * rows[0]["flops"] == 3.5 * 4 * 64 ** 2 * 2 * 32 / 2
    assert "Ring attention" in (first / "ring.md").read_text()

    # A second run (another length, both masks; 98 is not divisible by 2 W = 4: skipped) merged with the first.
    done = run_bench("ring", "--cpu", "--tokens", "96,98", "--causal", "both", "--rounds", "1",
                     "--merge", str(first / "ring.json"), "--out", str(second))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Skipping tokens 98 at world size 2" in done.stdout
    keys = [(r["tokens"], r["causal"], r["pass"]) for r in json.loads((second / "ring.json").read_text())["rows"]]
    assert keys == sorted(keys) and len(keys) == 6 and {t for t, _, _ in keys} == {64, 96}


def test_ring_row_figures():
    row = ring.RingRow(world=4, tokens=1024, causal=False, pass_="fwd", flops=8e12, timings={
        "ring": Measurement("ok", ms=10.0), "compute": Measurement("ok", ms=9.0), "comm": Measurement("ok", ms=4.0),
        "cp-sdpa": Measurement("error", error="RuntimeError: no")})
    assert row.efficiency == 0.9 and row.hidden == 0.75                 # (9 + 4 - 10) / 4
    assert row.tflops_per_gpu("ring") == 8e12 / 4 / 10e-3 / 1e12 and row.tflops_per_gpu("cp-sdpa") is None
    slow = ring.RingRow(2, 64, True, "fwd", 1.0, {"ring": Measurement("ok", ms=20.0),
                                                   "compute": Measurement("ok", ms=9.0), "comm": Measurement("ok", ms=4.0)})
    assert slow.hidden == 0.0                                           # nothing hidden: clamped, not negative
    assert ring.RingRow.from_dict(row.as_dict()).as_dict() == row.as_dict()
