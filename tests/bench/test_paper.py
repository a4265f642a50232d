"""`python -m flashattn.bench paper`: the CPU report end to end (every section measured or marked
skipped, paper.md, paper.json and the PNGs written), its parts that need a GPU rendered from
synthetic results, the Nsight Compute CSV parser on canned output, and the profiling round trip
through a stand-in ncu."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from flashattn.bench.paper import cli, gpt2, hbm, layer, memory, ncu, report, speed
from flashattn.ops.triton import choice
from flashattn.ops.variant import from_causal

REPO = Path(__file__).resolve().parents[2]
GPU_ENV = {"device": "NVIDIA H200", "device_type": "cuda", "date_utc": "2026-12-01T00:00:00+00:00",
           "git": {"commit": "0" * 40, "dirty": False}, "torch": "2.13.0", "triton": "3.6.0", "cuda": "12.8",
           "cudnn": 91000, "gpu_memory_bytes": 141 * 2 ** 30}


def run_paper(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The conftest turns on Triton's interpreter for the kernel tests; the report runs the PyTorch path.
    env.pop("TRITON_INTERPRET", None)
    env.pop("FLASHATTN_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "flashattn.bench", "paper", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cpu_report_has_every_section_measured_or_skipped(tmp_path):
    done = run_paper("--cpu", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "paper.json").read_text())
    sections = results["sections"]
    assert list(sections) == list(report.KEYS) or set(sections) == set(report.KEYS)
    assert {k for k, e in sections.items() if e["status"] == "skipped"} == {"io", "memory", "layer"}
    assert {k for k, e in sections.items() if e["status"] == "ok"} == {"exact", "speed", "sparse", "gpt2"}
    text = (tmp_path / "paper.md").read_text()
    for i, section in enumerate(report.SECTIONS, 1):
        assert f"## {i}. {section.TITLE}" in text
        assert section.CLAIM in text
    assert text.count("*Skipped: ") == 3 and "no GPU is in use" in text
    assert text.count("**Where they differ and why**") == 4
    for name in ("exact.png", "speed.png", "sparse.png", "gpt2.png", "paper.png"):
        assert (tmp_path / name).stat().st_size > 0, name
        assert f"({name})" in text
    # Every implementation ran in every exactness cell, and the three GPT-2 runs started from one model.
    for row in sections["exact"]["data"]["rows"]:
        assert all(r["status"] == "ok" for r in row["results"].values()), row
    runs = sections["gpt2"]["data"]["runs"]
    assert len({r["losses"][0] for r in runs if r["context"] == runs[0]["context"]}) == 1

    # --render rebuilds the same report from paper.json alone.
    before = text
    (tmp_path / "paper.md").unlink()
    assert run_paper("--render", "--no-plots", "--out", str(tmp_path)).returncode == 0
    assert (tmp_path / "paper.md").read_text() == before


@pytest.fixture
def keep_threads():
    """cli.main sets one thread in CPU mode: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_sections_are_kept_and_merged_across_runs(tmp_path, use_backend, keep_threads):
    use_backend("reference")
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli.main(["--cpu", "--sections", "exact", "--no-plots", "--out", str(first)]) == 0
    assert cli.main(["--cpu", "--sections", "io", "--no-plots", "--out", str(second), "--merge",
                     str(first / "paper.json")]) == 0
    sections = json.loads((second / "paper.json").read_text())["sections"]
    assert sections["exact"]["status"] == "ok" and sections["io"]["status"] == "skipped"
    assert sections["speed"]["status"] == "not run"
    # A later run into the same directory keeps what it does not measure again.
    assert cli.main(["--cpu", "--sections", "memory", "--no-plots", "--out", str(second)]) == 0
    sections = json.loads((second / "paper.json").read_text())["sections"]
    assert sections["exact"]["status"] == "ok" and sections["memory"]["status"] == "skipped"
    assert "*Not run: not selected" in (second / "paper.md").read_text()


def test_help_and_bad_sections():
    done = run_paper("--help")
    assert done.returncode == 0 and "--sections" in done.stdout
    assert run_paper("--sections", "nonesuch").returncode == 2


# ------------------------------------------------------------------------------- Nsight Compute's CSV

DETAILS = '''==PROF== Connected to process 4242 (/usr/bin/python3.11)
==PROF== Profiling "ncu_call_marker" - 0: 0%....50%....100% - 1 pass
some line the application printed
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3.11","127.0.0.1","ncu_call_marker","1","7","(128, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","0"
"0","4242","python3.11","127.0.0.1","ncu_call_marker","1","7","(128, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","32"
"1","4242","python3.11","127.0.0.1","void gemm<at::Half, 4, (int)2>(T1, int)","1","7","(256, 1, 1)","(64, 16, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","2,147,483,648"
"1","4242","python3.11","127.0.0.1","void gemm<at::Half, 4, (int)2>(T1, int)","1","7","(256, 1, 1)","(64, 16, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","Mbyte","1.5"
"2","4242","python3.11","127.0.0.1","softmax_warp_forward","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","1,000"
"2","4242","python3.11","127.0.0.1","softmax_warp_forward","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","2,000"
"3","4242","python3.11","127.0.0.1","ncu_call_marker","1","7","(128, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","0"
"3","4242","python3.11","127.0.0.1","ncu_call_marker","1","7","(128, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","32"
"4","4242","python3.11","127.0.0.1","_attn_fwd","1","7","(256, 1, 1)","(16, 16, 64)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","536,870,912"
"4","4242","python3.11","127.0.0.1","_attn_fwd","1","7","(256, 1, 1)","(16, 16, 64)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","134,217,728"
"4","4242","python3.11","127.0.0.1","_attn_fwd","1","7","(256, 1, 1)","(16, 16, 64)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","5,000"
==PROF== Disconnected from process 4242
'''

RAW = '''"ID","Process ID","Kernel Name","dram__bytes_read.sum","dram__bytes_write.sum"
"","","","Kbyte","byte"
"0","7","ncu_call_marker","0","32"
"1","7","_attn_fwd","2,048","1,000"
"2","7","_bwd","1","1"
'''


def test_ncu_details_csv_is_summed_per_call_between_markers():
    kernels = ncu.parse_csv(DETAILS)
    assert [k.name for k in kernels] == ["ncu_call_marker", "void gemm<at::Half, 4, (int)2>(T1, int)",
                                         "softmax_warp_forward", "ncu_call_marker", "_attn_fwd"]
    assert kernels[1].read_bytes == 2 ** 31 and kernels[1].write_bytes == 1.5e6
    calls = ncu.split_calls(kernels)
    assert len(calls) == 2
    assert [len(c.kernels) for c in calls] == [2, 1]
    assert calls[0].read_bytes == 2 ** 31 + 1000 and calls[0].write_bytes == 1.5e6 + 2000
    assert calls[1].read_bytes == 2 ** 29 and calls[1].write_bytes == 2 ** 27


def test_ncu_raw_csv_takes_the_units_row():
    calls = ncu.split_calls(ncu.parse_csv(RAW))
    assert len(calls) == 1 and calls[0].read_bytes == 2048e3 + 1e3 and calls[0].write_bytes == 1001


def test_ncu_csv_errors_are_named():
    assert ncu.parse_csv("==PROF== nothing profiled\n") == []
    with pytest.raises(ValueError, match="unknown unit 'furlong'"):
        ncu.parse_csv('"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
                      '"0","k","dram__bytes_read.sum","furlong","1"\n')
    with pytest.raises(ValueError, match="no 'Kernel Name' column"):
        ncu.parse_csv('"ID","Metric Name"\n"0","dram__bytes_read.sum"\n')


FAKE_NCU = r'''
import json, sys
args = sys.argv[1:]
flag = lambda name: args[args.index(name) + 1]
assert flag("--clock-control") == "none" and flag("--profile-from-start") == "off"
assert flag("--metrics") == "dram__bytes_read.sum,dram__bytes_write.sum" and "--csv" in args
assert args[-4:-2] == ["-m", "flashattn.bench.paper.ncu"]
specs = json.load(open(args[-2]))
json.dump([{"status": "ok"} for _ in specs], open(args[-1], "w"))
lines = ['"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"']
kid = 0
for i, spec in enumerate(specs):
    for name, read in (("ncu_call_marker", 0), ("k_a", 1000 * (i + 1)), ("k_b", 7)):
        lines += [f'"{kid}","{name}","dram__bytes_read.sum","byte","{read:,}"',
                  f'"{kid}","{name}","dram__bytes_write.sum","byte","{spec["seqlen"]}"']
        kid += 1
open(flag("--log-file"), "w").write("==PROF== Connected\n" + "\n".join(lines) + "\n")
'''


def test_profile_runs_the_worker_under_ncu_and_aligns_the_calls(tmp_path):
    fake = tmp_path / "ncu"
    fake.write_text(f"#!{sys.executable}\n{FAKE_NCU}")
    fake.chmod(0o755)
    specs = [{"impl": "standard", "seqlen": 256}, {"impl": "flashattn", "seqlen": 512}]
    records, calls = ncu.profile(specs, str(fake), timeout_s=60)
    assert records == [{"status": "ok"}] * 2
    assert [c.read_bytes for c in calls] == [1007, 2007]
    assert [c.write_bytes for c in calls] == [512, 1024]


# ------------------------------------------------------------------------------- the GPU sections' text

def _tiles(n: int) -> dict:
    x = torch.zeros(1, n, 2, 64)
    return {p: asdict(choice.tiles(p, x, x, x, from_causal(False), 0.125, x)) for p in ("fwd", "bwd")}


def _io_data() -> dict:
    sizes = hbm.Sizes(seqlens=(512, 1024, 2048))
    rows = []
    for n in sizes.seqlens:
        b = sizes.tokens // n
        for impl, per_head in (("standard", 20 * (n * 64 + n * n)), ("sdpa", 6 * n * 64), ("flashattn", 4 * n * n)):
            for pass_ in hbm.PASSES:
                total = per_head * b * sizes.nheads * (1 if pass_ == "fwd" else 3)
                row = {"impl": impl, "batch": b, "nheads": 16, "seqlen": n, "headdim": 64, "dtype": "fp16",
                       "pass": pass_, "status": "ok", "read_bytes": total * 0.6, "write_bytes": total * 0.4,
                       "kernels": 3, "kernel_names": ["k"]}
                if impl == "flashattn":
                    row["tiles"] = _tiles(n)
                rows.append(row)
    ok = {"status": "ok", "ms": 5.0}
    runtimes = {p: {"flashattn": ok, "standard": {"status": "ok", "ms": 30.0}, "sdpa": ok} for p in hbm.PASSES}
    return {"sizes": asdict(sizes), "runtimes": runtimes, "rows": rows, "counters_skipped": None}


def test_io_model_and_constants():
    data = _io_data()
    assert hbm.model("standard", "fwd", 1024, 64, None) == 1024 * 64 + 1024 ** 2
    tiles = _tiles(1024)
    held = [p["rows"] for p in tiles["fwd"]["programs"]]
    assert hbm.model("flashattn", "fwd", 1024, 64, tiles) == sum(1024 ** 2 * 64 / r for r in held)
    assert hbm.model("sdpa", "fwd", 1024, 64, tiles) is None
    c = hbm.constants(data)
    assert c["standard:fwd"] == pytest.approx(20.0)      # the bytes per model access the data were made with
    assert set(c) == {"standard:fwd", "standard:fwd+bwd", "flashattn:fwd", "flashattn:fwd+bwd"}


def _render(section, data, tmp_path, env=GPU_ENV) -> str:
    text = section.markdown(data, env)
    assert "**Measured figure**" in text and "**Where they differ and why**" in text
    for name in section.plot(data, tmp_path):
        assert (tmp_path / name).stat().st_size > 0
        assert f"({name})" in text
    return text


def test_io_section_renders(tmp_path):
    text = _render(hbm, _io_data(), tmp_path)
    assert "H200" in text and "40.3" in text and "Tiles our kernels ran with" in text
    skipped = dict(_io_data(), rows=[], counters_skipped="ncu not found")
    assert "HBM counters: skipped, ncu not found" in _render(hbm, skipped, tmp_path)


def _measurement(mib: float) -> dict:
    return {"status": "ok", "peak_bytes": int(mib * 2 ** 20)}


def test_memory_and_speed_sections_render_with_out_of_memory_cells(tmp_path):
    rows = []
    for variant in ("plain", "dropout+padding"):
        for n in (1024, 2048, 4096):
            std = _measurement(n * n / 2 ** 12) if n < 4096 else {"status": "oom", "error": "out of memory"}
            rows.append({"variant": variant, "seqlen": n, "results": {
                "flashattn": _measurement(n / 256), "standard": std, "sdpa": _measurement(n / 200)}})
    text = _render(memory, {"sizes": asdict(memory.GPU), "rows": rows}, tmp_path)
    assert "OOM" in text and "runs out of memory at N=4k" in text
    speed_rows = []
    for variant in ("plain", "dropout+padding"):
        for n in (128, 1024, 65536):
            std = {"status": "ok", "ms": n / 100} if n < 65536 else {"status": "skipped",
                                                                      "error": "out of memory from N=64k"}
            speed_rows.append({"variant": variant, "seqlen": n, "batch": 1, "results": {
                "flashattn": {"status": "ok", "ms": n / 300}, "standard": std, "sdpa": {"status": "ok", "ms": n / 320}}})
    text = _render(speed, {"sizes": asdict(speed.GPU), "rows": speed_rows, "timing": "do_bench"}, tmp_path)
    assert "3.00x" in text and "out of memory from N=64k" in text and "within the paper's 2-4x" in text


def test_layer_and_gpt2_sections_render(tmp_path):
    rows = [{"seqlen": n, "results": {"flashattn": _measurement(n / 10), "standard": _measurement(n * n / 1e4),
                                      "sdpa": _measurement(n / 9)}} for n in layer.GPU.seqlens]
    text = _render(layer, {"sizes": asdict(layer.GPU), "module": "FlashAttention(hidden_size=768)", "rows": rows},
                   tmp_path)
    assert "(2, 2048, 768)" in text
    runs = []
    for context, batch in gpt2.GPU.runs:
        for name, speedup in (("standard", 1.0), ("sdpa", 2.8), ("flashattn", 3.0)):
            runs.append({"attention": name, "context": context, "batch": batch, "steps": 300, "params": 85_000_000,
                         "losses": [5.5 - i * 0.01 + (0.001 if name == "flashattn" else 0) for i in range(300)],
                         "step_ms": 100 / speedup, "tokens_per_s": 80_000 * speedup,
                         "peak_bytes": 2 ** 30 * (20 if name == "standard" else 5), "error": None})
    longest = [{"attention": n, "longest": L, "first_oom": oom, "stopped_by": why, "cap": 131072, "seconds": 9.0,
                "probes": []} for n, L, oom, why in (("standard", 9216, 10240, "out of memory"),
                                                     ("sdpa", 131072, None, "cap"), ("flashattn", 131072, None, "cap"))]
    data = {"sizes": asdict(gpt2.GPU), "params": 85_000_000, "data_bytes": 32 * 2 ** 20, "runs": runs,
            "longest": longest, "longest_skipped": None}
    text = _render(gpt2, data, tmp_path)
    assert "3.00x standard attention's" in text and "standard 9216" in text and "flashattn 131072 (the cap)" in text
    assert "0.0010" in text          # the loss curves' largest smoothed difference
