"""Kernel-shaped masks: tile scores, tile masks, N:M masks and the thresholds that pick them.

Every unstructured method (``magnitude_unstructured``, ``dimap``, ``art``) scores single weights with
its own criterion; this module turns such a per-weight score into a mask the kernels can exploit:

- ``block=(bh, bw)``: the weight is cut into ``bh x bw`` tiles from the top-left corner; tiles need
  not divide the shape (the last row/column of tiles is partial). A tile is kept or removed as a
  whole, so a block-sparse kernel skips removed tiles entirely. ``(1, 1)`` is plain unstructured.
- ``nm=(n, m)``: in every group of ``m`` consecutive input weights (along the last dim, the layout
  of :class:`sparsevit.formats.NMSparseWeight`) the ``n`` highest-scoring weights are kept.

Tile score = ``reduce`` of the per-weight scores over the tile's *real* entries (padding never
counts). The default is ``mean``: tiles compete per weight removed, which is what the budget counts
(a tile's cost is its number of real weights), so a partial edge tile is neither favoured (as
``sum`` would do: it holds fewer weights, so its sum is small) nor protected. ``sum`` ranks by the
total saliency lost (first-order loss change of removing the whole tile); ``max`` keeps any tile
holding one salient weight (outlier-protecting). All three are offered.

Thresholds: :func:`remove_lowest` removes the lowest-scoring tiles of one score tensor until a weight
count is met (exactly, to within one tile); :func:`threshold_masks` does the same across several
layers compared on one scale (one global threshold, e.g. DIMAP's per-module threshold or global
magnitude), :func:`per_layer_masks` gives every layer the same fraction.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "max")


def check_block(block: Optional[Sequence[int]]) -> Tuple[int, int]:
    """Normalise ``block`` to a ``(bh, bw)`` tuple of positive ints; ``None`` means ``(1, 1)``."""
    if block is None:
        return (1, 1)
    try:
        bh, bw = (int(v) for v in block)
    except (TypeError, ValueError):
        raise ValueError(f"block must be a pair (rows, cols) such as (32, 32) or (1, 8), got {block!r}") from None
    if bh < 1 or bw < 1:
        raise ValueError(f"block={block!r}: tile sides must be >= 1 (1x1 is unstructured).")
    return (bh, bw)


def check_nm(nm: Optional[Sequence[int]]) -> Optional[Tuple[int, int]]:
    """Normalise ``nm`` to ``(n, m)`` with ``0 < n < m``; ``None`` stays ``None``."""
    if nm is None:
        return None
    try:
        n, m = (int(v) for v in nm)
    except (TypeError, ValueError):
        raise ValueError(f"nm must be a pair (n, m) such as (2, 4), got {nm!r}") from None
    if not (0 < n < m <= 255):
        raise ValueError(f"nm={nm!r}: need 0 < n < m <= 255 (n weights kept of every m), e.g. (2, 4).")
    return (n, m)


def _pad_to_tiles(x: torch.Tensor, block: Tuple[int, int], value: float) -> torch.Tensor:
    bh, bw = block
    R, C = x.shape
    return F.pad(x, (0, (-C) % bw, 0, (-R) % bh), value=value)


def tile_sizes(shape: Sequence[int], block: Sequence[int]) -> torch.Tensor:
    """Number of real (non-padding) entries in every tile of a ``shape`` weight, as float64."""
    bh, bw = check_block(block)
    R, C = int(shape[0]), int(shape[1])
    rows = torch.full((math.ceil(R / bh),), float(bh), dtype=torch.float64)
    cols = torch.full((math.ceil(C / bw),), float(bw), dtype=torch.float64)
    rows[-1], cols[-1] = R - bh * (len(rows) - 1), C - bw * (len(cols) - 1)
    return rows[:, None] * cols[None, :]


def tile_scores(score: torch.Tensor, block: Sequence[int], reduce: str = "mean") -> torch.Tensor:
    """Aggregate a per-weight ``score [R, C]`` into one score per ``bh x bw`` tile.

    Returns ``[ceil(R/bh), ceil(C/bw)]`` (float64). ``reduce``: ``mean`` (default; per real entry, see
    the module docstring), ``sum`` or ``max``. Partial edge tiles aggregate only their real entries.
    """
    blk = check_block(block)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if score.dim() != 2:
        raise ValueError(f"score must be 2-D [out, in], got shape {tuple(score.shape)}")
    s = score.detach().double().cpu()
    bh, bw = blk
    if blk == (1, 1):
        return s.clone()
    pad = -math.inf if reduce == "max" else 0.0
    p = _pad_to_tiles(s, blk, pad)
    nr, nc = p.shape[0] // bh, p.shape[1] // bw
    t = p.view(nr, bh, nc, bw)
    if reduce == "max":
        return t.amax(dim=(1, 3))
    total = t.sum(dim=(1, 3))
    return total / tile_sizes(s.shape, blk) if reduce == "mean" else total


def expand_tiles(tile_keep: torch.Tensor, shape: Sequence[int], block: Sequence[int]) -> torch.Tensor:
    """Turn a per-tile bool ``[nr, nc]`` into the per-weight bool mask of ``shape`` (edge tiles cropped)."""
    bh, bw = check_block(block)
    m = tile_keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return m[: int(shape[0]), : int(shape[1])].contiguous()


def remove_lowest(scores: torch.Tensor, sizes: Optional[torch.Tensor], n_remove: float) -> torch.Tensor:
    """Bool tensor (shape of ``scores``): the lowest-scoring entries whose ``sizes`` add up to at least
    ``n_remove`` (ties broken by position, so the result is deterministic).

    ``sizes=None`` means every entry counts 1.
    """
    flat = scores.flatten().double()
    removed = torch.zeros(flat.numel(), dtype=torch.bool)
    if n_remove <= 0 or flat.numel() == 0:
        return removed.view(scores.shape)
    if sizes is None:  # a selection instead of a full sort; ties go to the earlier positions
        k = min(int(math.ceil(n_remove - 1e-9)), flat.numel())
        thr = flat.kthvalue(k).values
        removed = flat < thr
        ties = torch.nonzero(flat == thr).flatten()
        removed[ties[: k - int(removed.sum())]] = True
        return removed.view(scores.shape)
    order = torch.argsort(flat, stable=True)
    cum = sizes.flatten().double()[order].cumsum(0)
    target = torch.tensor(float(n_remove) - 1e-9, dtype=torch.float64)
    k = min(int(torch.searchsorted(cum, target)) + 1, flat.numel())
    removed[order[:k]] = True
    return removed.view(scores.shape)


def threshold_masks(tile_score: Dict[str, torch.Tensor], shapes: Dict[str, Sequence[int]],
                    block: Sequence[int], n_remove: float) -> Dict[str, torch.Tensor]:
    """One threshold across several layers: remove the globally lowest tiles until ``n_remove``
    weights are gone. ``tile_score[name]`` comes from :func:`tile_scores` (scores must be comparable
    across the layers, e.g. LAMP or magnitude). Returns per-weight keep masks (True = keep)."""
    blk = check_block(block)
    names = list(tile_score)
    if not names:
        return {}
    cat_s = torch.cat([tile_score[n].flatten() for n in names])
    cat_z = None if blk == (1, 1) else torch.cat([tile_sizes(shapes[n], blk).flatten() for n in names])
    removed = remove_lowest(cat_s, cat_z, n_remove)
    out, off = {}, 0
    for n in names:
        k = tile_score[n].numel()
        rm = removed[off: off + k].view(tile_score[n].shape)
        off += k
        out[n] = expand_tiles(~rm, shapes[n], blk)
    return out


def per_layer_masks(tile_score: Dict[str, torch.Tensor], shapes: Dict[str, Sequence[int]],
                    block: Sequence[int], fraction: float) -> Dict[str, torch.Tensor]:
    """Every layer loses the same ``fraction`` of its weights (to within one tile)."""
    return {n: threshold_masks({n: s}, {n: shapes[n]}, block, fraction * _numel(shapes[n]))[n]
            for n, s in tile_score.items()}


def tile_mask(score: torch.Tensor, block: Sequence[int], sparsity: float, reduce: str = "mean") -> torch.Tensor:
    """Keep mask of one weight with ``sparsity`` of its entries removed in whole tiles."""
    ts = tile_scores(score, block, reduce)
    return threshold_masks({"w": ts}, {"w": score.shape}, block, sparsity * score.numel())["w"]


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring of every ``m`` consecutive entries along the last (input) dim.

    The input dim must be a multiple of ``m`` (the packed N:M format needs whole groups). Ties keep
    the earlier position.
    """
    n, m = check_nm((n, m))
    if score.dim() != 2:
        raise ValueError(f"score must be 2-D [out, in], got shape {tuple(score.shape)}")
    R, C = score.shape
    if C % m:
        raise ValueError(f"in_features={C} is not a multiple of m={m}: {n}:{m} masks need whole groups "
                         f"along the input dim; use block=(1, {m}) tiles for this layer instead.")
    g = score.detach().double().cpu().reshape(R, C // m, m)
    # stable descending order: sort by (-score, position)
    order = torch.argsort(-g, dim=-1, stable=True)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(R, C)


def is_tile_aligned(mask: torch.Tensor, block: Sequence[int]) -> bool:
    """True when every tile of ``mask`` is all kept or all removed (edge tiles included)."""
    blk = check_block(block)
    kept = tile_scores(mask.double(), blk, "sum")
    return bool(((kept == 0) | (kept == tile_sizes(mask.shape, blk))).all())


def lamp_of_tiles(energy: torch.Tensor) -> torch.Tensor:
    """LAMP over tiles whose energy (reduced squared weight, see :func:`tile_scores`) is ``energy``.

    Treats each tile as one "weight" of magnitude ``sqrt(energy)`` in LAMP's formula, so for 1x1
    tiles it is exactly the per-weight LAMP score of :func:`sparsevit.prune.criteria.lamp_scores`.
    """
    from sparsevit.prune.criteria import lamp_scores

    return lamp_scores(energy.clamp_min(0).sqrt()).double()


def _numel(shape: Sequence[int]) -> int:
    return int(shape[0]) * int(shape[1])


def shaped_masks(scores: Dict[str, torch.Tensor], *, n_remove: Optional[float] = None,
                 fraction: Optional[float] = None, block: Optional[Sequence[int]] = None,
                 nm: Optional[Sequence[int]] = None, reduce: str = "mean",
                 transform=None) -> Dict[str, torch.Tensor]:
    """Keep masks (True = keep) for several layers from their per-weight ``scores``.

    Exactly one pattern applies: ``nm=(n, m)`` (the pattern fixes the sparsity, so ``n_remove`` and
    ``fraction`` are ignored), else ``block`` tiles (``None`` = 1x1) removed either by one threshold
    across all layers until ``n_remove`` weights are gone, or ``fraction`` of every layer.
    ``transform(tile_scores) -> tile_scores`` runs per layer after the tile reduction (DIMAP and
    ``lamp`` use it to turn tile energies into LAMP scores, which makes layers comparable).
    """
    if nm is not None:
        if block is not None and tuple(check_block(block)) != (1, 1):
            raise ValueError("give either block=(bh, bw) tiles or nm=(n, m), not both.")
        n, m = check_nm(nm)
        return {k: nm_mask(s, n, m) for k, s in scores.items()}
    blk = check_block(block)
    tiles = {k: tile_scores(s, blk, reduce) for k, s in scores.items()}
    if transform is not None:
        tiles = {k: transform(t) for k, t in tiles.items()}
    shapes = {k: tuple(s.shape) for k, s in scores.items()}
    if (n_remove is None) == (fraction is None):
        raise ValueError("give exactly one of n_remove (one threshold across layers) or fraction (per layer).")
    if fraction is not None:
        return per_layer_masks(tiles, shapes, blk, fraction)
    return threshold_masks(tiles, shapes, blk, n_remove)
