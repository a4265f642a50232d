"""`python -m flashattn.bench` end to end, in CPU mode on a tiny grid (a few seconds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashattn.bench.cases import CPU_GRID, Case, parse_seqlen

REPO = Path(__file__).resolve().parents[2]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The conftest turns on Triton's interpreter for the kernel tests; the benchmark times the
    # PyTorch path, so the child runs without it (and without a forced backend).
    env.pop("TRITON_INTERPRET", None)
    env.pop("FLASHATTN_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "flashattn.bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help():
    done = run_bench("--help")
    assert done.returncode == 0, done.stderr
    assert "--seqlens" in done.stdout and "--peers" in done.stdout


def test_cpu_run_writes_json_markdown_and_plot(tmp_path):
    done = run_bench("--cpu", "--seqlens", "64,128", "--head-dims", "32", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CPU comparison" in done.stdout

    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["mode"] == "cpu"
    assert report["environment"]["torch"]
    assert "commit" in report["environment"]["git"]
    rows = report["rows"]
    assert len(rows) == 2 * 2 * 2  # seqlens x causal x passes
    assert {row["seqlen"] for row in rows} == {64, 128}
    for row in rows:
        assert row["headdim"] == 32
        assert set(row["results"]) == {"flashattn", "standard", "sdpa"}
        for name, result in row["results"].items():
            assert result["status"] == "ok", (name, result)
            assert result["ms"] > 0 and result["tflops"] > 0
        assert row["best_peer"] in {"standard", "sdpa"}
        assert row["flashattn_over_best_peer"] > 0
    assert "skipped" in report["memory"]

    assert (tmp_path / "summary.md").read_text().startswith("# flashattn benchmark")
    assert (tmp_path / "tflops.png").stat().st_size > 0


def test_peers_filter_and_bad_arguments(tmp_path):
    done = run_bench("--cpu", "--seqlens", "64", "--causal", "yes", "--passes", "fwd",
                     "--peers", "sdpa", "--no-plots", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert set(row["results"]) == {"flashattn", "sdpa"} and row["causal"] is True
    assert not (tmp_path / "tflops.png").exists()

    assert run_bench("--peers", "nonesuch").returncode == 2
    assert run_bench("--seqlens", "0").returncode == 2


@pytest.mark.parametrize("text, value", [("512", 512), ("4k", 4096), ("128K", 131072)])
def test_parse_seqlen(text, value):
    assert parse_seqlen(text) == value


def test_flops_and_cpu_grid():
    fwd = Case("bf16", 2, 16, 1024, 128, False, "fwd")
    assert fwd.flops == 4 * 2 * 16 * 1024 ** 2 * 128
    assert Case("bf16", 2, 16, 1024, 128, True, "fwd").flops == fwd.flops / 2
    assert Case("bf16", 2, 16, 1024, 128, False, "bwd").flops == 2.5 * fwd.flops
    assert len(CPU_GRID.cases()) == len(CPU_GRID.seqlens) * 2 * 2


def test_deterministic_entry_is_ours_and_backward_only():
    """The deterministic=True entry is measured on backward cases only and is never the best peer
    (it is this library), so the headline ratio stays against the others."""
    from flashattn.bench import peers
    from flashattn.bench.measure import Measurement
    from flashattn.bench.suite import Row

    entry = next(p for p in peers._registry("gpu") if p.name == peers.DETERMINISTIC)
    assert entry.skip_reason(Case("bf16", 2, 16, 1024, 128, False, "fwd")) == "backward only"
    assert entry.skip_reason(Case("bf16", 2, 16, 1024, 128, False, "bwd")) is None
    row = Row(Case("bf16", 2, 16, 1024, 128, False, "bwd"), {
        peers.SUBJECT: Measurement("ok", tflops=100.0), peers.DETERMINISTIC: Measurement("ok", tflops=300.0),
        "sdpa-flash": Measurement("ok", tflops=50.0)})
    assert row.best_peer() == "sdpa-flash" and row.ratio() == 2.0
