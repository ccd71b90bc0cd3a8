"""Grouped structural global pruning (DepGraph style; Riaz & Smeaton 2025).

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

import time
from typing import Callable, Optional

from sparsevit.errors import PlanError
from sparsevit.models import get_adapter
from sparsevit.plan import SparsityPlan
from sparsevit.prune import criteria as C
from sparsevit.prune.groups import GroupRanking, layer_groups
from sparsevit.prune.registry import check_fraction, register_method

STRUCTURED_CRITERIA = ("l1", "l2", "magnitude", "taylor", "hessian", "obd", "fisher", "random")


def _smallest_prefix(achieved: Callable[[int], float], n: int, target: float, key: str) -> int:
    """The smallest k in [0, n] with ``achieved(k) >= target`` (``achieved`` grows with k), by bisection."""
    best = achieved(n)
    if best < target - 1e-12:
        raise PlanError(f"target {key}={target} cannot be met under these constraints: removing every "
                        f"removable unit reaches {best:.4f}. Enable prune_residual=True / prune_head_dims=True, "
                        "set allow_empty=True, or lower round_to.")
    if achieved(0) >= target:
        return 0
    lo, hi = 0, n  # invariant: achieved(hi) >= target > achieved(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if achieved(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


@register_method("grouped", criteria=STRUCTURED_CRITERIA, aliases=("depgraph", "structured"))
def grouped(model, *, criterion: str = "taylor", sparsity: Optional[float] = 0.5, data=None,
            num_batches: Optional[int] = 8, loss_fn: Optional[Callable] = None, macs: Optional[float] = None,
            prune_heads: bool = True, prune_head_dims: bool = False, prune_mlp: bool = True,
            prune_residual: bool = False, round_to: int = 1, allow_empty: bool = False,
            normalize: str = "mean", seed: int = 0, taylor: str = "group_sq", fisher: str = "per_sample",
            fisher_chunk: Optional[int] = None, micro_batches: int = 4, scores=None,
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
        taylor: Taylor estimator, ``group_sq`` (default; Molchanov et al. 2019) | ``weight_sq`` | ``abs``.
        fisher: Hessian's Fisher estimate, ``per_sample`` (default, exact) | ``microbatch`` (cheap,
            biased; ``micro_batches`` chunks per batch); ``fisher_chunk`` bounds per-sample gradients
            held at once. See :mod:`sparsevit.prune.criteria`.
        scores: precomputed :class:`criteria.UnitScores` (reuses gradients across targets).
    Returns a :class:`SparsityPlan` whose ``meta`` holds method, criterion, target, kept fraction per
    kind (``channel_ratios``) and ``stats`` (exact parameter/MAC counts).
    """
    t0 = time.perf_counter()
    crit = C.canonical(criterion)
    sparsity = check_fraction(sparsity, "sparsity")
    macs = check_fraction(macs, "macs")
    if sparsity is None and macs is None:
        raise ValueError("give a target: sparsity=<fraction of prunable params> or macs=<fraction of MACs>.")
    adapter = get_adapter(model)
    if scores is None:
        scores = C.unit_scores(model, crit, data, num_batches=num_batches, loss_fn=loss_fn, seed=seed,
                               taylor=taylor, fisher=fisher, fisher_chunk=fisher_chunk,
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

    def achieved(k: int) -> float:
        tot = adapter.count(ranking.plan(k))["total"]
        return tot["prunable_removed"] if key == "sparsity" else 1 - tot["macs_after"] / tot["macs_before"]

    hi = _smallest_prefix(achieved, ranking.n_removable, target, key)
    plan = ranking.plan(hi)
    stats = adapter.count(plan)
    plan.meta = {
        "method": "grouped", "criterion": crit, "sparsity": sparsity if macs is None else round(
            stats["total"]["prunable_removed"], 6), "target": {key: target},
        "options": {"prune_heads": prune_heads, "prune_head_dims": prune_head_dims, "prune_mlp": prune_mlp,
                    "prune_residual": prune_residual, "round_to": round_to, "allow_empty": allow_empty,
                    "normalize": normalize, "num_batches": num_batches if C.needs_data(crit) else None},
        "estimator": dict(scores.meta),
        "channel_ratios": ranking.channel_ratios(hi),
        "units_removed": int(hi),
        "time_s": {"scores": round(t_scores, 3), "plan": round(time.perf_counter() - t0 - t_scores, 3)},
        "stats": stats,
    }
    return plan
