"""Unstructured (or tile-aligned) pruning of the blocks' Linear weights into ``plan.masks``.

``method="magnitude_unstructured"``: rank elementwise importances (or their sums over ``block``
tiles, the pattern block-sparse kernels exploit) globally or per layer and mask the lowest until the
fraction of prunable parameters is removed.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from sparsevit.errors import PlanError
from sparsevit.models import get_adapter
from sparsevit.plan import SparsityPlan
from sparsevit.prune import criteria as C
from sparsevit.prune.grouped import STRUCTURED_CRITERIA
from sparsevit.prune.registry import check_fraction, register_method

UNSTRUCTURED_CRITERIA = STRUCTURED_CRITERIA + ("lamp",)


def _block_sum(e: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    br, bc = block
    R, Cc = e.shape
    pr, pc = (-R) % br, (-Cc) % bc
    e = torch.nn.functional.pad(e, (0, pc, 0, pr))
    return e.view((R + pr) // br, br, (Cc + pc) // bc, bc).sum(dim=(1, 3))


def _block_sizes(shape, block) -> torch.Tensor:
    return _block_sum(torch.ones(shape), block)


def _expand(mask_blocks: torch.Tensor, shape, block) -> torch.Tensor:
    br, bc = block
    m = mask_blocks.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return m[: shape[0], : shape[1]].contiguous()


def _remove_lowest(scores: torch.Tensor, sizes: torch.Tensor, n_remove: float) -> torch.Tensor:
    """Bool mask of the lowest-scoring entries whose sizes add up to at least ``n_remove``.

    ``sizes=None`` means every entry has size 1: a selection (``kthvalue``) instead of a full sort,
    so a ViT-B's 85M weights are ranked in about a second.
    """
    if sizes is None:
        flat = scores.flatten().float()
        k = min(int(math.ceil(n_remove - 1e-9)), flat.numel()) if n_remove > 0 else 0
        removed = torch.zeros(flat.numel(), dtype=torch.bool)
        if k > 0:
            thr = flat.kthvalue(k).values
            removed = flat < thr
            ties = torch.nonzero(flat == thr).flatten()
            removed[ties[: k - int(removed.sum())]] = True
        return removed.view_as(scores)
    flat, sz = scores.flatten().double(), sizes.flatten().double()
    order = torch.argsort(flat, stable=True)
    cum = sz[order].cumsum(0)
    if n_remove <= 0:
        k = 0
    else:  # smallest k with cum[k-1] >= n_remove
        k = min(int(torch.searchsorted(cum, torch.tensor(float(n_remove) - 1e-9, dtype=torch.float64))) + 1,
                len(cum))
    removed = torch.zeros(len(flat), dtype=torch.bool)
    removed[order[:k]] = True
    return removed.view_as(scores)


@register_method("magnitude_unstructured", criteria=UNSTRUCTURED_CRITERIA, aliases=("unstructured",))
def unstructured(model, *, criterion: str = "l1", sparsity: Optional[float] = 0.5, data=None,
                 num_batches: Optional[int] = 8, loss_fn: Optional[Callable] = None, scope: str = "global",
                 block: Optional[Sequence[int]] = None, layers: Optional[Sequence[str]] = None, seed: int = 0,
                 micro_batches: int = 4, progress: bool = True, **_ignored) -> SparsityPlan:
    """Unstructured (or block-aligned) pruning of the blocks' Linear weights into ``plan.masks``.

    Args:
        criterion: ``l1``, ``l2``, ``lamp`` (layer-adaptive magnitude: global ranking of LAMP scores),
            ``taylor``, ``hessian``, ``random`` (elementwise).
        sparsity: fraction of prunable (block) parameters to remove; only Linear weights are masked, so
            it must stay below their share of the prunable parameters.
        scope: ``global`` (one ranking over all layers) or ``layer`` (the same fraction per layer).
        block: e.g. ``(32, 32)``: score and remove whole tiles (sum of the elementwise scores; LAMP on
            tile sums), the pattern block-sparse kernels exploit.
        layers: restrict to these Linear fqns (default: every qkv/proj/fc1/fc2 of the blocks).
    """
    crit = C.canonical(criterion)
    sparsity = check_fraction(sparsity, "sparsity")
    if sparsity is None:
        raise ValueError("unstructured pruning needs sparsity=<fraction of prunable params>.")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    adapter = get_adapter(model)
    linears = _selected_linears(adapter, layers)
    blk = tuple(int(b) for b in block) if block is not None else (1, 1)
    prunable = adapter.count(adapter.dense_plan())["total"]["prunable_before"]
    n_remove = sparsity * prunable
    maskable = sum(lin.weight.numel() for lin in linears.values())
    if n_remove > maskable:
        raise PlanError(f"sparsity={sparsity} needs {int(n_remove):,} weights removed but the maskable Linear "
                        f"weights are {maskable:,} ({maskable / prunable:.3f} of the prunable parameters); "
                        "lower sparsity or use method='grouped'.")
    imp = C.weight_importance(model, "l2" if crit == "lamp" else crit, data, num_batches=num_batches,
                              loss_fn=loss_fn, seed=seed, micro_batches=micro_batches, progress=progress)
    names = {id(p): n for n, p in model.named_parameters()}
    scores, sizes = _tile_scores({n: imp[names[id(lin.weight)]].cpu() for n, lin in linears.items()}, blk,
                                 lamp=crit == "lamp")
    removed = _removed_tiles(scores, sizes, n_remove, n_remove / maskable, scope)
    plan = adapter.dense_plan()
    plan.block = list(blk)
    for name, rm in removed.items():
        shape = linears[name].weight.shape
        keep = ~(_expand(rm, shape, blk) if blk != (1, 1) else rm)
        if not bool(keep.all()):
            plan.masks[name] = keep
    stats = adapter.count(plan)
    plan.meta = {"method": "magnitude_unstructured", "criterion": crit, "sparsity": sparsity,
                 "target": {"sparsity": sparsity}, "scope": scope, "block": list(blk), "stats": stats}
    return plan


def _selected_linears(adapter, layers: Optional[Sequence[str]]):
    linears = adapter.linear_modules()
    if layers is None:
        return linears
    unknown = set(layers) - set(linears)
    if unknown:
        raise ValueError(f"layers {sorted(unknown)[:3]} are not block Linears; e.g. {next(iter(linears))}")
    return {k: v for k, v in linears.items() if k in set(layers)}


def _tile_scores(importance: Dict[str, torch.Tensor], blk: Tuple[int, int], lamp: bool):
    """Per Linear, the score of every tile (``blk``; (1, 1): every weight) and the tile sizes
    (None for single weights)."""
    scores, sizes = {}, {}
    for name, e in importance.items():
        s = _block_sum(e, blk) if blk != (1, 1) else e
        if lamp:
            s = C.lamp_scores(s.sqrt())  # LAMP on the tile L2 norms (w^2 summed per tile)
        scores[name], sizes[name] = s, _block_sizes(e.shape, blk) if blk != (1, 1) else None
    return scores, sizes


def _removed_tiles(scores, sizes, n_remove: float, fraction: float, scope: str) -> Dict[str, torch.Tensor]:
    """Per Linear, the bool map of removed tiles: the lowest globally, or ``fraction`` per layer."""
    masks = {}
    if scope == "global":
        tiled = any(z is not None for z in sizes.values())
        cat_s = torch.cat([s.flatten() for s in scores.values()])
        cat_z = torch.cat([z.flatten() for z in sizes.values()]) if tiled else None
        removed = _remove_lowest(cat_s, cat_z, n_remove)
        off = 0
        for name, s in scores.items():
            masks[name] = removed[off: off + s.numel()].view_as(s)
            off += s.numel()
        return masks
    for name, s in scores.items():
        masks[name] = _remove_lowest(s, sizes[name], fraction * s.numel() if sizes[name] is None
                                     else fraction * float(sizes[name].sum()))
    return masks
