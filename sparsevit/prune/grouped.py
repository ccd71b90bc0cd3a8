"""Grouped structural global pruning (DepGraph style; Riaz & Smeaton 2025) and unstructured pruning.

``method="grouped"``: score every dependency group (head, head-dim channel, MLP channel, residual
channel; see :mod:`sparsevit.prune.groups`) with one criterion, normalise per layer group, rank all
units of all layers globally and remove the least important until the target is met.

Choices a careful reimplementer has to make (the paper's text is not public):

- Normalisation: scores are divided by the mean of their layer group (``normalize="mean"``, the
  default of Torch-Pruning). Raw magnitudes of different layers and kinds are not comparable (a head
  couples 4*dim*head_dim weights, an MLP channel 2*dim); after normalisation each layer group averages
  1, so the global order removes about the same fraction of every kind and moves budget towards layers
  whose units are unequal. ``normalize="none"`` ranks raw Taylor/Hessian loss estimates instead.
- Target: ``sparsity`` is the fraction of prunable (block) parameters removed, measured by the
  adapter's exact count of what ``accelerate`` keeps; ``macs`` (fraction of MACs removed) may be given
  instead. The smallest prefix of the global order that meets the target is found by bisection, so the
  result overshoots by at most one unit (plus rounding).
- Constraints: every layer keeps at least one head and ``round_to`` channels unless
  ``allow_empty=True``; kept channel counts (MLP, head dims, residual) are rounded *up* to a multiple
  of ``round_to``; head-dim channels are shared by the heads of a layer (equal head dims per layer).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence, Tuple

import torch

from sparsevit.errors import PlanError
from sparsevit.models import get_adapter
from sparsevit.plan import BlockPlan, SparsityPlan
from sparsevit.prune import criteria as C
from sparsevit.prune.groups import GroupRanking, layer_groups
from sparsevit.prune.registry import register_method

STRUCTURED_CRITERIA = ("l1", "l2", "magnitude", "taylor", "hessian", "obd", "fisher", "random")
UNSTRUCTURED_CRITERIA = STRUCTURED_CRITERIA + ("lamp",)


def _check_target(value, name: str) -> float:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= v < 1.0) or math.isnan(v):
        raise ValueError(f"{name}={value} is impossible: it is the fraction removed and must be in [0, 1) "
                         f"(e.g. {name}=0.5 removes half).")
    return v


@register_method("grouped", criteria=STRUCTURED_CRITERIA, aliases=("depgraph", "structured"))
def grouped(model, *, criterion: str = "taylor", sparsity: Optional[float] = 0.5, data=None,
            num_batches: Optional[int] = 8, loss_fn: Optional[Callable] = None, macs: Optional[float] = None,
            prune_heads: bool = True, prune_head_dims: bool = False, prune_mlp: bool = True,
            prune_residual: bool = False, round_to: int = 1, allow_empty: bool = False,
            normalize: str = "mean", seed: int = 0, micro_batches: int = 4, scores=None,
            progress: bool = True) -> SparsityPlan:
    """Grouped structural global pruning: heads / head dims / MLP channels / residual channels.

    Args:
        criterion: ``l1``, ``l2`` (= ``magnitude``), ``taylor``, ``hessian``, ``random``.
        sparsity: fraction of prunable (block) parameters to remove.
        macs: fraction of MACs to remove instead (takes precedence over ``sparsity``).
        prune_heads / prune_head_dims / prune_mlp / prune_residual: which dependency groups to rank.
        round_to: kept MLP / head-dim / residual channel counts become multiples of this.
        allow_empty: allow a layer to lose all its heads or MLP channels (the branch is dropped).
        normalize: per layer group score normaliser, ``mean`` | ``max`` | ``sum`` | ``none``.
        scores: precomputed :class:`criteria.UnitScores` (reuses gradients across targets).
    Returns a :class:`SparsityPlan` whose ``meta`` holds method, criterion, target, kept fraction per
    kind (``channel_ratios``) and ``stats`` (exact parameter/MAC counts).
    """
    t0 = time.perf_counter()
    crit = C.canonical(criterion)
    sparsity = _check_target(sparsity, "sparsity")
    macs = _check_target(macs, "macs")
    if sparsity is None and macs is None:
        raise ValueError("give a target: sparsity=<fraction of prunable params> or macs=<fraction of MACs>.")
    adapter = get_adapter(model)
    if scores is None:
        scores = C.unit_scores(model, crit, data, num_batches=num_batches, loss_fn=loss_fn, seed=seed,
                               micro_batches=micro_batches, progress=progress)
    t_scores = time.perf_counter() - t0
    groups = layer_groups(adapter, scores, prune_heads=prune_heads, prune_head_dims=prune_head_dims,
                          prune_mlp=prune_mlp, prune_residual=prune_residual, round_to=round_to,
                          allow_empty=allow_empty)
    if not groups:
        raise ValueError("nothing to prune: enable at least one of prune_heads, prune_head_dims, prune_mlp, "
                         "prune_residual.")
    ranking = GroupRanking(adapter, groups, normalize)
    key, target = ("macs", macs) if macs is not None else ("sparsity", sparsity)

    def achieved(k: int) -> Tuple[float, dict, SparsityPlan]:
        plan = ranking.plan(k)
        tot = adapter.count(plan)["total"]
        val = tot["prunable_removed"] if key == "sparsity" else 1 - tot["macs_after"] / tot["macs_before"]
        return val, tot, plan

    hi = ranking.n_removable
    best, _, _ = achieved(hi)
    if best < target - 1e-12:
        raise PlanError(f"target {key}={target} cannot be met under these constraints: removing every "
                        f"removable unit reaches {best:.4f}. Enable prune_residual=True / prune_head_dims=True, "
                        "set allow_empty=True, or lower round_to.")
    lo = 0  # invariant: achieved(hi) >= target; find the smallest such k
    if achieved(0)[0] >= target:
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if achieved(mid)[0] >= target:
            hi = mid
        else:
            lo = mid
    _, _, plan = achieved(hi)
    stats = adapter.count(plan)
    plan.meta = {
        "method": "grouped", "criterion": crit, "sparsity": sparsity if macs is None else round(
            stats["total"]["prunable_removed"], 6), "target": {key: target},
        "options": {"prune_heads": prune_heads, "prune_head_dims": prune_head_dims, "prune_mlp": prune_mlp,
                    "prune_residual": prune_residual, "round_to": round_to, "allow_empty": allow_empty,
                    "normalize": normalize, "num_batches": num_batches if C.needs_data(crit) else None},
        "channel_ratios": ranking.channel_ratios(hi),
        "units_removed": int(hi),
        "time_s": {"scores": round(t_scores, 3), "plan": round(time.perf_counter() - t0 - t_scores, 3)},
        "stats": stats,
    }
    return plan


# ------------------------------------------------------------------------------------ unstructured
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
    sparsity = _check_target(sparsity, "sparsity")
    if sparsity is None:
        raise ValueError("unstructured pruning needs sparsity=<fraction of prunable params>.")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    adapter = get_adapter(model)
    linears = adapter.linear_modules()
    if layers is not None:
        unknown = set(layers) - set(linears)
        if unknown:
            raise ValueError(f"layers {sorted(unknown)[:3]} are not block Linears; e.g. {next(iter(linears))}")
        linears = {k: v for k, v in linears.items() if k in set(layers)}
    blk = tuple(int(b) for b in block) if block is not None else (1, 1)
    base_crit = "l2" if crit == "lamp" else crit
    imp = C.weight_importance(model, base_crit, data, num_batches=num_batches, loss_fn=loss_fn, seed=seed,
                              micro_batches=micro_batches, progress=progress)
    names = {id(p): n for n, p in model.named_parameters()}
    dense = SparsityPlan(family=adapter.family, blocks=[BlockPlan() for _ in adapter.blocks],
                         signature=adapter.signature())
    prunable = adapter.count(dense)["total"]["prunable_before"]
    n_remove = sparsity * prunable
    maskable = sum(lin.weight.numel() for lin in linears.values())
    if n_remove > maskable:
        raise PlanError(f"sparsity={sparsity} needs {int(n_remove):,} weights removed but the maskable Linear "
                        f"weights are {maskable:,} ({maskable / prunable:.3f} of the prunable parameters); "
                        "lower sparsity or use method='grouped'.")
    scores, sizes = {}, {}
    for name, lin in linears.items():
        e = imp[names[id(lin.weight)]].cpu()
        s = _block_sum(e, blk) if blk != (1, 1) else e
        if crit == "lamp":
            s = C.lamp_scores(s.sqrt())  # LAMP on the tile L2 norms (w^2 summed per tile)
        scores[name], sizes[name] = s, _block_sizes(e.shape, blk) if blk != (1, 1) else None
    masks = {}
    if scope == "global":
        cat_s = torch.cat([s.flatten() for s in scores.values()])
        cat_z = torch.cat([z.flatten() for z in sizes.values()]) if blk != (1, 1) else None
        removed = _remove_lowest(cat_s, cat_z, n_remove)
        off = 0
        for name, s in scores.items():
            masks[name] = removed[off: off + s.numel()].view_as(s)
            off += s.numel()
    else:
        frac = n_remove / maskable
        for name, s in scores.items():
            masks[name] = _remove_lowest(s, sizes[name], frac * s.numel() if sizes[name] is None
                                         else frac * float(sizes[name].sum()))
    plan = SparsityPlan(family=adapter.family, blocks=[BlockPlan() for _ in adapter.blocks],
                        block=list(blk), signature=adapter.signature())
    for name, rm in masks.items():
        shape = linears[name].weight.shape
        keep = ~(_expand(rm, shape, blk) if blk != (1, 1) else rm)
        if not bool(keep.all()):
            plan.masks[name] = keep
    stats = adapter.count(plan)
    plan.meta = {"method": "magnitude_unstructured", "criterion": crit, "sparsity": sparsity,
                 "target": {"sparsity": sparsity}, "scope": scope, "block": list(blk), "stats": stats}
    return plan
