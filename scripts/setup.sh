#!/usr/bin/env bash
# All set-up for a fresh machine: a virtual environment in .venv with torch, triton, the package
# (editable) and its test and benchmark extras. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
# triton 3.6.0 is the version the kernels are tuned and tested with; its interpreter runs them on CPU.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" "triton==3.6.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]"
