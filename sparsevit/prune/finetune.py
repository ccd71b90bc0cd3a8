"""Masked fine-tuning: train the masked dense model without letting removed weights come back.

``finetune(model, plan, data)`` trains ``masked_model(model, plan)`` (a copy unless ``inplace``) with
AdamW and a cosine schedule (linear warm-up). After every backward pass the gradients of removed
weights are zeroed, and after every optimiser step the masks are re-applied (AdamW's decoupled weight
decay and momentum could otherwise move them). The result is still the masked dense model, so
``sparsevit.accelerate(trained)`` (plan read from the zeros) or ``accelerate(trained, plan)`` gives the
fast model.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from sparsevit.models import masked_model
from sparsevit.prune.batches import default_loss, iter_batches, model_device


@torch.no_grad()
def plan_masks(model: nn.Module, plan) -> Dict[str, torch.Tensor]:
    """Per parameter name, the bool keep-mask a plan implies (only parameters the plan touches).

    Computed by applying the plan to a copy whose parameters are all ones, so it follows exactly the
    adapter's masking rules (coupled biases, norms, layer scales, rel-pos tables, residual channels).
    """
    probe = copy.deepcopy(model)
    for p in probe.parameters():
        p.fill_(1.0)
    masked_model(probe, plan, inplace=True)
    out = {}
    for name, p in probe.named_parameters():
        m = p != 0
        if not bool(m.all()):
            out[name] = m
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, m in masks.items():
        p = params[name]
        p.mul_(m.to(device=p.device, dtype=p.dtype))


def evaluate(model: nn.Module, data: Iterable, *, num_batches: Optional[int] = None) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode, restored afterwards)."""
    was = model.training
    model.eval()
    dev = model_device(model)
    correct = total = 0
    with torch.no_grad():
        for x, y in iter_batches(data, num_batches):
            out = model(x.to(dev))
            if isinstance(out, (tuple, list)):
                out = out[0]
            correct += int((out.argmax(-1).cpu() == y).sum())
            total += len(y)
    model.train(was)
    return correct / max(total, 1)


def finetune(model: nn.Module, plan, data: Iterable, *, epochs: float = 1, lr: float = 1e-4,
             weight_decay: float = 0.05, warmup: float = 0.05, min_lr: float = 1e-6,
             loss_fn: Optional[Callable] = None, max_steps: Optional[int] = None, inplace: bool = False,
             grad_clip: Optional[float] = 1.0, label_smoothing: float = 0.0, device=None,
             progress: bool = True, callback: Optional[Callable] = None) -> nn.Module:
    """Fine-tune ``masked_model(model, plan)`` on ``data``; returns the trained masked model (eval mode).

    Args:
        model: the original timm model (or an already masked one); ``plan``: the :class:`SparsityPlan`
            to respect (``None``: fine-tune densely, e.g. for transfer learning).
        data: iterable of (images, labels) batches, re-iterated every epoch (a DataLoader or a list).
        epochs: passes over ``data`` (fractions allowed); ``max_steps`` caps the number of steps.
        lr / weight_decay / warmup (fraction of steps) / min_lr: AdamW with cosine decay.
        loss_fn: ``loss_fn(outputs, labels)``; default cross-entropy (``label_smoothing``).
        inplace: train ``model`` itself instead of a copy.
        callback: called as ``callback(step, loss)`` after every step.
    The removed weights stay exactly zero throughout.
    """
    if plan is not None:
        work = masked_model(model, plan, inplace=inplace)
        masks = plan_masks(work, plan)
    else:
        work = model if inplace else copy.deepcopy(model)
        masks = {}
    if device is not None:
        work.to(device)
    dev = model_device(work)
    params = dict(work.named_parameters())
    mask_params = [(params[n], m.to(dev)) for n, m in masks.items()]
    total = _total_steps(data, epochs, max_steps)
    opt = _adamw(params, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_schedule(total, int(warmup * total),
                                                                    min_lr / lr if lr > 0 else 0.0))
    _train(work, data, loss_fn or _classification_loss(label_smoothing), opt, sched, mask_params, total,
           grad_clip, progress, callback)
    work.eval()
    return work


def _total_steps(data, epochs: float, max_steps: Optional[int]) -> int:
    try:
        per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    if per_epoch is None and max_steps is None:
        raise ValueError("data has no len(); pass max_steps= so the schedule knows its length.")
    total = int(math.ceil(epochs * per_epoch)) if per_epoch is not None else int(max_steps)
    if max_steps is not None:
        total = min(total, int(max_steps))
    if total <= 0:
        raise ValueError("nothing to train: epochs * len(data) is 0.")
    return total


def _classification_loss(label_smoothing: float) -> Callable:
    ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss_fn(out, y):
        if isinstance(out, (tuple, list)):
            out = out[0]
        return ce(out, y) if y.dtype in (torch.long, torch.int64, torch.int32) else default_loss(out, y)

    return loss_fn


def _adamw(params: Dict[str, torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, norms, position embeddings, tokens)."""
    def decays(n, p):
        return p.ndim >= 2 and "pos_embed" not in n and "token" not in n

    decay = [p for n, p in params.items() if p.requires_grad and decays(n, p)]
    no_decay = [p for n, p in params.items() if p.requires_grad and not decays(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def _cosine_schedule(total: int, warm: int, floor: float) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over ``warm`` steps, then cosine decay to ``floor``."""
    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return schedule


def _train(work: nn.Module, data: Iterable, loss_fn: Callable, opt, sched, mask_params, total: int,
           grad_clip: Optional[float], progress: bool, callback: Optional[Callable]) -> None:
    """``total`` optimiser steps over ``data`` (re-iterated as needed); removed weights stay zero."""
    from tqdm.auto import tqdm

    dev = model_device(work)
    work.train()
    step = 0
    bar = tqdm(total=total, desc="finetune", disable=None if progress else True, leave=False)
    while step < total:
        for x, y in iter_batches(data, None):
            if step >= total:
                break
            loss = loss_fn(work(x.to(dev)), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p, m in mask_params:
                    if p.grad is not None:
                        p.grad.mul_(m)
            if grad_clip:
                nn.utils.clip_grad_norm_(work.parameters(), grad_clip)
            opt.step()
            sched.step()
            with torch.no_grad():
                for p, m in mask_params:
                    p.mul_(m)
            step += 1
            bar.update(1)
            loss_val = float(loss.detach())
            bar.set_postfix(loss=f"{loss_val:.3f}")
            if callback is not None:
                callback(step, loss_val)
    bar.close()
