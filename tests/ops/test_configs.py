"""Tile-shape selection: stepping down on GPUs that cannot run the table's shape, the opt-in autotune,
and its disk cache. (The launches are fakes: what is tested is the choice, not a kernel.)"""
from __future__ import annotations

import pytest

pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from flashattn.ops.triton import configs  # noqa: E402
from flashattn.ops.triton.configs import TileConfig  # noqa: E402


def _fits_in(max_stages: int, max_block: int):
    ran = []

    def launch(cfg):
        if cfg.num_stages > max_stages or max(cfg.block_m, cfg.block_n) > max_block:
            raise OutOfResources(1, 0, "shared memory")
        ran.append(cfg)
    return launch, ran


@pytest.mark.parametrize("max_stages, max_block", [(3, 128), (1, 128), (2, 64), (1, 32), (2, 16)])
def test_launch_steps_down_until_the_shape_fits(max_stages, max_block):
    launch, ran = _fits_in(max_stages, max_block)
    used = configs._launch_fitting(TileConfig(128, 64, 8, 3), launch)
    assert ran == [used]
    assert used.num_stages <= max_stages and max(used.block_m, used.block_n) <= max_block


def test_launch_gives_up_below_the_smallest_shape():
    launch, _ = _fits_in(0, 0)
    with pytest.raises(OutOfResources):
        configs._launch_fitting(TileConfig(64, 64, 4, 2), launch)


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_autotune_candidates_are_few_and_start_with_the_table(kind):
    base = TileConfig(64, 64, 4, 2, one_launch=True)
    cands = configs.candidates(kind, base)
    assert cands[0] == base and len(cands) == len(set(cands)) <= 7
    assert all(c.one_launch for c in cands) == (kind == "fwd")


def test_autotune_keeps_the_fastest_that_runs():
    cands = [TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 3), TileConfig(64, 128, 4, 2)]
    cost = {cands[0]: 2.0, cands[1]: 1.0, cands[2]: 0.5}
    current = {}

    def launch(cfg):
        if cfg.block_n > 64:
            raise OutOfResources(1, 0, "shared memory")
        current["cfg"] = cfg

    def timer(fn):
        fn()
        return cost[current["cfg"]]
    assert configs._autotune(cands, launch, timer) == cands[1]


def test_tuned_shapes_persist_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(configs, "_chosen", {})
    monkeypatch.setattr(configs, "_disk_loaded", False)
    cfg = TileConfig(128, 32, 8, 4, one_launch=True)
    configs._save_disk("bwd|GPU|d128|bfloat16|causal=1|n8192|", cfg)
    configs._load_disk()
    assert configs._chosen["bwd|GPU|d128|bfloat16|causal=1|n8192|"] == cfg
