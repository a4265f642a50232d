"""The option panels of `python -m flashattn.bench` (--block-sparse, --window), in CPU mode at tiny sizes."""
import json

import pytest
import torch

from flashattn.bench import measure, panels
from flashattn.bench.measure import Measurement

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
    done = run_bench("--cpu", "--no-grid", "--varlen", "--decode", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Packed batch (varlen) vs dense" in done.stdout and "Decode, one query token" in done.stdout
    decode = json.loads((tmp_path / "bench.json").read_text())["decode"]["rows"]
    assert [(r["batch"], r["layout"]) for r in decode] == [(b, layout) for b in (1, 2)
                                                         for layout in ("contiguous", "paged-16")]
    for row in decode:
        for name, timing in row["timings"].items():
            assert timing["status"] == "ok" and row["us"][name] == pytest.approx(timing["ms"] * 1e3)
            assert len(timing["rounds_ms"]) == measure.CPU_ROUNDS and isinstance(timing["noisy"], bool)
    varlen = json.loads((tmp_path / "bench.json").read_text())["varlen"]
    cfg = panels.CPU_VARLEN
    lengths = varlen["lengths"]
    assert sum(lengths) == cfg.total and all(0 < n <= cfg.max_len for n in lengths)
    assert lengths == panels.varlen_lengths(cfg)          # seeded: the same batch every run
    rows = varlen["rows"]
    assert [(r["causal"], r["pass"]) for r in rows] == [(c, p) for c in (False, True) for p in ("fwd", "bwd")]
    for row in rows:
        assert row["varlen"]["ms"] > 0 and row["dense"]["ms"] > 0 and row["varlen_over_dense_tflops"] > 0
        assert row["varlen"]["spread"] >= 0 and row["varlen"]["reruns"] >= 0
        # FLOPs per sequence: 4 H n^2 D, halved when causal, 2.5x for the backward.
        flops = sum(4.0 * cfg.nheads * n * n * cfg.headdim for n in lengths) / (2 if row["causal"] else 1)
        flops *= 2.5 if row["pass"] == "bwd" else 1.0
        assert row["varlen_tflops"] == pytest.approx(flops / (row["varlen"]["ms"] * 1e-3) / 1e12)
    assert "| yes | bwd |" in (tmp_path / "summary.md").read_text()


def _timed(ms: float, noisy: bool = False) -> Measurement:
    rounds = [ms, ms * 1.3, ms, ms, ms] if noisy else [ms] * 5
    return Measurement("ok", ms=ms, rounds_ms=rounds, spread=measure.spread(rounds),
                       reruns=measure.MAX_RERUNS if noisy else 0, noisy=noisy)


def test_panels_mark_noisy_cells_in_tables_json_and_plots(tmp_path):
    from rich.console import Console

    cpu = torch.device("cpu")
    p = panels.Panels(mode="cpu", device=cpu, sparse=panels.CPU_SPARSE, window=panels.CPU_WINDOW,
                      varlen=panels.CPU_VARLEN, decode=panels.decode_panel.CPU_DECODE)
    p.sparse_rows = [panels.SparseRow(d, d, pass_, _timed(d, noisy=d == 0.5), _timed(1.0, noisy=pass_ == "bwd"))
                     for d in panels.DENSITIES for pass_ in ("fwd", "bwd")]
    p.window_rows = [panels.WindowRow(n, "fwd", _timed(1.0, noisy=n == 512), _timed(2.0)) for n in (256, 512)]
    p.varlen_rows = [panels.VarlenRow(False, "fwd", _timed(1.0), _timed(2.0, noisy=True), 1e9, 1e9,
                                      Measurement("skipped", error="CUDA only"))]
    row = panels.decode_panel.DecodeRow(1, 1, 256, "contiguous", 2 ** 20)
    row.timings = {panels.decode_panel.SUBJECT: _timed(0.01, noisy=True), "flashattn dense": _timed(0.02)}
    p.decode_rows = [row]

    text = panels.markdown(p)
    assert "| 0.5 | 0.500 | fwd | 0.500 ~30% | 1.000 |" in text
    assert "| 512 | fwd | 1.000 ~30% | 2.000 |" in text
    assert "| no | fwd | 1.000 | 2.000 ~30% | 1.0 | 0.5000 ~30% |" in text     # ms and TFLOP/s both marked
    assert "| 10.0 ~30% (0.10) | 20.0 (0.05) |" in text
    assert text.count(measure.NOISE_FOOTNOTE) == 1
    decode = panels.to_json(p)["decode"]["rows"][0]
    assert decode["us"][panels.decode_panel.SUBJECT] == 10.0
    assert decode["timings"][panels.decode_panel.SUBJECT]["noisy"] is True
    assert panels.to_json(p)["window"]["rows"][1]["window"]["reruns"] == measure.MAX_RERUNS

    console = Console(record=True, width=250)
    panels.print_panels(p, console)
    printed = console.export_text()
    assert "0.500 ~30%" in printed and "after 2 reruns" in printed and "err: CUDA only" in printed

    written = panels.write_plots(p, tmp_path)
    assert [w.name for w in written] == ["block_sparse.png", "window.png"]
    assert all(w.stat().st_size > 0 for w in written)
