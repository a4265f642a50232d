"""The examples run end to end. examples/train_ring.py: under torchrun with 2 CPU processes its loss
equals the single-process model's. examples/decode.py: its cached greedy decoding (packed prefill, then
flash_attn_with_kvcache steps) produces the same tokens as recomputing the whole sequence at every
step, with a paged and with a contiguous cache. examples/train_gpt2.py: the three attentions train the same
model to the same losses, and its longest-context search doubles, then bisects. On a CPU machine the
main cases take the PyTorch path (the interpreter would be slow) and one tiny case runs the Triton
kernels in the interpreter."""
import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import DEVICE, HAS_CUDA
from flashattn.ops import dispatch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(file: str):
    """examples/<file> as a module, for the duration of the tests that use it."""
    name = f"flashattn_examples_{file.removesuffix('.py')}"
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def decode_example():
    yield from _example("decode.py")


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


@pytest.fixture(scope="module")
def gpt2_example():
    yield from _example("train_gpt2.py")


def test_gpt2_trains_the_same_model_with_each_attention(gpt2_example, use_backend):
    """examples/train_gpt2.py: the same seed gives the three attentions the same weights and batches, so
    their loss curves agree to rounding (float32 on a CPU; bf16 autocast on a GPU)."""
    if not HAS_CUDA:
        use_backend("reference")
    data = gpt2_example.stdlib_bytes(200_000)
    assert len(data) == 200_000 and bytes(data[:100]) == bytes(gpt2_example.stdlib_bytes(100))
    cfg = gpt2_example.GPTConfig(context=32, layers=2, heads=2, dim=32)
    results = [gpt2_example.train(cfg, attention, data, steps=6, batch=2, device=DEVICE, log=None)
               for attention in gpt2_example.ATTENTIONS]
    tolerance = 5e-2 if HAS_CUDA else 1e-4
    reference = results[0].losses
    assert len(reference) == 6 and reference[-1] < reference[0]
    for result in results:
        assert result.error is None and result.tokens_per_s > 0 and result.step_ms > 0
        assert max(abs(a - b) for a, b in zip(result.losses, reference)) < tolerance, (result.attention, result.losses)
    assert (results[0].peak_bytes is not None) == HAS_CUDA


def test_gpt2_command_line(gpt2_example, capsys, use_backend):
    if not HAS_CUDA:
        use_backend("reference")
    status = gpt2_example.main(["--device", str(DEVICE), "--layers", "1", "--heads", "2", "--dim", "32",
                                "--context", "16", "--batch", "2", "--steps", "3", "--data-bytes", "20000"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert all(f"{a}: " in out for a in gpt2_example.ATTENTIONS) and "max |smoothed loss - flashattn's|" in out
    with pytest.raises(SystemExit):
        gpt2_example.main(["--attention", "nonesuch"])


def test_gpt2_longest_context_doubles_then_bisects(gpt2_example, monkeypatch):
    """Doubling from the start until a context does not fit, then bisection to 1/8 of the longest that
    fit; a cap that doubling passes is tried itself."""
    fits_up_to = {"n": 5000}
    monkeypatch.setattr(gpt2_example, "trains_at", lambda cfg, attention, device, seed=0: cfg.context <= fits_up_to["n"])
    cfg = gpt2_example.GPTConfig()
    found = gpt2_example.longest_context(cfg, "standard", DEVICE, start=1024, cap=131072, log=None)
    assert [p["context"] for p in found["probes"]] == [1024, 2048, 4096, 8192, 6144, 5120, 4608]
    assert (found["longest"], found["first_oom"], found["stopped_by"]) == (4608, 5120, "out of memory")
    fits_up_to["n"] = 10 ** 9
    found = gpt2_example.longest_context(cfg, "standard", DEVICE, start=1024, cap=10000, log=None)
    assert (found["longest"], found["first_oom"], found["stopped_by"]) == (10000, None, "cap")
    fits_up_to["n"] = 100
    assert gpt2_example.longest_context(cfg, "standard", DEVICE, start=1024, cap=10000, log=None)["longest"] is None


def test_train_ring_matches_single_process_under_torchrun(tmp_path):
    """examples/train_ring.py under torchrun with 2 CPU processes (gloo, the PyTorch path): the ring's
    loss equals the single-process loss of the same weights, and a few steps train."""
    import os
    import subprocess

    env = {**os.environ, "FLASHATTN_BACKEND": "reference",
           "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(EXAMPLES / "train_ring.py"), "--device", "cpu", "--steps", "3"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "loss matches single process: True" in run.stdout, run.stdout
