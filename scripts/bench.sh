#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the benchmark: on a GPU, flashattn against torch SDPA's backends
# and FlexAttention; without one, the CPU comparison. Extra arguments go to `python -m flashattn.bench`;
# `bash scripts/bench.sh paper [--help]` measures the FlashAttention paper's claims (flashattn/bench/paper/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m flashattn.bench "$@"
