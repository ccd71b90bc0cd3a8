"""Unstructured (or tile-aligned) pruning of the blocks' Linear weights into ``plan.masks``.

``method="magnitude_unstructured"``: rank elementwise importances (or their sums over ``block``
tiles, the pattern block-sparse kernels exploit) globally or per layer and mask the lowest until the
fraction of prunable parameters is removed.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from sparsevit.errors import PlanError
from sparsevit.models import get_adapter
from sparsevit.plan import SparsityPlan
from sparsevit.prune import criteria as C
from sparsevit.prune import tiles as T
from sparsevit.prune.grouped import STRUCTURED_CRITERIA
from sparsevit.prune.registry import check_fraction, register_method

UNSTRUCTURED_CRITERIA = STRUCTURED_CRITERIA + ("lamp",)


@register_method("magnitude_unstructured", criteria=UNSTRUCTURED_CRITERIA, aliases=("unstructured",))
def unstructured(model, *, criterion: str = "l1", sparsity: Optional[float] = 0.5, data=None,
                 num_batches: Optional[int] = 8, loss_fn: Optional[Callable] = None, scope: str = "global",
                 block: Optional[Sequence[int]] = None, nm: Optional[Sequence[int]] = None, reduce: str = "mean",
                 layers: Optional[Sequence[str]] = None, seed: int = 0, taylor: str = "group_sq",
                 fisher: str = "per_sample", fisher_chunk: Optional[int] = None, micro_batches: int = 4,
                 progress: bool = True) -> SparsityPlan:
    """Unstructured (or block-aligned) pruning of the blocks' Linear weights into ``plan.masks``.

    Args:
        criterion: ``l1``, ``l2``, ``lamp`` (layer-adaptive magnitude: global ranking of LAMP scores),
            ``taylor``, ``hessian``, ``random`` (elementwise; ``taylor`` / ``fisher`` / ``fisher_chunk``
            pick the estimator, see :func:`sparsevit.prune.criteria.weight_importance`).
        sparsity: fraction of prunable (block) parameters to remove; only Linear weights are masked, so
            it must stay below their share of the prunable parameters.
        scope: ``global`` (one ranking over all layers) or ``layer`` (the same fraction per layer).
        block: e.g. ``(32, 32)``, ``(1, 8)``: score and remove whole tiles, the pattern the
            block-sparse and fine-grained kernels exploit (see :mod:`sparsevit.prune.tiles`).
        nm: e.g. ``(2, 4)``: keep the ``n`` best of every ``m`` consecutive input weights (the pattern
            fixes the sparsity of the masked Linears; ``sparsity`` is then ignored).
        reduce: how a tile's score aggregates its weights' scores: ``mean`` (default), ``sum``, ``max``.
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
    prunable = adapter.count(adapter.dense_plan())["total"]["prunable_before"]
    n_remove = sparsity * prunable
    maskable = sum(lin.weight.numel() for lin in linears.values())
    if n_remove > maskable:
        raise PlanError(f"sparsity={sparsity} needs {int(n_remove):,} weights removed but the maskable Linear "
                        f"weights are {maskable:,} ({maskable / prunable:.3f} of the prunable parameters); "
                        "lower sparsity or use method='grouped'.")
    imp = C.weight_importance(model, "l2" if crit == "lamp" else crit, data, num_batches=num_batches,
                              loss_fn=loss_fn, seed=seed, taylor=taylor, fisher=fisher, fisher_chunk=fisher_chunk,
                              micro_batches=micro_batches, progress=progress)
    names = {id(p): n for n, p in model.named_parameters()}
    scores = {n: imp[names[id(lin.weight)]].cpu() for n, lin in linears.items()}
    how = {"n_remove": n_remove} if scope == "global" else {"fraction": n_remove / maskable}
    keep = T.shaped_masks(scores, block=block, nm=nm, reduce=reduce,
                          transform=T.lamp_of_tiles if crit == "lamp" else None, **how)
    plan = adapter.dense_plan()
    if nm is not None:
        plan.nm = [int(v) for v in nm]
    else:
        plan.block = list(T.check_block(block))
    plan.masks = {name: k for name, k in keep.items() if not bool(k.all())}
    stats = adapter.count(plan)
    plan.meta = {"method": "magnitude_unstructured", "criterion": crit, "sparsity": sparsity,
                 "target": {"sparsity": sparsity}, "scope": scope, "block": plan.block,
                 "nm": plan.nm, "reduce": reduce, "stats": stats}
    return plan


def _selected_linears(adapter, layers: Optional[Sequence[str]]):
    linears = adapter.linear_modules()
    if layers is None:
        return linears
    unknown = set(layers) - set(linears)
    if unknown:
        raise ValueError(f"layers {sorted(unknown)[:3]} are not block Linears; e.g. {next(iter(linears))}")
    return {k: v for k, v in linears.items() if k in set(layers)}
