"""Benchmark helpers shared by ``bench/latency.py``, ``sparsevit bench`` and the demo.

* side-by-side latency measurement (:func:`time_models`);
* synthetic plans of fixed shape (:data:`PRESETS`): latency does not depend on which units a method
  would pick, only on how many and of what kind.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Dict, List

import torch
from torch import nn

from sparsevit.models import get_adapter
from sparsevit.plan import BlockPlan, SparsityPlan


def time_models(models: Dict[str, nn.Module], x: torch.Tensor, warmup: int = 3, runs: int = 10
                ) -> Dict[str, List[float]]:
    """Seconds per forward for each model, measured alternately (so drift and noise from other
    processes hit every model alike), after ``warmup`` untimed rounds, under inference mode."""
    times: Dict[str, List[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for _ in range(runs):
            for k, m in models.items():
                if x.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
    return times


def median_ms(times: List[float]) -> float:
    """Median of :func:`time_models`' seconds, in milliseconds. (Timing one function is
    :func:`sparsevit.runtime.linear.median_ms`.)"""
    return 1e3 * statistics.median(times)


# ----------------------------------------------------------------------------- synthetic plans
def plan_heads_mlp(model, frac: float = 0.5) -> SparsityPlan:
    """Remove ``frac`` of the heads and of the MLP hidden channels in every block."""
    ad = get_adapter(model)
    plan = SparsityPlan.dense(model)
    for i, b in enumerate(ad.blocks):
        plan.blocks[i] = BlockPlan(heads=list(range(0, b.num_heads - int(b.num_heads * frac))),
                                   mlp_channels=list(range(0, b.hidden - int(b.hidden * frac))))
    return plan


def plan_residual_io(model, frac: float = 0.5, seed: int = 0) -> SparsityPlan:
    """P3B style: every attention and MLP branch reads ``frac`` of the residual channels and writes
    back into ``frac`` of them (different random subsets per branch)."""
    rng = random.Random(seed)
    ad = get_adapter(model)
    plan = SparsityPlan.dense(model)
    for i, b in enumerate(ad.blocks):
        k = int(b.dim * frac)
        pick = lambda: sorted(rng.sample(range(b.dim), k))  # noqa: E731
        plan.blocks[i] = BlockPlan(attn_in=pick(), attn_out=pick(), mlp_in=pick(), mlp_out=pick())
    return plan


def plan_residual_io_no_gather(model, frac: float = 0.5, seed: int = 0) -> SparsityPlan:
    """The same work as :func:`plan_residual_io` without the gather/scatter: every branch reads and
    writes a contiguous prefix of a residual stream that is itself sliced to ``frac``. Timing both
    isolates what the gather and scatter-add cost."""
    ad = get_adapter(model)
    plan = SparsityPlan.dense(model)
    k = int(ad.stage_dims[0] * frac)
    plan.residual_channels = [list(range(k))]
    return plan


def plan_block_sparse(model, sparsity: float = 0.7, block=(32, 32), seed: int = 0) -> SparsityPlan:
    """Unstructured part: random ``block``-aligned masks at ``sparsity`` in every qkv/proj/fc1/fc2."""
    g = torch.Generator().manual_seed(seed)
    plan = SparsityPlan.dense(model)
    for name, lin in get_adapter(model).linear_modules().items():
        out_f, in_f = lin.weight.shape
        nb = (-(-out_f // block[0]), -(-in_f // block[1]))
        keep = torch.rand(nb, generator=g) >= sparsity
        plan.masks[name] = keep.repeat_interleave(block[0], 0)[:out_f].repeat_interleave(block[1], 1)[:, :in_f]
    return plan


def plan_structured_then_block_sparse(model, frac=0.5, sparsity=0.7, block=(32, 32)) -> SparsityPlan:
    plan = plan_heads_mlp(model, frac)
    plan.masks = plan_block_sparse(model, sparsity, block).masks
    return plan


PRESETS = {
    "heads_mlp_50": plan_heads_mlp,
    "residual_io_50": plan_residual_io,
    "block_sparse_70_32x32": plan_block_sparse,
    "heads_mlp_50+block_sparse_70": plan_structured_then_block_sparse,
}
