"""Tile, N:M and threshold helpers (sparsevit.prune.tiles) against direct loops; LAMP against its definition."""
import itertools

import pytest
import torch

from sparsevit.prune import tiles
from sparsevit.prune.criteria import lamp_scores
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)

SHAPES = [(37, 50), (64, 96), (33, 17)]
BLOCKS = [(1, 1), (1, 4), (1, 8), (16, 16), (32, 32), (5, 3)]


def _direct_tile_scores(s, block, reduce):
    bh, bw = block
    R, C = s.shape
    out = torch.empty((R + bh - 1) // bh, (C + bw - 1) // bw, dtype=torch.float64)
    for i, j in itertools.product(range(out.shape[0]), range(out.shape[1])):
        t = s[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw].double()
        out[i, j] = {"sum": t.sum(), "mean": t.mean(), "max": t.max()}[reduce]
    return out


@pytest.mark.parametrize("reduce", tiles.REDUCTIONS)
@pytest.mark.parametrize("block", [(16, 16), (5, 3), (1, 8)])
def test_tile_scores_match_direct_loop(block, reduce):
    s = torch.rand(37, 50, generator=torch.Generator().manual_seed(0))
    got = tiles.tile_scores(s, block, reduce)
    ref = _direct_tile_scores(s, block, reduce)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12), (got - ref).abs().max()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_tile_masks_are_aligned_and_meet_target(shape, block):
    g = torch.Generator().manual_seed(1)
    score = torch.rand(shape, generator=g)
    keep = tiles.tile_mask(score, block, 0.6)
    assert tiles.is_tile_aligned(keep, block), "a tile is partly kept"
    removed = int((~keep).sum())
    assert 0.6 * score.numel() - 1e-6 <= removed < 0.6 * score.numel() + block[0] * block[1], removed
    # the removed tiles are the lowest-scoring ones (mean per real entry)
    ts = tiles.tile_scores(score, block, "mean")
    tk = tiles.tile_scores(keep.double(), block, "max") > 0
    if bool(tk.any()) and bool((~tk).any()):  # (one 32x32 tile can cover most of a small weight)
        assert float(ts[~tk].max()) <= float(ts[tk].min())


def test_is_tile_aligned_detects_a_split_tile():
    keep = torch.ones(32, 32, dtype=torch.bool)
    keep[3, 5] = False
    assert not tiles.is_tile_aligned(keep, (16, 16))
    assert tiles.is_tile_aligned(keep, (1, 1))


def test_global_threshold_across_layers():
    g = torch.Generator().manual_seed(2)
    scores = {"a": torch.rand(40, 24, generator=g), "b": torch.rand(24, 70, generator=g) * 2}
    masks = tiles.shaped_masks(scores, n_remove=1500, block=(8, 8))
    removed = sum(int((~m).sum()) for m in masks.values())
    assert 1500 <= removed < 1500 + 64
    ts = torch.cat([tiles.tile_scores(s, (8, 8)).flatten() for s in scores.values()])
    tk = torch.cat([(tiles.tile_scores(masks[k].double(), (8, 8), "max") > 0).flatten() for k in scores])
    kept_min, rem_max = float(ts[tk].min()), float(ts[~tk].max())
    assert rem_max <= kept_min
    per_layer = tiles.shaped_masks(scores, fraction=0.5)
    for k, m in per_layer.items():
        assert int((~m).sum()) == -(-m.numel() // 2)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_nm_masks_keep_the_top_n_of_every_group(n, m):
    score = torch.randn(19, 64, generator=torch.Generator().manual_seed(3)).abs()
    keep = tiles.nm_mask(score, n, m)
    groups, kg = score.view(19, -1, m), keep.view(19, -1, m)
    assert bool((kg.sum(-1) == n).all()), "a group breaks N:M"
    kept_min = torch.where(kg, groups, torch.inf).amin(-1)
    rem_max = torch.where(kg, -torch.inf, groups).amax(-1)
    assert bool((kept_min >= rem_max).all())


def test_nm_and_block_errors():
    with pytest.raises(ValueError, match="multiple of m=4"):
        tiles.nm_mask(torch.rand(4, 10), 2, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        tiles.check_nm((4, 4))
    with pytest.raises(ValueError, match="tile sides"):
        tiles.check_block((0, 4))
    with pytest.raises(ValueError, match="not both"):
        tiles.shaped_masks({"a": torch.rand(4, 8)}, block=(2, 2), nm=(2, 4))


def test_lamp_scores_match_definition():
    w = torch.randn(7, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    flat = w.flatten()
    ref = torch.empty_like(flat)
    for j in range(flat.numel()):  # w_j^2 / sum of w_i^2 over |w_i| >= |w_j|
        ref[j] = flat[j] ** 2 / (flat.abs() >= flat[j].abs()).double().mul(flat ** 2).sum()
    assert torch.allclose(lamp_scores(w).double().flatten(), ref, rtol=1e-5)
    # 1x1 tiles: LAMP of tile energies is the per-weight LAMP score
    assert torch.allclose(tiles.lamp_of_tiles(w.square()), ref.view_as(w), rtol=1e-5)
