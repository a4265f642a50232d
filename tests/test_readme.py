"""The README's Python examples run as written: on a CPU machine as a user runs them (the PyTorch path;
the tests' interpreter, which a user does not set, is bypassed), on a GPU through the kernels."""
import importlib.util
import re
from pathlib import Path

from conftest import HAS_CUDA

README = Path(__file__).resolve().parents[1] / "README.md"
# A block that needs one of the package's extras opens with the line that installs it; it runs where the
# extra's package (named as the extra) is installed, as the test extra installs it, and is skipped elsewhere.
NEEDS_EXTRA = re.compile(r"# pip install flashattn\[(\w+)\]\n")


def test_readme_python_blocks_run_in_order(use_backend):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "the README's usage examples are missing"
    if not HAS_CUDA:
        use_backend("reference")
    namespace: dict = {}
    for block in blocks:
        extra = NEEDS_EXTRA.match(block)
        if extra and importlib.util.find_spec(extra.group(1)) is None:
            continue
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["out"].shape[-1] == namespace["q"].shape[-1]
