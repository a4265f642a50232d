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


def test_autotune_candidates_are_few_and_start_with_the_table():
    fwd = TileConfig(128, 64, 8, 3)
    bwd = configs.BackwardConfig(kv=TileConfig(64, 64, 4, 2), q=TileConfig(128, 64, 8, 3))
    for kind, base in (("fwd", fwd), ("bwd", bwd)):
        cands = configs.candidates(kind, base)
        assert cands[0] == base and len(cands) == len(set(cands)) <= 7
        assert all(type(c) is type(base) for c in cands)


def test_backward_configs_step_down_part_by_part():
    cfg = configs.BackwardConfig(kv=TileConfig(32, 64, 4, 2), q=TileConfig(64, 32, 4, 3), dk=TileConfig(64, 64, 4, 2))
    steps = 0
    while cfg is not None:
        assert cfg.dk is not None and not cfg.one_launch
        cfg, steps = configs.smaller(cfg), steps + 1
    assert steps < 20


def test_one_launch_needs_matching_launch_parameters():
    with pytest.raises(ValueError, match="one_launch"):
        configs.BackwardConfig(kv=TileConfig(64, 64, 4, 2), q=TileConfig(128, 64, 8, 3), one_launch=True)


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
    fwd = TileConfig(128, 32, 8, 4)
    bwd = configs.BackwardConfig(kv=TileConfig(32, 64, 4, 2), q=TileConfig(64, 32, 4, 3), dk=TileConfig(64, 64, 4, 2))
    configs._save_disk("fwd|GPU|d128|bfloat16|causal=1|n8192|", fwd)
    configs._save_disk("bwd|GPU|d256|bfloat16|causal=0|n8192|", bwd)
    configs._load_disk()
    assert configs._chosen["fwd|GPU|d128|bfloat16|causal=1|n8192|"] == fwd
    assert configs._chosen["bwd|GPU|d256|bfloat16|causal=0|n8192|"] == bwd


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_short_sequences_take_their_own_shape(kind, head_dim, causal, monkeypatch):
    """Up to the short table's length a pass takes its shape, beyond it the main table's; head dims
    without a short entry always take the main table's."""
    import torch
    monkeypatch.setattr(configs, "_capability", lambda index: (9, 0))
    gpu = torch.device("cuda", 0)
    key = (configs._bucket(head_dim), True, causal)
    main = {"fwd": configs._FWD, "bwd": configs._BWD}[kind][key]
    short = {"fwd": configs._FWD_SHORT, "bwd": configs._BWD_SHORT}[kind].get(key)
    pick = lambda n: configs._table_config(kind, head_dim, torch.bfloat16, causal, gpu, n)  # noqa: E731
    if short is not None:
        assert short[1] != main
        assert pick(short[0]) == short[1] and pick(short[0] + 1) == main
    assert pick(1 << 20) == main and pick(None) == main


@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (10, 0)])
def test_warp_specialized_forward_only_where_the_table_has_it(capability, monkeypatch):
    """The warp-specialized forward runs on sm_90 alone, for the head dims, dtypes, causality and
    lengths of _FWD_WS; its autotune candidates keep 4 warps and 2 stages (3 stages gave NaN)."""
    import torch
    monkeypatch.setattr(configs, "_capability", lambda index: capability)
    gpu = torch.device("cuda", 0)
    for head_dim in (40, 64, 96, 128, 256):
        for causal in (False, True):
            ws = lambda d, dtype, n: configs.warp_specialized(d, dtype, causal, n, gpu)  # noqa: E731
            entry = configs._FWD_WS.get((head_dim, True, causal))
            if entry is None or capability != (9, 0):
                assert not any(ws(head_dim, dtype, n) for dtype in (torch.bfloat16, torch.float16)
                               for n in (1, 1 << 12, 1 << 17))
                continue
            start, cfg = entry
            assert ws(head_dim, torch.bfloat16, start) and ws(head_dim, torch.float16, 1 << 17)
            assert not ws(head_dim, torch.bfloat16, start - 1) and not ws(head_dim, torch.float32, 1 << 17)
            assert configs._table_config("fwd_ws", head_dim, torch.bfloat16, causal, gpu, start) == cfg
            assert all((c.num_warps, c.num_stages) == (4, 2) for c in configs.candidates("fwd_ws", cfg))
    assert not configs.warp_specialized(128, torch.bfloat16, False, 1 << 14, torch.device("cpu"))
