"""The GPU tools beside the benchmark (tile sweep, host profile, A/B comparison of two trees) import and
parse their arguments on any machine: `python -m flashattn.bench.<tool> --help`."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("tool", ["sweep", "host", "compare"])
def test_tool_help(tool):
    done = subprocess.run([sys.executable, "-m", f"flashattn.bench.{tool}", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout
