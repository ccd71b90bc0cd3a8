"""Dependency groups: the structural units that must be removed together, and plans built from them.

A *unit* is one removable group of coupled parameter slices (DepGraph's "group"); units of the same
kind in the same layer form a *layer group* (``LayerGroup``), the scope of per-layer constraints
(keep at least one head, round kept counts to a multiple of 8, ...). Kinds:

=========  ===========  =================================================================================
kind       layer        coupled slices (the adapter's coupling table, ``sparsevit/models/coupling.py``)
=========  ===========  =================================================================================
head       block i      the q, k and v groups of every channel of head h, and the head's own group
                        (its rel-pos table column)
qk         block i      the q and k groups of channel c in every kept head; one channel list shared
                        by the heads (kept heads keep equal head dims)
v          block i      the v group of channel c in every kept head (v row, bias, proj column)
mlp        block i      the mlp group of hidden channel j (fc1 row and bias, fc2 column)
residual   stage s      ``adapter.residual_coupling(s)``: branch inputs/outputs, norms and layer scales
                        of the stage's blocks, embeddings, patch merging, the classifier's input column
=========  ===========  =================================================================================

:func:`coupled_slices` lists these slices by parameter name (used by tests and for inspection); the
adapter's ``apply_masks`` / ``accelerate`` remove exactly them when the plan drops the unit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sparsevit.plan import SparsityPlan

KINDS = ("head", "qk", "v", "mlp", "residual")
NORMALIZERS = ("mean", "max", "sum", "none")


@dataclass
class LayerGroup:
    kind: str
    layer: int  # block index (head/qk/v/mlp) or stage (residual)
    scores: torch.Tensor  # raw unit scores, [n]
    min_keep: int
    round_to: int = 1

    @property
    def n(self) -> int:
        return len(self.scores)


def normalize(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Make scores of different layers / kinds comparable for one global ranking.

    ``mean`` (default, as Torch-Pruning's default normaliser): divide by the layer group's mean, so
    every layer group's scores average 1 and the global ranking removes roughly the same fraction of
    every kind while still moving budget to the layers whose units differ most; ``max``: divide by the
    maximum; ``sum``: by the sum; ``none``: raw scores (Taylor/Hessian are loss-change estimates and
    are comparable as such, magnitudes are not).
    """
    s = scores.double()
    if how == "none":
        return s
    if how == "mean":
        d = s.mean()
    elif how == "max":
        d = s.max()
    elif how == "sum":
        d = s.sum()
    else:
        raise ValueError(f"unknown normalize='{how}'; choose one of {NORMALIZERS}")
    d = float(d) if s.numel() else 0.0
    return s / d if d > 0 else torch.zeros_like(s)


def layer_groups(adapter, scores, *, prune_heads: bool = True, prune_head_dims: bool = False,
                 prune_mlp: bool = True, prune_residual: bool = False, round_to: int = 1,
                 allow_empty: bool = False) -> List[LayerGroup]:
    """The layer groups to rank, with their scores (a :class:`criteria.UnitScores`) and constraints.

    Kinds that a block cannot lose (qk channels under qk-norm, heads/v under scale-norm, MLP channels
    under an MLP norm) are left out for that block.
    """
    groups: List[LayerGroup] = []
    r = max(1, int(round_to))
    for b, bs in zip(adapter.blocks, scores.blocks):
        if prune_heads and b.prunable("head"):
            groups.append(LayerGroup("head", b.index, bs.heads, 0 if allow_empty else 1))
        if prune_head_dims:
            if b.prunable("qk"):
                groups.append(LayerGroup("qk", b.index, _shared(bs.qk_shared, bs.qk), min(b.head_dim, r), r))
            if b.prunable("v"):
                groups.append(LayerGroup("v", b.index, _shared(bs.v_shared, bs.v), min(b.head_dim, r), r))
        if prune_mlp and b.prunable("mlp"):
            groups.append(LayerGroup("mlp", b.index, bs.mlp, 0 if allow_empty else min(b.hidden, r), r))
    if prune_residual:
        for s, sc in enumerate(scores.residual):
            groups.append(LayerGroup("residual", s, sc, min(len(sc), r), r))
    return groups


def _shared(shared: Optional[torch.Tensor], per_head: torch.Tensor) -> torch.Tensor:
    """Score of the shared head-dim channels (channel c of every head is one unit); scores built by
    hand without ``qk_shared`` / ``v_shared`` fall back to the sum over heads."""
    return shared if shared is not None else per_head.sum(0)


class GroupRanking:
    """All units of all layer groups in one global order (least important first).

    ``removed_counts(k)`` gives, per layer group, how many units go when the first ``k`` removable
    units of the order go (after rounding the kept count up to ``round_to``); ``plan(k)`` turns that
    into a :class:`SparsityPlan`. Everything is vectorised so a ViT-B plans in well under a second.
    """

    def __init__(self, adapter, groups: Sequence[LayerGroup], normalizer: str = "mean"):
        self.adapter = adapter
        self.groups = list(groups)
        self.sorted_idx: List[np.ndarray] = []  # per group: unit indices by ascending score
        lg_ids, keys = [], []
        for g_id, g in enumerate(self.groups):
            ns = normalize(g.scores, normalizer).numpy()
            order = np.argsort(ns, kind="stable")
            self.sorted_idx.append(order)
            removable = order[: max(0, g.n - g.min_keep)]
            lg_ids.append(np.full(len(removable), g_id))
            keys.append(ns[removable])
        lg = np.concatenate(lg_ids) if lg_ids else np.zeros(0, dtype=int)
        key = np.concatenate(keys) if keys else np.zeros(0)
        glob = np.argsort(key, kind="stable")
        self.order_lg = lg[glob]  # layer group of the k-th removable unit
        self.n_removable = len(self.order_lg)

    def removed_counts(self, k: int) -> np.ndarray:
        k = max(0, min(int(k), self.n_removable))
        rem = np.bincount(self.order_lg[:k], minlength=len(self.groups))
        out = np.zeros(len(self.groups), dtype=int)
        for g_id, g in enumerate(self.groups):
            keep = g.n - int(rem[g_id])
            if g.round_to > 1 and keep > 0:
                keep = min(g.n, int(math.ceil(keep / g.round_to)) * g.round_to)
            out[g_id] = g.n - max(keep, g.min_keep)
        return out

    def kept(self, k: int) -> List[np.ndarray]:
        counts = self.removed_counts(k)
        return [np.sort(order[c:]) for order, c in zip(self.sorted_idx, counts)]

    def plan(self, k: int) -> SparsityPlan:
        adapter = self.adapter
        plan = adapter.dense_plan()
        residual: List[Optional[List[int]]] = [None] * len(adapter.stage_dims)
        for g, keep in zip(self.groups, self.kept(k)):
            if len(keep) == g.n:
                continue
            idx = [int(i) for i in keep]
            if g.kind == "residual":
                residual[g.layer] = idx
                continue
            bp = plan.blocks[g.layer]
            field = {"head": "heads", "qk": "qk_channels", "v": "v_channels", "mlp": "mlp_channels"}[g.kind]
            setattr(bp, field, idx)
        for bp in plan.blocks:
            if bp.heads is not None and len(bp.heads) == 0:
                bp.qk_channels = bp.v_channels = None
                bp.drop_attn = True
            if bp.mlp_channels is not None and len(bp.mlp_channels) == 0:
                bp.drop_mlp = True
        if any(r is not None for r in residual):
            plan.residual_channels = residual
        return plan

    def channel_ratios(self, k: int) -> Dict[str, float]:
        """Kept fraction per kind (over all layer groups of that kind)."""
        counts = self.removed_counts(k)
        tot: Dict[str, List[int]] = {}
        for g, c in zip(self.groups, counts):
            t = tot.setdefault(g.kind, [0, 0])
            t[0] += g.n - int(c)
            t[1] += g.n
        return {kind: kept / max(n, 1) for kind, (kept, n) in tot.items()}


# ------------------------------------------------------------------------------------ inspection
def coupled_slices(adapter, kind: str, layer: int, index: int) -> List[Tuple[str, int, List[int]]]:
    """The parameter slices unit ``index`` of ``kind`` in ``layer`` couples, as (name, dim, indices).

    Names are the model's parameter names; ``dim`` is the tensor dim the indices run over (a norm's
    weight and bias: their last dim).
    """
    if kind == "residual":
        return _slices(adapter, [(adapter.residual_coupling(layer), [index])])
    if kind not in KINDS:
        raise ValueError(f"unknown unit kind '{kind}'; kinds are {KINDS}")
    b = adapter.blocks[layer]
    hd = b.head_dim
    if kind == "head":
        channels = list(range(index * hd, (index + 1) * hd))
        parts = [(b.coupling[k], channels) for k in ("q", "k", "v")] + [(b.coupling["head"], [index])]
    elif kind in ("qk", "v"):
        channels = [h * hd + index for h in range(b.num_heads)]
        parts = [(b.coupling[k], channels) for k in (("q", "k") if kind == "qk" else ("v",))]
    else:
        parts = [(b.coupling["mlp"], [index])]
    return _slices(adapter, parts)


def _slices(adapter, parts) -> List[Tuple[str, int, List[int]]]:
    names = {id(p): n for n, p in adapter.model.named_parameters()}
    out: List[Tuple[str, int, List[int]]] = []
    for entries, units in parts:
        for e in entries:
            positions = e.positions(torch.as_tensor(units, dtype=torch.long)).tolist()
            for t, dim in e.tensors():
                if id(t) in names:
                    out.append((names[id(t)], dim % t.dim(), positions))
    return out
