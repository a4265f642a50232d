"""`python -m flashattn.bench` end to end, in CPU mode on a tiny grid (a few seconds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashattn.bench import measure
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
        assert set(row["results"]) == {"flashattn", "flashattn-sdpa", "standard", "sdpa", "sdpa-bnhd"}
        for name, result in row["results"].items():
            assert result["status"] == "ok", (name, result)
            assert result["ms"] > 0 and result["tflops"] > 0
            # Whether a cell was noisy on this machine is not asserted, only that it is recorded.
            assert len(result["rounds_ms"]) == measure.CPU_ROUNDS and result["spread"] >= 0
            assert 0 <= result["reruns"] <= measure.MAX_RERUNS and isinstance(result["noisy"], bool)
            assert result["noisy"] == (result["spread"] > measure.NOISE_LIMIT)
        assert row["best_peer"] in {"standard", "sdpa", "sdpa-bnhd"}
        assert row["flashattn_over_best_peer"] > 0
    assert "spread" in report["method"]["noise"]
    assert "skipped" in report["memory"]

    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# flashattn benchmark") and "| max spread |" in summary
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


def test_merge_joins_a_grid_measured_in_parts(tmp_path):
    common = ("--cpu", "--causal", "no", "--passes", "fwd", "--peers", "sdpa", "--no-plots")
    first = run_bench(*common, "--seqlens", "64,128", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_bench(*common, "--seqlens", "128,32", "--out", str(tmp_path / "b"),
                       "--merge", str(tmp_path / "a" / "bench.json"))
    assert second.returncode == 0, second.stdout + second.stderr
    merged = json.loads((tmp_path / "b" / "bench.json").read_text())
    earlier = json.loads((tmp_path / "a" / "bench.json").read_text())
    assert [row["seqlen"] for row in merged["rows"]] == [32, 64, 128]
    assert merged["grid"]["seqlens"] == [32, 64, 128]
    # The cell measured twice keeps the second run's figure; the other earlier cell comes through as is.
    by_len = {row["seqlen"]: row for row in merged["rows"]}
    assert by_len[64]["results"] == next(r for r in earlier["rows"] if r["seqlen"] == 64)["results"]
    assert by_len[128]["results"] != next(r for r in earlier["rows"] if r["seqlen"] == 128)["results"]
    assert merged["environment"]["merged_from"]["date_utc"] == earlier["environment"]["date_utc"]
    summary = (tmp_path / "b" / "summary.md").read_text()
    assert "| fwd | 32 |" in summary and "| fwd | 64 |" in summary and "earlier run" in summary

    other_peers = run_bench("--cpu", "--causal", "no", "--passes", "fwd", "--peers", "standard", "--no-plots",
                            "--seqlens", "32", "--out", str(tmp_path / "c"),
                            "--merge", str(tmp_path / "a" / "bench.json"))
    assert other_peers.returncode == 2 and "same --peers" in other_peers.stdout
    assert not (tmp_path / "c").exists()   # refused before measuring anything

    rendered = run_bench("--render", str(tmp_path / "b" / "bench.json"), "--out", str(tmp_path / "r"))
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    assert (tmp_path / "r" / "summary.md").read_text() == summary
    assert (tmp_path / "r" / "tflops.png").stat().st_size > 0


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

    entry = next(p for p in peers.registry("gpu") if p.name == peers.DETERMINISTIC)
    assert entry.skip_reason(Case("bf16", 2, 16, 1024, 128, False, "fwd")) == "backward only"
    assert entry.skip_reason(Case("bf16", 2, 16, 1024, 128, False, "bwd")) is None
    row = Row(Case("bf16", 2, 16, 1024, 128, False, "bwd"), {
        peers.SUBJECT: Measurement("ok", tflops=100.0), peers.DETERMINISTIC: Measurement("ok", tflops=300.0),
        "sdpa-flash": Measurement("ok", tflops=50.0)})
    assert row.best_peer() == "sdpa-flash" and row.ratio() == 2.0


def test_sdpa_drop_in_entry_is_ours():
    """On the CPU, flashattn through its SDPA drop-in runs on SDPA's layout and is never the best peer
    (it is this library)."""
    from flashattn.bench import peers
    from flashattn.bench.measure import Measurement
    from flashattn.bench.suite import Row

    entry = next(p for p in peers.registry("cpu") if p.name == peers.SDPA_DROP_IN)
    assert entry.layout == "bhnd"
    row = Row(Case("fp32", 1, 8, 256, 64, False, "fwd"), {
        peers.SUBJECT: Measurement("ok", tflops=100.0), peers.SDPA_DROP_IN: Measurement("ok", tflops=300.0),
        "sdpa": Measurement("ok", tflops=50.0)})
    assert row.best_peer() == "sdpa" and row.ratio() == 2.0
    views = next(p for p in peers.registry("cpu") if p.name == peers.SDPA_VIEWS)
    assert views.layout == "bnhd" and views.name not in peers.OURS


def test_sdpa_views_entry_matches_sdpa():
    """The same-layout SDPA entry takes flashattn's (B, N, H, D) tensors and returns SDPA's result in that
    layout."""
    import torch
    import torch.nn.functional as F
    from flashattn.bench import peers

    entry = next(p for p in peers.registry("cpu") if p.name == peers.SDPA_VIEWS)
    case = Case("fp32", 1, 2, 16, 8, True, "fwd")
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
    torch.testing.assert_close(entry.build(case, q.device)(q, k, v), expected.transpose(1, 2), rtol=0, atol=0)


def _noisy_results():
    """A CPU grid's Results with one noisy cell (flashattn, bwd), one failure and steady others."""
    import torch
    from flashattn.bench import peers, suite
    from flashattn.bench.cases import CPU_QUICK
    from flashattn.bench.measure import Measurement

    grid = CPU_QUICK.override(seqlens=(64, 128), passes=("fwd", "bwd"), causal=(False,))
    chosen, _ = peers.available("cpu", ["sdpa"])
    config = suite.Config(mode="cpu", device=torch.device("cpu"), grid=grid, peers=chosen, unavailable={},
                          memory=None, memory_note="no GPU")

    def ok(ms, noisy=False):
        rounds = [ms, ms * 1.25, ms, ms, ms] if noisy else [ms] * 5
        return Measurement("ok", ms=ms, tflops=1e-3 / ms, rounds_ms=rounds, spread=measure.spread(rounds),
                           reruns=measure.MAX_RERUNS if noisy else 0, noisy=noisy)

    rows = []
    for case in grid.cases():
        noisy = case.pass_ == "bwd" and case.seqlen == 128
        rows.append(suite.Row(case, {"flashattn": ok(2.0, noisy), "sdpa": ok(1.0) if case.seqlen == 64
                                     else Measurement("error", error="RuntimeError: no")}))
    return suite.Results(config, rows, [])


def test_tables_and_plot_show_a_noisy_cell(tmp_path):
    from rich.console import Console
    from flashattn.bench import plots, report

    results = _noisy_results()
    env = report.environment(results.config.device)
    text = report.markdown(results, env)
    assert "| **0.5 ~25%** |" in text                  # the noisy (and fastest) figure, with its spread
    assert text.count("~25%") == 1 and measure.NOISE_FOOTNOTE in text and "max spread" in text
    noisy_row = next(line for line in text.splitlines() if "| bwd | 128 |" in line)
    assert noisy_row.endswith("| 25% |")
    steady_row = next(line for line in text.splitlines() if "| fwd | 64 |" in line)
    assert steady_row.endswith("| 0% |")

    console = Console(record=True, width=200)
    report.print_report(results, console)
    printed = console.export_text()
    assert "0.5 ~25%" in printed and "after 2 reruns" in printed

    plots.plot_throughput(results, tmp_path / "tflops.png")
    assert (tmp_path / "tflops.png").stat().st_size > 0


def test_noisy_points_are_drawn_hollow_with_one_legend_entry():
    import matplotlib.pyplot as plt
    from flashattn.bench import plots

    fig, ax = plt.subplots()
    plots.mark_noisy(ax, [], "black")
    assert not ax.lines
    plots.mark_noisy(ax, [(1, 2.0), (2, 3.0)], "black")
    plots.mark_noisy(ax, [(4, 1.0)], "tab:red")
    assert ax.get_legend_handles_labels()[1] == [plots.NOISY_LABEL]
    rings = [line for line in ax.lines if len(line.get_xdata())]
    assert [list(line.get_xdata()) for line in rings] == [[1, 2], [4]]
    assert all(line.get_markerfacecolor() == "white" for line in ax.lines)
    plt.close(fig)
