#!/usr/bin/env bash
# Everything the GPU machine is for, in one call: the GPU tests, the tile sweep, the host profile, an A/B
# comparison of two trees, the benchmark, the paper's claims.
# The device machine has torch and triton preinstalled and no network, so this runs from the checkout
# with PYTHONPATH instead of installing. Usage:
#     bash benchmarks/gpu_run.sh [tests] [integration] [sweep] [host] [compare] [bench] [bench-quick] [paper] [ring]
#                                                                                      (default: tests bench)
# Logs and results go to $OUT (bench-out/ when unset); a short summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests bench)
{
    date -u +%FT%TZ
    # The device's copy of the tree may carry git metadata older than its files: FLASHATTN_COMMIT
    # (which the benchmark records too) names the tree when set.
    echo "tree: ${FLASHATTN_COMMIT:-unnamed (set FLASHATTN_COMMIT)}; git metadata of the copy: $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
        --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >>"$LOG" 2>&1
summary=()
for step in "${steps[@]}"; do
    start=$SECONDS
    case "$step" in
        tests)
            # Compiling the kernels for every dtype x head dim x causal x option dominates: spread it over 15
            # processes when pytest-xdist is there.
            par=(); python3 -c "import xdist" 2>/dev/null && par=(-n 15)
            # -v names every result as it lands, so a run cut short still says which tests failed.
            timeout "${TESTS_TIMEOUT:-540}" python3 -m pytest -v -p no:cacheprovider "${par[@]}" --tb=short --durations=25 \
                tests/ops tests/test_interface.py >>"$LOG" 2>&1
            rc=$?
            summary+=("tests: rc=$rc $(grep -cE ' PASSED ' "$LOG") passed, $(grep -cE ' FAILED ' "$LOG") failed")
            grep -E ' FAILED ' "$LOG" | sed 's/.*FAILED //' | sort -u | head -30;;
        integration)
            # Everything above the kernels on the GPU: compile/export/CUDA graphs, the layers, transformers,
            # varlen, the KV cache, SDPA, padding helpers, the examples, ring attention; test_large alone
            # after them (48 GiB a test).
            par=(); python3 -c "import xdist" 2>/dev/null && par=(-n 12)
            files=(tests/test_compile.py tests/test_readme.py tests/nn tests/integrations tests/test_varlen.py
                   tests/test_kvcache.py tests/test_sdpa.py tests/test_bert_padding.py tests/test_examples.py
                   tests/test_tile_size.py tests/distributed)
            timeout "${TESTS_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider "${par[@]}" -rfE --tb=short \
                "${files[@]}" >>"$LOG" 2>&1
            rc=$?
            timeout "${LARGE_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_large.py \
                >>"$LOG" 2>&1
            summary+=("integration: rc=$rc, test_large rc=$? ($(grep -cE '^FAILED' "$LOG") failed)")
            grep -E '^FAILED' "$LOG" | sort -u | head -30;;
        sweep)
            timeout 560 python3 -m flashattn.bench.sweep --out "$OUT/sweep.json" ${SWEEP_ARGS:-} >>"$LOG" 2>&1
            summary+=("sweep: rc=$?")
            grep BEST "$LOG" | tail -40;;
        compare)
            # BASELINE: a directory holding an exported flashattn tree (see flashattn/bench/compare.py).
            timeout 500 python3 -m flashattn.bench.compare --baseline "${BASELINE:?set BASELINE}" ${COMPARE_ARGS:-} \
                --out "$OUT/compare.json" >>"$LOG" 2>&1
            summary+=("compare: rc=$?")
            grep -A20 "^cell" "$LOG" | tail -14;;
        host)
            timeout 400 python3 -m flashattn.bench.host --out "$OUT/host.json" ${HOST_ARGS:-} >>"$LOG" 2>&1
            summary+=("host: rc=$?")
            grep -E "^(d[0-9]+ (full|causal)|layer )" "$LOG" | tail -60;;
        bench)
            timeout 540 python3 -m flashattn.bench --out "$OUT" ${BENCH_ARGS:-} >>"$LOG" 2>&1
            summary+=("bench: rc=$?");;
        ring)
            # Ring attention over the visible GPUs (a multi-GPU kind): RING_ARGS, e.g. "--world-sizes 2".
            timeout 580 python3 -m flashattn.bench ring --out "$OUT/ring" ${RING_ARGS:-} >>"$LOG" 2>&1
            summary+=("ring: rc=$?")
            grep -E "^ring W=" "$LOG" | tail -20;;
        bench-quick)
            timeout 400 python3 -m flashattn.bench --quick --out "$OUT" >>"$LOG" 2>&1
            summary+=("bench-quick: rc=$?");;
        paper)
            # The paper's claims (about 8 minutes in all): PAPER_ARGS="--sections ..." splits it across calls.
            timeout "${PAPER_TIMEOUT:-580}" python3 -m flashattn.bench paper --out "$OUT/paper" ${PAPER_ARGS:-} >>"$LOG" 2>&1
            summary+=("paper: rc=$?")
            grep -E "^[a-z0-9]+: (ok|skipped|error)" "$LOG" | tail -10;;
        *) echo "unknown step $step"; exit 2;;
    esac
    summary[-1]+=" (${step} took $((SECONDS - start)) s)"
done
grep -E "FAILED|Error" "$LOG" | head -20
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
printf '%s\n' "${summary[@]}"
