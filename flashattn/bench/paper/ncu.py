"""HBM traffic from the GPU's counters: Nsight Compute (ncu) profiles a worker process that runs each
measured call once, and its DRAM byte counters are summed over every kernel of the call.

    ncu --clock-control none --metrics dram__bytes_read.sum,dram__bytes_write.sum --csv --print-units base
        --profile-from-start off --log-file LOG  python -m flashattn.bench.paper.ncu SPEC RESULT

The worker (`python -m flashattn.bench.paper.ncu`) reads the calls from SPEC (JSON), and for each one
runs it once unprofiled (compilation, tile fitting, library handles), then between
torch.cuda.profiler.start() and stop() launches a marker kernel (marker.py: `ncu_call_marker`) and
the call, synchronised; so only those kernels are profiled, and the kernels after the k-th marker
belong to the k-th call. It writes each call's status (and, for ours, the tiles the kernels ran with)
to RESULT. ncu replays nothing here (two counters fit one pass); with its default --cache-control all
it flushes the caches before each kernel, so every kernel's bytes are the traffic it causes from a
cold L2.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
MARKER = "ncu_call_marker"
# ncu's byte units: with --print-units base every value is in bytes; the scaled ones, should a version
# print them anyway, are decimal (Kbyte = 1000 bytes).
_UNITS = {"byte": 1, "bytes": 1, "B": 1, "Kbyte": 1e3, "KB": 1e3, "Mbyte": 1e6, "MB": 1e6, "Gbyte": 1e9,
          "GB": 1e9, "Tbyte": 1e12, "TB": 1e12, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}


@dataclass
class Kernel:
    """One profiled kernel launch and its DRAM bytes."""
    id: str
    name: str
    read_bytes: float = 0.0
    write_bytes: float = 0.0


@dataclass
class CallIO:
    """The kernels of one measured call, and their DRAM bytes summed."""
    kernels: list[Kernel] = field(default_factory=list)

    @property
    def read_bytes(self) -> float:
        return sum(k.read_bytes for k in self.kernels)

    @property
    def write_bytes(self) -> float:
        return sum(k.write_bytes for k in self.kernels)


def _value(text: str, unit: str, metric: str) -> float:
    """A counter value in bytes: thousands separators dropped, the unit applied."""
    unit = unit.strip()
    if unit not in _UNITS:
        raise ValueError(f"ncu printed {metric} in an unknown unit {unit!r}")
    cleaned = text.strip().replace(",", "").replace(" ", "")
    if cleaned in ("", "n/a", "N/A"):
        return 0.0
    return float(cleaned) * _UNITS[unit]


def parse_csv(text: str) -> list[Kernel]:
    """The kernels of ncu's --csv output, in launch order, with their DRAM bytes.

    Takes the details page (one row per kernel and metric: "ID", "Kernel Name", "Metric Name",
    "Metric Unit", "Metric Value", among others) or the raw page (one row per kernel, a column per
    metric, the units in the row after the header). Lines that are not quoted CSV (ncu's ==PROF==
    messages, anything the application printed) are skipped."""
    rows = list(csv.reader(line for line in text.splitlines() if line.startswith('"')))
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    for needed in ("ID", "Kernel Name"):
        if needed not in col:
            raise ValueError(f"ncu's CSV header has no {needed!r} column: {header[:8]}")
    kernels: dict[str, Kernel] = {}
    if "Metric Name" in col:
        for row in body:
            if len(row) != len(header) or row == header:
                continue
            metric = row[col["Metric Name"]]
            if metric not in METRICS:
                continue
            kid = row[col["ID"]]
            kernel = kernels.setdefault(kid, Kernel(kid, row[col["Kernel Name"]]))
            value = _value(row[col["Metric Value"]], row[col["Metric Unit"]], metric)
            if metric == METRICS[0]:
                kernel.read_bytes += value
            else:
                kernel.write_bytes += value
        return list(kernels.values())
    missing = [m for m in METRICS if m not in col]
    if missing:
        raise ValueError(f"ncu's CSV has no column for {', '.join(missing)}")
    units = {m: "byte" for m in METRICS}
    for row in body:
        if len(row) != len(header) or row == header:
            continue
        if not row[col["ID"]].strip().isdigit():      # the raw page's units row
            units = {m: row[col[m]] or "byte" for m in METRICS}
            continue
        kid = row[col["ID"]]
        kernels[kid] = Kernel(kid, row[col["Kernel Name"]], _value(row[col[METRICS[0]]], units[METRICS[0]], METRICS[0]),
                              _value(row[col[METRICS[1]]], units[METRICS[1]], METRICS[1]))
    return list(kernels.values())


def split_calls(kernels: list[Kernel], marker: str = MARKER) -> list[CallIO]:
    """The kernels after each marker kernel, one CallIO per marker; the markers themselves are not
    counted. Kernels before the first marker (there should be none) are dropped."""
    calls: list[CallIO] = []
    for kernel in kernels:
        if marker in kernel.name:
            calls.append(CallIO())
        elif calls:
            calls[-1].kernels.append(kernel)
    return calls


def find_ncu() -> str | None:
    """ncu on PATH, else the newest under /usr/local/cuda*/bin or /opt/nvidia/nsight-compute*."""
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/ncu") + glob.glob("/opt/nvidia/nsight-compute*/ncu"))
    return candidates[-1] if candidates else None


class NcuError(RuntimeError):
    pass


def profile(specs: list[dict], ncu: str, timeout_s: float = 480.0) -> tuple[list[dict], list[CallIO]]:
    """Run the worker under ncu on `specs` (each: impl, batch, nheads, seqlen, headdim, dtype, pass).
    Returns the worker's record of each call (status, tiles) and each call's kernels, aligned with
    `specs`. Raises NcuError with ncu's last lines when it fails or its output does not line up."""
    with tempfile.TemporaryDirectory(prefix="flashattn-ncu-") as tmp:
        spec_path, result_path, log_path = (Path(tmp) / name for name in ("spec.json", "result.json", "ncu.csv"))
        spec_path.write_text(json.dumps(specs))
        command = [ncu, "--target-processes", "all", "--clock-control", "none", "--metrics", ",".join(METRICS), "--csv", "--print-units", "base",
                   "--profile-from-start", "off", "--log-file", str(log_path),
                   sys.executable, "-m", "flashattn.bench.paper.ncu", str(spec_path), str(result_path)]
        package_root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ, LC_ALL="C", PYTHONPATH=os.pathsep.join(
            filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise NcuError(f"ncu ran past {timeout_s:.0f} s") from exc
        log = log_path.read_text() if log_path.exists() else ""
        tail = "\n".join((log + done.stdout + done.stderr).strip().splitlines()[-12:])
        if done.returncode != 0 or not result_path.exists():
            raise NcuError(f"ncu exited with {done.returncode}: {tail}")
        records = json.loads(result_path.read_text())
    # --log-file takes all of ncu's output; should a version still print its report to stdout, read it there.
    calls = split_calls(parse_csv(log) or parse_csv(done.stdout))
    if len(calls) != len(specs):
        raise NcuError(f"{len(specs)} calls measured but {len(calls)} marker kernels in ncu's output: {tail}")
    return records, calls


# ----------------------------------------------------------------------------- the worker

def _measure(spec: dict, marker) -> dict:
    """Run one call once unprofiled, then once between profiler start and stop after the marker."""
    import torch

    from flashattn.bench import measure
    from flashattn.bench.cases import Case
    from flashattn.bench.paper import common

    device = torch.device("cuda", torch.cuda.current_device())
    record = {"status": "ok"}
    case = Case(spec["dtype"], spec["batch"], spec["nheads"], spec["seqlen"], spec["headdim"], False, spec["pass"])
    call = None
    try:
        peer = next(p for p in common.peers() if p.name == spec["impl"])
        attention = peer.build(case, device)
        (q, k, v), = measure.make_inputs(case, peer.layout, device)
        grad = torch.randn_like(q)

        def call():
            out = attention(q, k, v)
            if spec["pass"] != "fwd":
                out.backward(grad)
        call()
        q.grad = k.grad = v.grad = None
        if spec["impl"] == common.OURS:
            record["tiles"] = _tiles(q, k, v, grad, spec["pass"])
        torch.cuda.synchronize(device)
    except Exception as exc:
        record = {"status": "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error",
                  "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]}
        call = None
    torch.cuda.profiler.start()
    marker()
    if call is not None:
        try:
            call()
        except Exception as exc:
            record = {"status": "error", "error": f"{type(exc).__name__} when profiled"}
    torch.cuda.synchronize(device)
    torch.cuda.profiler.stop()
    del call
    torch.cuda.empty_cache()
    return record


def _tiles(q, k, v, dout, pass_: str) -> dict:
    """The kernel family and tiles of each pass of ours on these (B, N, H, D) inputs."""
    from flashattn.ops.triton import choice
    from flashattn.ops.variant import from_causal
    scale = q.shape[-1] ** -0.5
    passes = ("fwd",) if pass_ == "fwd" else ("fwd", "bwd")
    return {p: asdict(choice.tiles(p, q, k, v, from_causal(False), scale, dout)) for p in passes}


def worker(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m flashattn.bench.paper.ncu SPEC.json RESULT.json (run under ncu by ncu.profile)",
              file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available():
        print("the ncu worker needs a CUDA GPU", file=sys.stderr)
        return 2
    from flashattn.bench.paper import marker
    specs = json.loads(Path(argv[0]).read_text())
    buffer = torch.zeros(1, device="cuda")
    launch = lambda: marker.ncu_call_marker[(1,)](buffer)  # noqa: E731
    launch()          # compiled before any profiled range
    records = [_measure(spec, launch) for spec in specs]
    Path(argv[1]).write_text(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
