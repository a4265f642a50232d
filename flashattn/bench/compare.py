"""Plain (no option) forward and backward speed of two source trees, measured in one run.

Used to check that adding options to the kernels left the dense path's speed alone: the baseline is
an exported commit (`git archive <commit> flashattn | tar -x -C <dir>`), the candidate the checkout.
Each (tree, cell) is timed in its own subprocess, the trees alternating round by round so that clock
and temperature drift hit both alike; the median over rounds is compared.
    python -m flashattn.bench.compare --baseline /path/to/exported/tree --out compare.json [--rounds 3]
        [--cells 128:16384:causal,64:8192:full]
Each cell times the forward, the backward and the backward with deterministic=True ("det").
Passing the baseline as --candidate too measures the noise of the comparison itself (an A/A run).
With --seconds S each pass runs back to back for S seconds instead (the mean time per call), which
holds the GPU at its power cap as training does; do_bench's short bursts (25 ms warm-up, 100 ms)
read level where such loops show a change of a few percent (benchmarks/TUNING.md, benchmark-method).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CELLS = [(d, n, c) for d in (64, 128, 256) for n in (2048, 8192) for c in (False, True)]
PASSES = ("fwd", "bwd", "det")

_CHILD = r"""
import json, math, sys, time, torch
from triton.testing import do_bench
SECONDS = float(sys.argv[2])
def timed(fn):
    if SECONDS <= 0:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, t0 = 0, time.perf_counter()
    start.record()
    while time.perf_counter() - t0 < SECONDS:
        for _ in range(10):
            fn()
        calls += 10
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls
from flashattn.ops.triton import backward as B, forward as F
from dataclasses import replace
from flashattn.ops.variant import from_causal
out = []
for d, n, causal in json.loads(sys.argv[1]):
    h, b = 2048 // d, 16384 // n
    q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = 1 / math.sqrt(d)
    o, lse = F.forward(q, k, v, scale, causal)
    fwd = timed(lambda: F.forward(q, k, v, scale, causal))
    bwd = timed(lambda: B.backward(do, q, k, v, o, lse, scale, causal))
    det_variant = replace(from_causal(causal), deterministic=True)
    det = timed(lambda: B.backward(do, q, k, v, o, lse, scale, det_variant))
    out.append(dict(d=d, n=n, causal=causal, fwd_ms=fwd, bwd_ms=bwd, det_ms=det))
print("RESULT" + json.dumps(out))
"""


def _time(tree: Path, cells, seconds: float) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cells), str(seconds)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, type=Path)
    ap.add_argument("--candidate", type=Path, default=Path(__file__).resolve().parents[2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cells", help="head_dim:seqlen:full|causal,... (default: head dims 64/128/256 at 2k "
                                    "and 8k, causal or not)")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="run each pass back to back for this long and take the mean time per call "
                         "(default 0: do_bench's median)")
    ap.add_argument("--out", default="compare.json")
    args = ap.parse_args()
    cells = CELLS if not args.cells else [(int(d), int(n), c == "causal") for d, n, c in
                                          (cell.split(":") for cell in args.cells.split(","))]
    runs = {"baseline": [], "candidate": []}
    for i in range(args.rounds):
        # Alternate which tree goes first, so that an order effect (clocks, temperature) is not read
        # as a difference between the trees.
        for name in (("baseline", "candidate") if i % 2 == 0 else ("candidate", "baseline")):
            runs[name].append(_time(getattr(args, name), cells, args.seconds))
    rows = []
    print(f"{'cell':<22}" + "".join(f"{p + ' base':>10}{p + ' new':>10}{'ratio':>7}" for p in PASSES)
          + f"{'det/bwd new':>12}")
    for i, (d, n, causal) in enumerate(cells):
        med = {name: {p: statistics.median(r[i][f"{p}_ms"] for r in runs[name]) for p in PASSES}
               for name in runs}
        ratio = {p: med["baseline"][p] / med["candidate"][p] for p in PASSES}  # > 1: faster now
        rounds = {name: {p: [r[i][f"{p}_ms"] for r in runs[name]] for p in PASSES} for name in runs}
        det_speed = med["candidate"]["bwd"] / med["candidate"]["det"]  # deterministic speed / default's
        rows.append(dict(d=d, n=n, causal=causal, baseline_ms=med["baseline"], candidate_ms=med["candidate"],
                         speed_ratio=ratio, candidate_det_over_default=det_speed, rounds_ms=rounds))
        print(f"d{d} n{n} {'causal' if causal else 'full':<8}"
              + "".join(f"{med['baseline'][p]:>10.3f}{med['candidate'][p]:>10.3f}{ratio[p]:>7.3f}" for p in PASSES)
              + f"{det_speed:>12.3f}", flush=True)
    worst = min(min(r["speed_ratio"].values()) for r in rows)
    print(f"worst speed ratio (candidate / baseline speed): {worst:.3f}")
    with open(args.out, "w") as f:
        json.dump(dict(rounds=args.rounds, seconds=args.seconds, baseline=str(args.baseline), rows=rows,
                       worst_ratio=worst), f, indent=1)


if __name__ == "__main__":
    main()
