"""Importance criteria: how much each weight, and each structural unit, matters.

Notation: w a parameter entry, g_b = dL_b/dw the gradient of mini-batch b's mean loss (b = 1..B),
g_i the gradient of sample i's loss, F = E_i[g_i^2] the diagonal empirical Fisher. A unit u (head,
head-dim channel, MLP channel, residual channel, branch) owns the set S_u of parameter entries a
structured removal deletes: the adapter's coupling table (``sparsevit/models/coupling.py``):

- head-dim channel (h, c): q/k channel = its ``q`` group + its ``k`` group; v channel = its ``v``
  group (which includes the ``proj`` column that reads it); a *shared* head-dim channel c (the ``qk``
  / ``v`` kinds of :mod:`sparsevit.prune.groups`) is channel c of every head;
- head h: its q/k and v channels plus its ``head`` group (the rel-pos table column);
- MLP channel j: its ``mlp`` group; residual channel c of stage s: ``adapter.residual_coupling(s)``;
- branch: every parameter of a block's attention or MLP branch (``BlockInfo.branch_parameters``).

Criteria (higher = more important):

=========  ======================================================================  =====================
name       score of unit u                                                         source
=========  ======================================================================  =====================
l1         sum_{S_u} |w|                                                           group L1 norm
l2         sqrt(sum_{S_u} w^2)                                                     group L2 norm (Li et
                                                                                   al., ICLR 2017)
taylor     ``taylor="group_sq"`` (default): (1/B) sum_b (sum_{S_u} w * g_b)^2      Molchanov et al.,
           ``taylor="weight_sq"``: (1/B) sum_b sum_{S_u} (w * g_b)^2               CVPR 2019, eqs. 4-5
           ``taylor="abs"``: sum_{S_u} |w * mean_b g_b|                            Torch-Pruning's
                                                                                   GroupTaylorImportance
hessian    sum_{S_u} w^2 * F (OBD, diagonal empirical Fisher as the Hessian)       LeCun et al., NeurIPS
                                                                                   1989; Torch-Pruning's
                                                                                   GroupHessianImportance
lamp       per layer: w_j^2 / sum_{i<=j} w_i^2 over |w| sorted descending          Lee et al., ICLR 2021
           (unstructured only)
random     seeded uniform                                                          baseline
=========  ======================================================================  =====================

Why ``group_sq`` is the default Taylor: removing the whole unit changes the loss by about
-sum_{S_u} w * g to first order, so its square is the first-order estimate of the damage of the
structured removal itself; forming it per mini-batch and averaging the squares (never averaging g
first) keeps it informative at convergence, where mean_b g_b ~ 0 and ``abs`` is mostly noise.
``weight_sq`` (the sum of per-weight estimates, Molchanov's "weight" variant) ignores the
cancellations inside a group; ``abs`` is offered to compare with Torch-Pruning, which sums the
gradients of several batches before the product.

Fisher estimate (``fisher=``): ``per_sample`` (default, exact, ``torch.func.vmap``) or ``microbatch``
(cheap, biased; :mod:`sparsevit.prune.estimators` says how). All gradient statistics come from that
module, the one implementation every method uses. Gradient criteria run on a deep copy of the model
in eval mode (dropout / drop-path off, so scores are deterministic); the user's model, its mode and
its ``.grad`` fields are never touched.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from sparsevit.models import get_adapter
from sparsevit.prune import estimators as est

#: criterion name -> needs data (gradients)
CRITERIA = {"l1": False, "l2": False, "magnitude": False, "taylor": True, "hessian": True,
            "lamp": False, "random": False}
ALIASES = {"magnitude": "l2", "obd": "hessian", "fisher": "hessian", "first_order": "taylor"}
GRADIENT_CRITERIA = ("taylor", "hessian")
TAYLOR_VARIANTS = ("group_sq", "weight_sq", "abs")
FISHER_MODES = est.FISHER_MODES


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


def check_options(taylor: str, fisher: str) -> None:
    if taylor not in TAYLOR_VARIANTS:
        raise ValueError(f"unknown taylor='{taylor}'; choose one of {TAYLOR_VARIANTS} (default 'group_sq').")
    if fisher not in FISHER_MODES:
        raise ValueError(f"unknown fisher='{fisher}'; choose one of {FISHER_MODES} (default 'per_sample').")


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score (Lee et al., ICLR 2021) of every entry of ``w`` (same shape):
    w_j^2 / sum of w_i^2 over |w_i| >= |w_j|."""
    sq = w.detach().float().flatten().square()
    vals, idx = sq.sort(descending=True)
    denom = vals.cumsum(0).clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.empty_like(sq)
    out[idx] = vals / denom
    return out.view_as(w)


# ---------------------------------------------------------------------------- elementwise
def _work_copy(model: nn.Module) -> nn.Module:
    work = copy.deepcopy(model)
    work.eval()
    return work


def _taylor_elementwise(work: nn.Module, data, variant: str, **batch_kw) -> Dict[str, torch.Tensor]:
    """Per weight: (1/B) sum_b (w g_b)^2 (``group_sq``/``weight_sq``: a weight is its own group) or
    |w * mean_b g_b| (``abs``)."""
    params = dict(work.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    steps = 0
    with torch.enable_grad():
        for grads in est.batch_gradients(work, data, **batch_kw):
            with torch.no_grad():
                for n, g in grads.items():
                    acc[n].add_(g.float() if variant == "abs" else est.taylor_contribution(params[n], g).square())
            steps += 1
    if variant == "abs":
        return {n: est.taylor_contribution(params[n], a / steps).abs() for n, a in acc.items()}
    return {n: a / steps for n, a in acc.items()}


@torch.no_grad()
def weight_importance(model: nn.Module, criterion: str, data=None, *, num_batches: Optional[int] = 8,
                      loss_fn: Optional[Callable] = None, seed: int = 0, taylor: str = "group_sq",
                      fisher: str = "per_sample", fisher_chunk: Optional[int] = None, micro_batches: int = 4,
                      progress: bool = True) -> Dict[str, torch.Tensor]:
    """Elementwise importance of every parameter of ``model``, by name (float32, on its device).

    ``l1`` |w|; ``l2`` w^2; ``lamp`` :func:`lamp_scores`; ``random`` seeded uniform; ``taylor``
    (1/B) sum_b (w g_b)^2 (Molchanov et al., CVPR 2019; ``taylor="abs"``: |w * mean_b g_b| as
    Torch-Pruning); ``hessian`` w^2 * F (OBD with the diagonal empirical Fisher; ``fisher`` picks
    the per-sample or micro-batch estimate). ``model`` is not modified.
    """
    crit = canonical(criterion)
    check_data(crit, data)
    check_options(taylor, fisher)
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
    work = _work_copy(model)
    kw = dict(num_batches=num_batches, loss_fn=loss_fn, progress=progress)
    if crit == "taylor":
        return _taylor_elementwise(work, data, taylor, **kw)
    fisher_diag, _ = est.fisher_diagonal(work, data, mode=fisher, chunk_size=fisher_chunk,
                                         micro_batches=micro_batches, **kw)
    return {n: p.detach().float().square() * fisher_diag[n] for n, p in params.items()}


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
    qk_shared: Optional[torch.Tensor] = None  # [head_dim]  q/k channel c of every head (one unit)
    v_shared: Optional[torch.Tensor] = None  # [head_dim]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "BlockScores":
        """``fn`` applied to every score (branch scores as 0-dim float64 tensors)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = (None if v is None else fn(v) if isinstance(v, torch.Tensor)
                           else float(fn(torch.tensor(float(v), dtype=torch.float64))))
        return BlockScores(**out)

    def plus(self, other: "BlockScores") -> "BlockScores":
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = None if a is None else a + b
        return BlockScores(**out)


@dataclass
class UnitScores:
    criterion: str
    blocks: List[BlockScores]
    residual: List[torch.Tensor]  # per stage [D_s]
    meta: Dict = field(default_factory=dict)  # estimator: taylor variant / fisher mode, path, batches

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "UnitScores":
        return UnitScores(self.criterion, [b.map(fn) for b in self.blocks], [fn(r) for r in self.residual],
                          dict(self.meta))

    def plus(self, other: "UnitScores") -> "UnitScores":
        return UnitScores(self.criterion, [a.plus(b) for a, b in zip(self.blocks, other.blocks)],
                          [a + b for a, b in zip(self.residual, other.residual)], dict(self.meta))


def _param_names(model: nn.Module) -> Dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def unit_scores(model: nn.Module, criterion: str, data=None, *, importance: Optional[Dict[str, torch.Tensor]] = None,
                num_batches: Optional[int] = 8, loss_fn: Optional[Callable] = None, seed: int = 0,
                taylor: str = "group_sq", fisher: str = "per_sample", fisher_chunk: Optional[int] = None,
                micro_batches: int = 4, progress: bool = True) -> UnitScores:
    """Score every structural unit of ``model`` (heads, head-dim channels, MLP channels, residual channels
    per stage, branches) with ``criterion``; formulas and sources in the module docstring.

    ``taylor``: ``group_sq`` (default) | ``weight_sq`` | ``abs``. ``fisher`` (hessian): ``per_sample``
    (default) | ``microbatch`` (``micro_batches`` chunks per batch); ``fisher_chunk`` bounds how many
    per-sample gradients are held at once. ``importance`` (elementwise, by parameter name, e.g. from
    :func:`weight_importance`) is summed per unit instead of computing gradients; the group Taylor
    score cannot be formed from it (it squares per-batch group sums). ``meta`` records the estimator.
    """
    crit = canonical(criterion)
    check_options(taylor, fisher)
    if crit == "lamp":
        raise ValueError("LAMP is a per-weight criterion for unstructured pruning; use "
                         "method='magnitude_unstructured' with criterion='lamp', or a structured criterion "
                         "('l1', 'l2', 'taylor', 'hessian', 'random') for grouped pruning.")
    adapter = get_adapter(model)
    if crit == "random":
        return _random_scores(adapter, seed)
    names = _param_names(model)
    kw = dict(num_batches=num_batches, loss_fn=loss_fn, progress=progress)
    if crit == "taylor" and taylor == "group_sq" and importance is None:
        check_data(crit, data)
        return _group_taylor_scores(model, adapter, names, data, **kw)
    if crit == "taylor" and taylor == "group_sq":
        raise ValueError("the group Taylor score squares per-batch group sums and cannot be summed from an "
                         "elementwise importance; pass taylor='weight_sq' or leave importance=None.")
    meta: Dict = {}
    if importance is None and crit == "hessian":
        check_data(crit, data)
        work = _work_copy(model)
        fisher_diag, meta = est.fisher_diagonal(work, data, mode=fisher, chunk_size=fisher_chunk,
                                                micro_batches=micro_batches, **kw)
        importance = {n: p.detach().float().square() * fisher_diag[n] for n, p in model.named_parameters()}
    elif importance is None:
        importance = weight_importance(model, crit, data, seed=seed, taylor=taylor, **kw)
        meta = {"taylor": taylor} if crit == "taylor" else {}
    out = reduce_units(adapter, names, importance, crit)
    out.meta = meta
    if crit == "l2":  # L2 norm of the coupled weights
        out = out.map(torch.sqrt)
    return out


def _group_taylor_scores(model: nn.Module, adapter, names: Dict[int, str], data, **batch_kw) -> UnitScores:
    """(1/B) sum_b (sum_{S_u} w * g_b)^2 for every unit u: per batch, w * g elementwise, summed per
    unit through the coupling table (signed), squared, accumulated in float64."""
    work = _work_copy(model)
    wparams = dict(work.named_parameters())
    acc: Optional[UnitScores] = None
    steps = 0
    with torch.enable_grad():
        for grads in est.batch_gradients(work, data, **batch_kw):
            with torch.no_grad():
                contrib = {n: est.taylor_contribution(wparams[n], g) for n, g in grads.items()}
                squares = reduce_units(adapter, names, contrib, "taylor").map(lambda t: t.double().square())
            acc = squares if acc is None else acc.plus(squares)
            steps += 1
    out = acc.map(lambda t: t / steps)
    out.meta = {"taylor": "group_sq", "batches": steps}
    return out


# ------------------------------------------------------------------------ reduction per unit
def reduce_units(adapter, names: Dict[int, str], elementwise: Dict[str, torch.Tensor], criterion: str) -> UnitScores:
    """Sum ``elementwise`` (by parameter name) over every unit's coupled slices. Linear in its input:
    applied to w * g_b it gives each unit's signed first-order contribution for batch b."""

    def E(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None or not isinstance(t, torch.Tensor):
            return None
        n = names.get(id(t))
        return elementwise[n].cpu() if n is not None else None

    blocks = [_block_scores(b, E) for b in adapter.blocks]
    residual = [group_scores(adapter.residual_coupling(s), E, d) for s, d in enumerate(adapter.stage_dims)]
    return UnitScores(criterion, blocks, residual)


def _sum(t: Optional[torch.Tensor]) -> float:
    return 0.0 if t is None else float(t.double().sum())


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
    return BlockScores(heads=heads, qk=qk, v=vv, mlp=mlp, attn=attn_total, mlp_branch=mlp_total,
                       qk_shared=qk.sum(dim=0), v_shared=vv.sum(dim=0))


def _random_scores(adapter, seed: int) -> UnitScores:
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for b in adapter.blocks:
        H, hd = b.num_heads, b.head_dim
        blocks.append(BlockScores(heads=torch.rand(H, generator=g), qk=torch.rand(H, hd, generator=g),
                                  v=torch.rand(H, hd, generator=g), mlp=torch.rand(b.hidden, generator=g),
                                  attn=float(torch.rand(1, generator=g)), mlp_branch=float(torch.rand(1, generator=g))))
        blocks[-1].qk_shared, blocks[-1].v_shared = blocks[-1].qk.mean(0), blocks[-1].v.mean(0)
    residual = [torch.rand(d, generator=g) for d in adapter.stage_dims]
    return UnitScores("random", blocks, residual)
