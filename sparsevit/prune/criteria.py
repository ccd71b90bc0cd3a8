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
   (exactly the slices a structured removal deletes, see METHODS.md "Classic criteria"):

   - head h: its q, k, v rows of ``qkv`` (+ bias entries, BeiT q_bias/v_bias), its ``proj`` columns,
     its column of the relative-position-bias table (BeiT/Swin);
   - head-dim channel (h, c): q/k channel = q row + k row (+ bias); v channel = v row (+ bias) + proj
     column;
   - MLP channel j: ``fc1`` row j + bias j + ``fc2`` column j;
   - residual channel c of stage s: patch-embed output channel, cls/reg/pos-embed channel, every norm's
     weight/bias entry, every qkv/fc1 input column, every proj/fc2 output row and bias entry, the
     layer scales, the head's input column; Swin: per stage, including patch merging (norm and
     reduction columns of the 2x2 neighbourhood it consumes, reduction rows of the stage it makes);
   - branch: every parameter of a block's attention (norm1, qkv, proj, ls1) or MLP (norm2, fc1, fc2,
     ls2) branch.

Gradient criteria run on a deep copy of the model in eval mode (dropout / drop-path off, so scores are
deterministic); the user's model, its mode and its ``.grad`` fields are never touched.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparsevit.models import get_adapter

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
def _default_loss(out, target):
    if isinstance(out, (tuple, list)):
        out = out[0]
    if target.dtype in (torch.long, torch.int, torch.int64, torch.int32):
        return F.cross_entropy(out, target)
    return F.mse_loss(out, target)


def _batches(data: Iterable, num_batches: Optional[int]):
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            return
        if isinstance(batch, dict):
            yield batch.get("image", batch.get("pixel_values")), batch.get("label", batch.get("labels"))
        else:
            yield batch[0], batch[1]


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


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


def _block_scores(b, E) -> BlockScores:
    H, hd = b.num_heads, b.head_dim
    HD = H * hd
    rows = E(b.qkv.weight).sum(dim=1)
    if b.kind == "beit":
        qb, vb = E(getattr(b.attn, "q_bias", None)), E(getattr(b.attn, "v_bias", None))
        if qb is not None:
            rows = rows + torch.cat((qb, torch.zeros_like(qb), vb))
    else:
        bias = E(b.qkv.bias)
        if bias is not None:
            rows = rows + bias
    q, k, v = rows[:HD].view(H, hd), rows[HD:2 * HD].view(H, hd), rows[2 * HD:].view(H, hd)
    proj_cols = E(b.proj.weight).sum(dim=0).view(H, hd)
    qk = q + k
    vv = v + proj_cols
    heads = qk.sum(dim=1) + vv.sum(dim=1)
    table = E(b.rel_pos_table())
    if table is not None:
        heads = heads + table.sum(dim=0)
    mlp = E(b.fc1.weight).sum(dim=1) + E(b.fc2.weight).sum(dim=0)
    if b.fc1.bias is not None:
        mlp = mlp + E(b.fc1.bias)
    attn_total = sum(_sum(E(p)) for p in b.attn.parameters()) + sum(_sum(E(p)) for p in b.norm1.parameters()) \
        + _sum(E(b.ls1))
    mlp_total = sum(_sum(E(p)) for p in b.mlp.parameters()) + sum(_sum(E(p)) for p in b.norm2.parameters()) \
        + _sum(E(b.ls2))
    return BlockScores(heads=heads, qk=qk, v=vv, mlp=mlp, attn=attn_total, mlp_branch=mlp_total)


def _norm_vec(norm, E, n: int) -> torch.Tensor:
    out = torch.zeros(n)
    for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)):
        e = E(p)
        if e is not None:
            e = e.reshape(-1)
            out += e if e.numel() == n else _fold(e, n)
    return out


def _fold(e: torch.Tensor, n: int) -> torch.Tensor:
    """Sum a flat vector whose length is a multiple of n onto n channels (index i -> i % n)."""
    return e.view(-1, n).sum(0)


def _residual_scores(adapter, E) -> List[torch.Tensor]:
    dims = adapter.stage_dims
    scores = [torch.zeros(d) for d in dims]
    for b in adapter.blocks:
        s = scores[b.stage]
        s += E(b.qkv.weight).sum(dim=0) + E(b.proj.weight).sum(dim=1)
        s += E(b.fc1.weight).sum(dim=0) + E(b.fc2.weight).sum(dim=1)
        for bias in (b.proj.bias, b.fc2.bias):
            e = E(bias)
            if e is not None:
                s += e
        for ls in (b.ls1, b.ls2):
            e = E(ls)
            if e is not None:
                s += e
        s += _norm_vec(b.norm1, E, b.dim) + _norm_vec(b.norm2, E, b.dim)
    for stage, tensor, dim in _coupled_with_stage(adapter):
        e = E(tensor)
        if e is None:
            continue
        n = dims[stage]
        d = dim % e.dim()
        vec = e.transpose(0, d).reshape(e.shape[d], -1).sum(dim=1) if e.dim() > 1 else e
        scores[stage] += vec if len(vec) == n else _fold(vec, n)
    return scores


def _coupled_with_stage(adapter):
    """(stage, tensor, dim) for every non-block tensor that follows a stage's residual channels.

    The stage of each entry of ``adapter.residual_coupled`` is found by probing with one stage's
    residual set emptied: the entries whose index set changes belong to that stage. LayerNorms
    (``dim=None``) are expanded to their weight and bias (last dim).
    """
    full = [torch.arange(d) for d in adapter.stage_dims]
    base = adapter.residual_coupled(full)
    stage_of = [None] * len(base)
    for s in range(len(full)):
        probe = list(full)
        probe[s] = torch.zeros(0, dtype=torch.long)
        for j, entry in enumerate(adapter.residual_coupled(probe)):
            if len(entry[3]) != len(base[j][3]) and stage_of[j] is None:
                stage_of[j] = s
    out = []
    for (parent, attr, dim, _), s in zip(base, stage_of):
        if s is None:
            continue
        obj = getattr(parent, attr, None)
        if obj is None:
            continue
        if dim is None:
            if isinstance(obj, nn.Identity):
                continue
            for t in (getattr(obj, "weight", None), getattr(obj, "bias", None)):
                if isinstance(t, torch.Tensor):
                    out.append((s, t, -1))
        elif isinstance(obj, torch.Tensor):
            out.append((s, obj, dim))
    return out


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
