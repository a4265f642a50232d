"""The option panels of `python -m flashattn.bench` (--block-sparse, --window), in CPU mode at tiny sizes."""
import json

import pytest
import torch

from flashattn.bench import panels

from test_bench_cli import run_bench


def test_panels_write_json_tables_markdown_and_plots(tmp_path):
    done = run_bench("--cpu", "--no-grid", "--block-sparse", "--sparse-seqlen", "256", "--window",
                     "--window-seqlens", "128,256", "--window-size", "16,0", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Block-sparse vs dense" in done.stdout and "Sliding window (16, 0) vs dense" in done.stdout

    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["rows"] == [] and report["memory"] == {"skipped": "it measures peak CUDA memory, and no "
                                                                    "GPU is in use"}
    sparse = report["block_sparse"]
    assert sparse["config"]["seqlen"] == 256 and sparse["config"]["pattern"] == "random"
    rows = sparse["rows"]
    assert [(r["density"], r["pass"]) for r in rows] == [(d, p) for d in panels.DENSITIES for p in ("fwd", "bwd")]
    for row in rows:
        assert row["block_sparse"]["ms"] > 0 and row["dense"]["ms"] > 0 and row["dense_over_block_sparse"] > 0
    actual = [row["actual_density"] for row in rows]
    assert actual[0] == 1.0 and actual == sorted(actual, reverse=True)    # 4 blocks per row: 1, 1/2, 1/4, 1/4
    window = report["window"]
    assert window["config"]["window"] == [16, 0]
    assert [(r["seqlen"], r["pass"]) for r in window["rows"]] == [(n, p) for n in (128, 256) for p in ("fwd", "bwd")]
    assert all(r["window"]["ms"] > 0 and r["dense"]["ms"] > 0 for r in window["rows"])

    summary = (tmp_path / "summary.md").read_text()
    assert "Block-sparse vs dense" in summary and "Sliding window" in summary
    for png in ("block_sparse.png", "window.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert not (tmp_path / "tflops.png").exists()                       # --no-grid: no main grid


def test_panels_beside_the_grid_and_local_global(tmp_path):
    done = run_bench("--cpu", "--seqlens", "64", "--head-dims", "32", "--causal", "no", "--passes", "fwd",
                     "--peers", "sdpa", "--no-plots", "--block-sparse", "--sparse-pattern", "local_global",
                     "--sparse-seqlen", "256", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert len(report["rows"]) == 1 and "window" not in report
    assert report["block_sparse"]["config"]["pattern"] == "local_global"
    assert not (tmp_path / "block_sparse.png").exists()


def test_without_panel_flags_the_json_has_no_panels(tmp_path):
    done = run_bench("--cpu", "--seqlens", "64", "--head-dims", "32", "--causal", "no", "--passes", "fwd",
                     "--peers", "sdpa", "--no-plots", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "block_sparse" not in report and "window" not in report


def test_bad_window_size_is_refused():
    assert run_bench("--window", "--window-size", "1,2,3").returncode == 2


@pytest.mark.parametrize("density", panels.DENSITIES)
def test_random_block_masks_have_the_same_count_per_row(density):
    bm = panels.random_block_mask(128, 128, density, 128, "cpu")
    counts = bm.kv_num_blocks.flatten()
    assert (counts == counts[0]).all() and abs(bm.density() - density) < 1 / 128


def test_local_global_masks_are_near_the_density():
    for density in panels.DENSITIES:
        bm = panels.local_global_mask(16384, density, 128, "cpu")
        assert abs(bm.density() - density) < 0.03 and bm.mask.dtype == torch.bool


def test_varlen_panel_counts_each_sequence_and_compares_with_dense(tmp_path):
    done = run_bench("--cpu", "--no-grid", "--varlen", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Packed batch (varlen) vs dense" in done.stdout
    varlen = json.loads((tmp_path / "bench.json").read_text())["varlen"]
    cfg = panels.CPU_VARLEN
    lengths = varlen["lengths"]
    assert sum(lengths) == cfg.total and all(0 < n <= cfg.max_len for n in lengths)
    assert lengths == panels.varlen_lengths(cfg)          # seeded: the same batch every run
    rows = varlen["rows"]
    assert [(r["causal"], r["pass"]) for r in rows] == [(c, p) for c in (False, True) for p in ("fwd", "bwd")]
    for row in rows:
        assert row["varlen"]["ms"] > 0 and row["dense"]["ms"] > 0 and row["varlen_over_dense_tflops"] > 0
        # FLOPs per sequence: 4 H n^2 D, halved when causal, 2.5x for the backward.
        flops = sum(4.0 * cfg.nheads * n * n * cfg.headdim for n in lengths) / (2 if row["causal"] else 1)
        flops *= 2.5 if row["pass"] == "bwd" else 1.0
        assert row["varlen_tflops"] == pytest.approx(flops / (row["varlen"]["ms"] * 1e-3) / 1e12)
    assert "| yes | bwd |" in (tmp_path / "summary.md").read_text()
