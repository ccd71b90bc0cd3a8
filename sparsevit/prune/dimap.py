"""DIMAP: Data-independent Module-Aware Pruning (He & Zhou, ICLR 2024), one shot and data-free.

``method="dimap"`` masks the weights of the blocks' Linears, grouped into three *modules* that span
every block and every stage: QKV-M (all ``qkv``), PRJ-M (all ``proj``) and MLP-M (all ``fc1`` and
``fc2``). Patch embedding, patch merging, norms, biases and the classifier are never pruned.

- Score: the LAMP score of each weight inside its own layer (``criteria.lamp_scores``), which makes
  layers of different scale comparable; within a module one threshold is applied to the LAMP scores
  of all its layers, so a module's budget flows to the layers where it hurts least.
- Split of the global target (not published; the choice made here): ``sparsity`` is the fraction of
  the prunable (block) parameters removed, as everywhere in sparsevit. With ``scope="module"``
  (default) every module loses the same fraction of its weights,
  ``n_remove * W_module / W_all_modules``: the modules play different roles (attention logits,
  the attention output, the MLP) and the paper's point is that their scores are not comparable,
  so none of them is allowed to absorb the others' budget. ``scope="model"`` treats the whole model
  as one module (one LAMP threshold over all layers), the ablation of the paper.
- Kernel-shaped variants: ``block=(bh, bw)`` scores whole tiles (LAMP over the tiles' mean squared
  weight, so a partial edge tile is judged per weight like a full one; ``reduce="max"``/``"sum"``
  change the tile energy) and removes them whole; ``nm=(n, m)`` keeps the n largest of every m
  input weights (inside one layer LAMP orders weights like magnitude, so this is magnitude N:M; the
  pattern fixes the sparsity at 1 - n/m of the Linear weights and ``sparsity`` is then ignored).

The paper fine-tunes afterwards (AdamW, cosine, base lr 2e-5): ``sparsevit.finetune(model, plan, data)``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from sparsevit.errors import PlanError
from sparsevit.models import get_adapter
from sparsevit.plan import BlockPlan, SparsityPlan
from sparsevit.prune import tiles
from sparsevit.prune.registry import register_method

MODULES = {"qkv": ("qkv",), "proj": ("proj",), "mlp": ("fc1", "fc2")}
MODULE_NAMES = {"qkv": "QKV-M", "proj": "PRJ-M", "mlp": "MLP-M"}


def module_layers(adapter) -> Dict[str, Dict[str, torch.nn.Linear]]:
    """The Linears of each DIMAP module across all blocks and stages: ``{"qkv": {fqn: Linear}, ...}``."""
    out = {k: {} for k in MODULES}
    for b in adapter.blocks:
        names = b.linear_names()
        for module, roles in MODULES.items():
            for role in roles:
                out[module][names[role]] = getattr(b, role)
    return out


def removal_budget(adapter, sparsity: float, maskable: int) -> float:
    """Weights to remove so that ``sparsity`` of the prunable (block) parameters goes."""
    prunable = adapter.count(SparsityPlan.dense(adapter.model))["total"]["prunable_before"]
    n_remove = sparsity * prunable
    if n_remove > maskable:
        raise PlanError(f"sparsity={sparsity} needs {int(n_remove):,} weights removed but the maskable Linear "
                        f"weights are {maskable:,} ({maskable / prunable:.3f} of the prunable parameters); "
                        "lower sparsity.")
    return n_remove


def _check_sparsity(sparsity) -> float:
    if sparsity is None:
        raise ValueError("dimap needs sparsity=<fraction of the prunable parameters to remove>, e.g. 0.5.")
    s = float(sparsity)
    if not (0.0 <= s < 1.0):
        raise ValueError(f"sparsity={sparsity} must be in [0, 1).")
    return s


@register_method("dimap", criteria=None, aliases=("module_aware",))
def dimap(model, *, criterion: str = "lamp", sparsity: Optional[float] = 0.5, data=None,
          scope: str = "module", block: Optional[Sequence[int]] = None, nm: Optional[Sequence[int]] = None,
          reduce: str = "mean", **_ignored) -> SparsityPlan:
    """DIMAP (data-free, module-aware LAMP): per-module thresholds over QKV-M, PRJ-M and MLP-M.

    Args:
        sparsity: fraction of the prunable (block) parameters to remove; every module loses the same
            fraction of its weights (``scope="module"``) or one threshold covers all layers
            (``scope="model"``).
        block: tile shape ``(bh, bw)`` removed whole (``None``/``(1, 1)``: unstructured).
        nm: ``(n, m)`` N:M along the input dim instead (fixes the sparsity; ``sparsity`` is ignored).
        reduce: tile energy, ``mean`` (default) / ``sum`` / ``max`` of the squared weights.
    ``data`` is not used (data-free); ``criterion`` is ignored (DIMAP always scores with LAMP; the
    plan's ``meta["criterion"]`` says so). The model is not modified. ``plan.meta["modules"]`` holds each
    module's achieved weight sparsity.
    """
    if scope not in ("module", "model"):
        raise ValueError(f"scope must be 'module' (one threshold per module) or 'model' (one for all), got {scope!r}")
    blk = tiles.check_block(block)
    nm_t = tiles.check_nm(nm)
    adapter = get_adapter(model)
    modules = module_layers(adapter)
    weights = {k: {n: lin.weight.detach().float().cpu() for n, lin in layers.items()} for k, layers in modules.items()}
    maskable = sum(w.numel() for layers in weights.values() for w in layers.values())
    s = None if nm_t is not None else _check_sparsity(sparsity)
    n_remove = None if nm_t is not None else removal_budget(adapter, s, maskable)
    energy = {k: {n: w.square() for n, w in layers.items()} for k, layers in weights.items()}
    kw = dict(block=None if nm_t else blk, nm=nm_t, reduce=reduce, transform=tiles.lamp_of_tiles)
    masks: Dict[str, torch.Tensor] = {}
    if scope == "model":
        flat = {n: e for layers in energy.values() for n, e in layers.items()}
        masks.update(tiles.shaped_masks(flat, n_remove=n_remove, **kw))
    else:
        for k, layers in energy.items():
            share = None if n_remove is None else n_remove * sum(e.numel() for e in layers.values()) / maskable
            masks.update(tiles.shaped_masks(layers, n_remove=share, **kw))
    plan = SparsityPlan(family=adapter.family, blocks=[BlockPlan() for _ in adapter.blocks],
                        masks={n: m for n, m in masks.items() if not bool(m.all())},
                        block=list(blk) if nm_t is None else None, nm=list(nm_t) if nm_t else None,
                        signature=adapter.signature())
    stats = adapter.count(plan)
    achieved = {MODULE_NAMES[k]: round(1 - sum(float(masks[n].sum()) for n in layers) /
                                       sum(w.numel() for w in layers.values()), 6)
                for k, layers in weights.items()}
    plan.meta = {"method": "dimap", "criterion": "lamp", "sparsity": round(stats["total"]["prunable_removed"], 6),
                 "target": {"sparsity": s} if s is not None else {"nm": list(nm_t)}, "scope": scope,
                 "reduce": reduce, "modules": achieved, "stats": stats}
    return plan
