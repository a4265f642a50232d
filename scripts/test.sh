#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Without a GPU the Triton kernels run under
# Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1); extra arguments go
# to pytest, e.g. `bash scripts/test.sh -k causal`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
