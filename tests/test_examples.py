"""examples/decode.py runs end to end and its cached greedy decoding (packed prefill, then
flash_attn_with_kvcache steps) produces the same tokens as recomputing the whole sequence at every
step, with a paged and with a contiguous cache. On a CPU machine the main cases take the PyTorch
path (the interpreter would be slow) and one tiny case runs the Triton kernels in the interpreter."""
import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import DEVICE, HAS_CUDA
from flashattn.ops import dispatch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "decode.py"


@pytest.fixture(scope="module")
def decode_example():
    name = "flashattn_examples_decode"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def _run(decode_example, capsys, *argv):
    status = decode_example.main(["--device", str(DEVICE), *argv])
    out = capsys.readouterr().out
    assert "tokens match: True" in out, out
    assert status == 0, out
    return out


@pytest.mark.parametrize("page_size", [16, 32, 0], ids=["paged-16", "paged-32", "contiguous"])
def test_decode_cached_tokens_match_recomputation(decode_example, capsys, use_backend, page_size):
    if not HAS_CUDA:
        use_backend("reference")
    out = _run(decode_example, capsys, "--batch", "3", "--new-tokens", "6", "--layers", "2",
               "--min-prompt", "3", "--max-prompt", "30", "--page-size", str(page_size))
    assert ("contiguous" in out) == (page_size == 0)


def test_decode_triton_kernels(decode_example, capsys, use_backend):
    """The Triton kernels (under the interpreter on a CPU machine): a prompt that fills its first
    page exactly, so the first decode step writes to the second page."""
    if not HAS_CUDA:
        if not dispatch.triton_interpreter():
            pytest.skip("no GPU and TRITON_INTERPRET unset")
        use_backend("triton")
    _run(decode_example, capsys, "--prompt-lengths", "16,7", "--new-tokens", "3", "--layers", "1",
         "--page-size", "16")
