"""ART with the HyperSparse loss (Glandorf et al., ICCV'23 W): a training-time unstructured method.

Schedule (``method="art"``, on a copy of the model; the user's model is never touched):

1. Dense warm-up: ``warmup`` epochs of plain cross-entropy.
2. ART epochs ``e = 0, 1, ...``: loss ``CE + alpha_e * HS(w)`` with ``alpha_e = alpha0 * growth**e``
   (paper: 5e-6 and 1.05). After each epoch the (dense, regularised) model's training accuracy is
   measured, then a copy is pruned to ``kappa`` by global magnitude (in the chosen tile / N:M shape)
   and its training accuracy measured the same way (eval mode, on ``data``). The mean of the pruned
   accuracies over the last 3 epochs (fewer at the start) is compared with the dense accuracy of the
   same epoch, as the authors' code does (the bar is the current dense model, not the warm-up one:
   an under-trained warm-up would otherwise stop ART at once). When it beats it, ART stops.
   Frozen mask: the middle epoch's mask of the 3-epoch window with the best mean (authors' rule).
3. Fine-tune ``finetune_epochs`` with that mask (removed weights stay exactly zero).

``kappa`` is the fraction of the Linear weights removed that meets ``sparsity`` (the fraction of the
prunable block parameters, as everywhere in sparsevit): ``kappa = sparsity * prunable / maskable``.
If the stop rule never fires within ``max_epochs`` ART epochs, a warning says so and the best mask
found is used (``plan.meta["art"]["stopped"] = "max_epochs"``).

Scale of ``alpha0``: HyperSparse's per-weight gradient is O(1) whatever the model size (see
:mod:`sparsevit.prune.hypersparse`), so the paper's 5e-6 needs no size factor. Measured on a
4-block, 96-wide ViT on the digits after 3 dense epochs: mean |dCE/dw| ~3e-4 and mean |dHS/dw|
~0.9 over the Linear weights, so at 5e-6 the regulariser is ~1.5% of the task gradient and reaches
parity only after ~86 ART epochs at growth 1.05: the paper's long schedule. What does not carry
over is the run length: for short runs raise ``growth`` (e.g. 1.5) or ``alpha0`` (e.g. 1e-4) so the
two meet within the budget; both are recorded in ``plan.meta["art"]``.

Resumable: with ``checkpoint=path`` the state (weights, optimiser, epoch, accuracies, best mask) is
written atomically after every epoch; ``resume=path`` continues from it (loaded with
``torch.load(weights_only=True)``: state dicts only, nothing is unpickled).
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparsevit._io import atomic_write
from sparsevit.errors import CheckpointError
from sparsevit.models import get_adapter
from sparsevit.plan import BlockPlan, SparsityPlan
from sparsevit.prune import tiles
from sparsevit.prune.batches import iter_batches, model_device
from sparsevit.prune.dimap import removal_budget
from sparsevit.prune.finetune import evaluate, finetune
from sparsevit.prune.hypersparse import HyperSparseLoss
from sparsevit.prune.registry import register_method

AVERAGE_OVER = 3


def magnitude_masks(model: nn.Module, kappa: float, block=None, nm=None, reduce: str = "mean") -> Dict[str, torch.Tensor]:
    """Global magnitude masks over the prunable Linears: ``kappa`` of their weights removed."""
    linears = get_adapter(model).linear_modules()
    scores = {n: lin.weight.detach().abs().float().cpu() for n, lin in linears.items()}
    total = sum(s.numel() for s in scores.values())
    return tiles.shaped_masks(scores, n_remove=None if nm else kappa * total, block=None if nm else block,
                              nm=nm, reduce=reduce)


@torch.no_grad()
def _apply(model: nn.Module, masks: Dict[str, torch.Tensor]) -> nn.Module:
    for name, lin in get_adapter(model).linear_modules().items():
        lin.weight.mul_(masks[name].to(lin.weight.device, lin.weight.dtype))
    return model


def _ce(out, y):
    if isinstance(out, (tuple, list)):
        out = out[0]
    return F.cross_entropy(out, y)


def _train_epoch(work, data, opt, loss_fn, hs: Optional[HyperSparseLoss], alpha: float) -> float:
    work.train()
    dev = model_device(work)
    total, n = 0.0, 0
    for x, y in iter_batches(data, None):
        x, y = x.to(dev), y.to(dev)
        loss = loss_fn(work(x), y)
        if hs is not None and alpha > 0:
            loss = loss + alpha * hs(work)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, n = total + float(loss.detach()), n + 1
    if n == 0:
        raise ValueError("data yielded no batches; pass an iterable of (images, labels) batches.")
    return total / n


def _save_state(path: str, state: Dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp), suffix=".pt")


def _load_state(path: str) -> Dict:
    if not os.path.exists(path):
        raise CheckpointError(f"resume file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not an ART checkpoint written by sparsevit ({exc}); "
                              "start without resume=.") from None
    missing = sorted(set(_fresh_state_keys()) - set(state)) if isinstance(state, dict) else ["(not a dict)"]
    if missing:
        raise CheckpointError(f"{path} is not an ART checkpoint of this sparsevit version (missing {missing}); "
                              "start without resume=.")
    return state


def _kappa_for(adapter, sparsity: Optional[float], nm) -> float:
    maskable = sum(lin.weight.numel() for lin in adapter.linear_modules().values())
    if nm is not None:
        n, m = tiles.check_nm(nm)
        return 1 - n / m
    if sparsity is None or not (0.0 < float(sparsity) < 1.0):
        raise ValueError(f"art needs sparsity in (0, 1) (fraction of prunable parameters removed), got {sparsity!r}")
    return removal_budget(adapter, float(sparsity), maskable) / maskable


def _fresh_state_keys():
    return ("kappa", "model", "opt", "epoch", "dense_accs", "accs", "window", "best_mean", "best_mask", "stopped")


def _fresh_state(work: nn.Module, opt, kappa: float) -> Dict:
    return {"kappa": kappa, "model": work.state_dict(), "opt": opt.state_dict(), "epoch": 0, "dense_accs": [],
            "accs": [], "window": [], "best_mean": -1.0, "best_mask": {}, "stopped": ""}


def _art_epoch(work, data, opt, loss_fn, hs, state, cfg) -> None:
    """One ART epoch: regularised training, then the pruned copy's training accuracy."""
    e = state["epoch"] - cfg["warmup"]
    alpha = cfg["alpha0"] * cfg["growth"] ** e
    _train_epoch(work, data, opt, loss_fn, hs, alpha)
    dense = evaluate(work, data, num_batches=cfg["eval_batches"])
    masks = magnitude_masks(work, cfg["kappa"], cfg["block"], cfg["nm"], cfg["reduce"])
    acc = evaluate(_apply(copy.deepcopy(work), masks), data, num_batches=cfg["eval_batches"])
    state["dense_accs"].append(dense)
    state["accs"].append(acc)
    state["window"] = (state["window"] + [masks])[-AVERAGE_OVER:]
    mean = sum(state["accs"][-AVERAGE_OVER:]) / len(state["window"])
    if mean > state["best_mean"]:  # the best window's middle epoch gives the frozen mask
        state["best_mean"], state["best_mask"] = mean, state["window"][len(state["window"]) // 2]
    state["epoch"] += 1
    if mean > dense:
        state["stopped"] = "rule"


def _run_schedule(work, data, opt, loss_fn, hs, state, cfg, checkpoint, progress) -> None:
    from tqdm.auto import tqdm

    total = cfg["warmup"] + cfg["max_epochs"]
    bar = tqdm(total=total, initial=min(state["epoch"], total), desc="art", disable=None if progress else True,
               leave=False)
    while not state["stopped"]:
        if state["epoch"] < cfg["warmup"]:
            _train_epoch(work, data, opt, loss_fn, None, 0.0)
            state["epoch"] += 1
        else:
            if state["epoch"] - cfg["warmup"] >= cfg["max_epochs"]:
                state["stopped"] = "max_epochs"
                break
            _art_epoch(work, data, opt, loss_fn, hs, state, cfg)
        bar.update(1)
        if state["accs"]:
            bar.set_postfix(dense=f"{state['dense_accs'][-1]:.3f}", pruned=f"{state['accs'][-1]:.3f}")
        if checkpoint:
            state["model"], state["opt"] = work.state_dict(), opt.state_dict()
            _save_state(checkpoint, state)
    bar.close()


def _art_plan(adapter, state: Dict, cfg: Dict, sparsity, finetune_epochs) -> SparsityPlan:
    """The plan of the frozen mask, with the schedule's history in ``meta["art"]``."""
    nm_t, blk = cfg["nm"], cfg["block"]
    plan = SparsityPlan(family=adapter.family, blocks=[BlockPlan() for _ in adapter.blocks],
                        masks={n: m.bool() for n, m in state["best_mask"].items() if not bool(m.all())},
                        block=None if nm_t else list(blk), nm=list(nm_t) if nm_t else None,
                        signature=adapter.signature())
    stats = adapter.count(plan)
    plan.meta = {"method": "art", "criterion": "magnitude", "sparsity": round(stats["total"]["prunable_removed"], 6),
                 "target": {"sparsity": sparsity} if nm_t is None else {"nm": list(nm_t)}, "reduce": cfg["reduce"],
                 "art": {"kappa": round(cfg["kappa"], 6), "alpha0": cfg["alpha0"], "growth": cfg["growth"],
                         "warmup": cfg["warmup"], "art_epochs": len(state["accs"]), "stopped": state["stopped"],
                         "dense_train_acc": state["dense_accs"], "pruned_train_acc": state["accs"],
                         "best_mean_pruned_train_acc": state["best_mean"], "finetune_epochs": finetune_epochs},
                 "stats": stats}
    return plan


@register_method("art", criteria=None, aliases=("hypersparse",), needs_data=True)
def art(model, *, criterion: str = "magnitude", sparsity: Optional[float] = 0.5, data=None,
        loss_fn: Optional[Callable] = None, warmup: int = 2, max_epochs: int = 30, alpha0: float = 5e-6,
        growth: float = 1.05, lr: float = 1e-4, weight_decay: float = 0.0, finetune_epochs: float = 1,
        finetune_lr: Optional[float] = None, block: Optional[Sequence[int]] = None,
        nm: Optional[Sequence[int]] = None, reduce: str = "mean", eval_batches: Optional[int] = None,
        checkpoint: Optional[str] = None, resume: Optional[str] = None, return_model: bool = False,
        device=None, progress: bool = True, seed: int = 0, **_ignored):
    """ART with HyperSparse: dense warm-up, growing HS regularisation until the pruned copy beats the
    dense training accuracy, then masked fine-tuning (see the module docstring).

    Args:
        sparsity: fraction of prunable (block) parameters removed (sets ``kappa``); ignored with ``nm``.
        data: training batches (images, labels), re-iterated every epoch.
        warmup / max_epochs: dense epochs, then at most ``max_epochs`` ART epochs (the cap warns).
        alpha0 / growth: ``alpha_e = alpha0 * growth**e``; lr / weight_decay: AdamW during ART.
        finetune_epochs / finetune_lr: masked fine-tuning with the frozen mask (0 skips it).
        block / nm / reduce: mask shape (tiles scored by ``reduce`` of |w|, or N:M).
        eval_batches: batches of ``data`` used for the training-accuracy checks (None: all).
        checkpoint / resume: write the state after every epoch / continue from such a file.
        return_model: return ``(plan, trained_masked_model)`` instead of the plan alone.
    ``criterion`` is ignored: ART always prunes by global magnitude (``meta["criterion"]``).
    """
    torch.manual_seed(seed)
    if data is None:
        raise ValueError("art trains: pass data=<iterable of (images, labels) batches>.")
    blk, nm_t = tiles.check_block(block), tiles.check_nm(nm)
    adapter = get_adapter(model)
    kappa = _kappa_for(adapter, sparsity, nm_t)
    cfg = {"kappa": kappa, "warmup": int(warmup), "max_epochs": int(max_epochs), "alpha0": float(alpha0),
           "growth": float(growth), "block": blk, "nm": nm_t, "reduce": reduce, "eval_batches": eval_batches}
    work = copy.deepcopy(model)
    if device is not None:
        work.to(device)
    opt = torch.optim.AdamW(work.parameters(), lr=lr, weight_decay=weight_decay)
    state = _fresh_state(work, opt, kappa)
    if resume:
        state = _load_state(resume)
        if abs(float(state.get("kappa", -1)) - kappa) > 1e-9:
            raise CheckpointError(f"{resume} was written for kappa={state.get('kappa')} but this run prunes "
                                  f"kappa={kappa:.6f}; resume with the same sparsity / nm, or start afresh.")
        work.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    hs = HyperSparseLoss(kappa)
    _run_schedule(work, data, opt, loss_fn or _ce, hs, state, cfg, checkpoint, progress)
    if state["stopped"] == "max_epochs":
        warnings.warn(f"ART's stop rule never fired: after {cfg['max_epochs']} ART epochs the pruned copy's "
                      f"training accuracy (best 3-epoch mean {state['best_mean']:.4f}) never beat the dense "
                      f"model's ({state['dense_accs'][-1] if state['dense_accs'] else float('nan'):.4f}); "
                      "using the best mask found. Raise max_epochs, alpha0 or "
                      "growth for a stronger regulariser.", stacklevel=2)
    if not state["best_mask"]:  # max_epochs=0: prune the warmed-up weights directly
        state["best_mask"] = magnitude_masks(work, kappa, blk, nm_t, reduce)
    plan = _art_plan(adapter, state, cfg, sparsity, finetune_epochs)
    trained = None
    if return_model:  # the masks do not depend on the fine-tune: only run it when its weights are wanted
        trained = finetune(work, plan, data, epochs=finetune_epochs, lr=finetune_lr or lr, loss_fn=loss_fn,
                           inplace=True, progress=progress) if finetune_epochs > 0 else \
            _apply(work, {n: state["best_mask"][n] for n in adapter.linear_modules()}).eval()
    return (plan, trained) if return_model else plan
