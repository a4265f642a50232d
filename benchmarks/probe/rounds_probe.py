"""Probe: why short non-causal forward cells read low in a grid run with interleaved rounds (run
wip-rounds: head dim 128 at 512 tokens, flashattn 333 / 217 / 210 TFLOP/s over three rounds,
FlexAttention 140 against 306 in every earlier run). Each cell is timed the old way (each
implementation alone, 200 ms warm-up, three times in a row) and the new way (measure.time_row, three
interleaved rounds), and every do_bench is watched: the host's time inside the timed calls per call,
the GPU's SM clock and power before and after, and the caching allocator's cudaMalloc count.
CELLS=d:n:causal:pass,... picks the cells."""
import json
import os
import sys
import time

import torch

from flashattn.bench import measure, peers
from flashattn.bench.cases import Case

dev = torch.device("cuda")
cells = [tuple(c.split(":")) for c in
         os.environ.get("CELLS", "128:512:0:fwd,256:512:0:fwd,128:1024:0:fwd,128:512:1:fwd").split(",")]
wanted = peers.available("gpu", ["flashattn", "flex", "sdpa-flash"])[0]
log = []


def _clock() -> int:
    try:
        return torch.cuda.clock_rate()
    except Exception:   # needs pynvml
        return -1


def _power() -> float:
    try:
        return torch.cuda.power_draw() / 1e3
    except Exception:
        return -1.0


def watched(calls, grads):
    """measure.cuda_timer, with what the host and the GPU did around it."""
    host = []

    def timed(fn):
        def run():
            t = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t)
        return run

    before = dict(clock=_clock(), power=_power(),
                  mallocs=torch.cuda.memory_stats().get("segment.all.allocated", 0))
    ms = measure.cuda_timer([timed(fn) for fn in calls], grads)
    log.append(dict(ms=ms, host_us_median=sorted(host)[len(host) // 2] * 1e6, calls=len(host),
                    clock_before=before["clock"], clock_after=_clock(),
                    power_before=before["power"], power_after=_power(),
                    new_segments=torch.cuda.memory_stats().get("segment.all.allocated", 0) - before["mallocs"]))
    return ms


out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%F"), "command": " ".join(sys.argv),
       "rows": []}
for d, n, causal, pass_ in cells:
    d, n, causal = int(d), int(n), bool(int(causal))
    case = Case("bf16", 16384 // n, 2048 // d, n, d, causal, pass_)
    for method in ("alone-200ms", "rounds"):
        log.clear()
        if method == "alone-200ms":
            measure.GPU_WARMUP_MS, measure.GPU_REP_MS = 200, 100
            results = {p.name: [measure.time_case(p, case, dev, watched) for _ in range(3)] for p in wanted}
            order = [p.name for p in wanted for _ in range(3)]
        else:
            measure.GPU_WARMUP_MS, measure.GPU_REP_MS = 40, 60
            row = measure.time_row(wanted, case, dev, watched, rounds=3)
            results = {name: [m] for name, m in row.items()}
            names = [p.name for p in wanted]
            order = names + names[::-1] + names
        entry = dict(d=d, n=n, causal=causal, pass_=pass_, method=method,
                     tflops={name: [round(m.tflops, 1) for m in ms] for name, ms in results.items()},
                     rounds={name: [round(case.flops / x / 1e9, 1) for x in ms[0].rounds_ms or []]
                             for name, ms in results.items()},
                     watched=[dict(peer=name, **w) for name, w in zip(order, log)])
        out["rows"].append(entry)
        print(f"d{d} n{n} {'causal' if causal else 'full'} {pass_} {method}: {entry['tflops']} {entry['rounds']}")
        for w in entry["watched"]:
            print(f"    {w['peer']:12s} {case.flops / w['ms'] / 1e9:7.1f} TFLOP/s  host {w['host_us_median']:6.1f} us/call "
                  f"({w['calls']} calls)  clock {w['clock_before']}->{w['clock_after']} MHz  "
                  f"power {w['power_before']:.0f}->{w['power_after']:.0f} W  new segments {w['new_segments']}", flush=True)
with open(os.environ.get("PROBE_OUT", "rounds_probe.json"), "w") as f:
    json.dump(out, f, indent=1)
