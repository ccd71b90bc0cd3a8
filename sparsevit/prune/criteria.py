"""Importance criteria: how much each weight, and each structural unit, matters.

Two levels:

1. :func:`weight_importance` gives an *elementwise* importance per parameter (same shape):
   ``l1`` |w|, ``l2`` w^2 (the unit score is the square root of the sum, i.e. the L2 norm of the
   coupled weights), ``taylor`` |w * g| with g the gradient averaged over ``num_batches`` batches
   (first-order Taylor estimate of the loss change when w is zeroed), ``hessian`` w^2 * E[g^2]
   (OBD with the diagonal empirical Fisher as the Hessian estimate; E runs over micro-batches),
   ``lamp`` (per layer: score_j = w_j^2 / sum_{i<=j} w_i^2 over |w| sorted descending; for
   unstructured pruning), ``random`` (seeded).
2. :func:`unit_scores` sums the elementwise importance over every weight coupled to a structural unit
   (exactly the slices a structured removal deletes: the adapter's coupling table,
   ``sparsevit/models/coupling.py``):

   - head-dim channel (h, c): q/k channel = its ``q`` group + its ``k`` group; v channel = its ``v``
     group (which includes the ``proj`` column that reads it);
   - head h: its q/k and v channels plus its ``head`` group (the rel-pos table column);
   - MLP channel j: its ``mlp`` group; residual channel c of stage s: ``adapter.residual_coupling(s)``;
   - branch: every parameter of a block's attention or MLP branch (``BlockInfo.branch_parameters``).

Gradient criteria run on a deep copy of the model in eval mode (dropout / drop-path off, so scores are
deterministic); the user's model, its mode and its ``.grad`` fields are never touched.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from sparsevit.models import get_adapter
from sparsevit.prune.batches import default_loss as _default_loss
from sparsevit.prune.batches import iter_batches as _batches
from sparsevit.prune.batches import model_device as _device_of

#: criterion name -> needs data (gradients)
CRITERIA = {"l1": False, "l2": False, "magnitude": False, "taylor": True, "hessian": True,
            "lamp": False, "random": False}
ALIASES = {"magnitude": "l2", "obd": "hessian", "fisher": "hessian", "first_order": "taylor"}
GRADIENT_CRITERIA = ("taylor", "hessian")


def canonical(criterion: str) -> str:
    """Normalise a criterion name (``magnitude`` -> ``l2``); unknown names raise ``ValueError``."""
    if not isinstance(criterion, str):
        raise ValueError(f"criterion must be a string, got {type(criterion).__name__}")
    name = criterion.lower()
    name = ALIASES.get(name, name)
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion '{criterion}'; choose one of {sorted(CRITERIA)} "
                         f"(aliases: {ALIASES}).")
    return name


def needs_data(criterion: str) -> bool:
    return canonical(criterion) in GRADIENT_CRITERIA


def check_data(criterion: str, data) -> None:
    if needs_data(criterion) and data is None:
        raise ValueError(f"criterion '{criterion}' needs gradients: pass data=<iterable of (images, labels) "
                         "batches> (a DataLoader or a list, e.g. sparsevit.data.digits_loaders()[0]), or use "
                         "a data-free criterion ('l1', 'l2', 'random').")


# ---------------------------------------------------------------------------------- gradients
def gradient_statistics(model: nn.Module, data: Iterable, *, num_batches: Optional[int] = 8,
                        loss_fn: Optional[Callable] = None, squared: bool = False, micro_batches: int = 1,
                        progress: bool = True) -> Dict[str, torch.Tensor]:
    """Mean gradient (``squared=False``) or mean squared gradient (``squared=True``) per parameter.

    Runs on ``model`` as given (callers pass a copy). ``micro_batches`` splits each batch for the
    squared statistic: E[g^2] over smaller chunks is a closer estimate of the per-sample Fisher.
    """
    from tqdm.auto import tqdm

    loss_fn = loss_fn or _default_loss
    dev = _device_of(model)
    params = {n: p for n, p in model.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    steps = 0
    total = num_batches
    if total is None:
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            total = None
    bar = tqdm(_batches(data, num_batches), total=total, desc="gradients", disable=not progress, leave=False)
    for x, y in bar:
        x, y = x.to(dev), y.to(dev)
        chunks = max(1, min(micro_batches, len(x))) if squared else 1
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(xc), yc)
            loss.backward()
            with torch.no_grad():
                for n, p in params.items():
                    if p.grad is not None:
                        acc[n].add_(p.grad.square() if squared else p.grad)
            steps += 1
    if steps == 0:
        raise ValueError("data yielded no batches; pass an iterable of (images, labels) batches.")
    model.zero_grad(set_to_none=True)
    return {n: a / steps for n, a in acc.items()}


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score of every entry of ``w`` (same shape): w_j^2 / sum of w_i^2 over |w_i| >= |w_j|."""
    sq = w.detach().float().flatten().square()
    vals, idx = sq.sort(descending=True)
    denom = vals.cumsum(0).clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.empty_like(sq)
    out[idx] = vals / denom
    return out.view_as(w)


@torch.no_grad()
def weight_importance(model: nn.Module, criterion: str, data=None, *, num_batches: Optional[int] = 8,
                      loss_fn: Optional[Callable] = None, seed: int = 0, micro_batches: int = 4,
                      progress: bool = True) -> Dict[str, torch.Tensor]:
    """Elementwise importance of every parameter of ``model``, by name (float32, on its device).

    ``model`` is not modified (gradient criteria work on a deep copy).
    """
    crit = canonical(criterion)
    check_data(crit, data)
    params = dict(model.named_parameters())
    if crit == "l1":
        return {n: p.detach().float().abs() for n, p in params.items()}
    if crit == "l2":
        return {n: p.detach().float().square() for n, p in params.items()}
    if crit == "lamp":
        return {n: lamp_scores(p) for n, p in params.items()}
    if crit == "random":
        g = torch.Generator().manual_seed(seed)
        return {n: torch.rand(p.shape, generator=g).to(p.device) for n, p in params.items()}
    work = copy.deepcopy(model)
    work.eval()
    with torch.enable_grad():
        stats = gradient_statistics(work, data, num_batches=num_batches, loss_fn=loss_fn,
                                    squared=crit == "hessian", micro_batches=micro_batches, progress=progress)
    del work
    if crit == "taylor":
        return {n: (p.detach().float() * stats[n].float()).abs() for n, p in params.items()}
    return {n: p.detach().float().square() * stats[n].float() for n, p in params.items()}


# ---------------------------------------------------------------------------------- unit scores
@dataclass
class BlockScores:
    """Scores of one block's units (higher = more important)."""

    heads: torch.Tensor  # [H]
    qk: torch.Tensor  # [H, head_dim]  q/k channel c of head h
    v: torch.Tensor  # [H, head_dim]
    mlp: torch.Tensor  # [hidden]
    attn: float = 0.0  # whole attention branch
    mlp_branch: float = 0.0  # whole MLP branch


@dataclass
class UnitScores:
    criterion: str
    blocks: List[BlockScores]
    residual: List[torch.Tensor]  # per stage [D_s]
    meta: Dict = field(default_factory=dict)


def _param_names(model: nn.Module) -> Dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def unit_scores(model: nn.Module, criterion: str, data=None, *, importance: Optional[Dict[str, torch.Tensor]] = None,
                num_batches: Optional[int] = 8, loss_fn: Optional[Callable] = None, seed: int = 0,
                micro_batches: int = 4, progress: bool = True) -> UnitScores:
    """Score every structural unit of ``model`` (heads, head-dim channels, MLP channels, residual channels
    per stage, branches) with ``criterion``; see the module docstring for the coupled weights.

    ``importance`` (elementwise, by parameter name) can be passed to reuse gradients.
    """
    crit = canonical(criterion)
    if crit == "lamp":
        raise ValueError("LAMP is a per-weight criterion for unstructured pruning; use "
                         "method='magnitude_unstructured' with criterion='lamp', or a structured criterion "
                         "('l1', 'l2', 'taylor', 'hessian', 'random') for grouped pruning.")
    adapter = get_adapter(model)
    if crit == "random":
        return _random_scores(adapter, seed)
    if importance is None:
        importance = weight_importance(model, crit, data, num_batches=num_batches, loss_fn=loss_fn, seed=seed,
                                       micro_batches=micro_batches, progress=progress)
    names = _param_names(model)

    def E(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None or not isinstance(t, torch.Tensor):
            return None
        n = names.get(id(t))
        return importance[n].cpu() if n is not None else None

    blocks = [_block_scores(b, E) for b in adapter.blocks]
    residual = _residual_scores(adapter, E)
    out = UnitScores(crit, blocks, residual)
    if crit == "l2":  # L2 norm of the coupled weights
        for bs in out.blocks:
            bs.heads, bs.qk, bs.v, bs.mlp = bs.heads.sqrt(), bs.qk.sqrt(), bs.v.sqrt(), bs.mlp.sqrt()
            bs.attn, bs.mlp_branch = math.sqrt(bs.attn), math.sqrt(bs.mlp_branch)
        out.residual = [r.sqrt() for r in out.residual]
    return out


def _sum(t: Optional[torch.Tensor]) -> float:
    return 0.0 if t is None else float(t.sum())


def _reduce_to(e: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum an elementwise importance over every dim but ``dim``."""
    d = dim % e.dim()
    return e.transpose(0, d).reshape(e.shape[d], -1).sum(dim=1) if e.dim() > 1 else e


def group_scores(entries, E, n_units: int) -> torch.Tensor:
    """Per unit, the summed importance of every slice the coupling ``entries`` give it."""
    out = torch.zeros(n_units)
    for entry in entries:
        for t, dim in entry.tensors():
            e = E(t)
            if e is not None:
                out = out + _reduce_to(e, dim)[entry.index].sum(dim=1)
    return out


def _block_scores(b, E) -> BlockScores:
    H, hd = b.num_heads, b.head_dim
    HD = H * hd
    qk = (group_scores(b.coupling["q"], E, HD) + group_scores(b.coupling["k"], E, HD)).view(H, hd)
    vv = group_scores(b.coupling["v"], E, HD).view(H, hd)
    heads = qk.sum(dim=1) + vv.sum(dim=1) + group_scores(b.coupling["head"], E, H)
    mlp = group_scores(b.coupling["mlp"], E, b.hidden)
    attn_total = sum(_sum(E(p)) for p in b.branch_parameters("attn"))
    mlp_total = sum(_sum(E(p)) for p in b.branch_parameters("mlp"))
    return BlockScores(heads=heads, qk=qk, v=vv, mlp=mlp, attn=attn_total, mlp_branch=mlp_total)


def _residual_scores(adapter, E) -> List[torch.Tensor]:
    return [group_scores(adapter.residual_coupling(s), E, d) for s, d in enumerate(adapter.stage_dims)]


def _random_scores(adapter, seed: int) -> UnitScores:
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for b in adapter.blocks:
        H, hd = b.num_heads, b.head_dim
        blocks.append(BlockScores(heads=torch.rand(H, generator=g), qk=torch.rand(H, hd, generator=g),
                                  v=torch.rand(H, hd, generator=g), mlp=torch.rand(b.hidden, generator=g),
                                  attn=float(torch.rand(1, generator=g)), mlp_branch=float(torch.rand(1, generator=g))))
    residual = [torch.rand(d, generator=g) for d in adapter.stage_dims]
    return UnitScores("random", blocks, residual)
