"""Pruning: ``sparsevit.prune(model, method=..., criterion=..., sparsity=..., data=...)`` -> SparsityPlan.

Methods are registered by name in :mod:`sparsevit.prune.registry` (``grouped``,
``magnitude_unstructured``, and the methods of their own modules); criteria live in
:mod:`sparsevit.prune.criteria`; masked fine-tuning in :mod:`sparsevit.prune.finetune`.
"""
from __future__ import annotations

import sys
import types
from typing import Callable, Iterable, Optional

from sparsevit.prune.finetune import evaluate, finetune  # noqa: F401
from sparsevit.prune.hypersparse import HyperSparseLoss  # noqa: F401
from sparsevit.prune.registry import available_methods, get_method, register_method  # noqa: F401


def prune(model, method: str = "grouped", criterion: str = "taylor", sparsity: Optional[float] = 0.5,
          data: Optional[Iterable] = None, *, num_batches: Optional[int] = 8, loss_fn: Optional[Callable] = None,
          **method_options):
    """Score ``model`` and return a :class:`sparsevit.SparsityPlan`; the model itself is never modified.

    Args:
        model: a timm ViT / DeiT / BeiT / Swin.
        method: a registered method (``sparsevit.prune.available_methods()``), e.g. ``grouped``
            (structural: heads, head dims, MLP channels, residual channels) or
            ``magnitude_unstructured`` (masks; ``block=(32, 32)`` for tile patterns).
        criterion: ``l1``, ``l2`` (``magnitude``), ``taylor``, ``hessian``, ``random``; ``lamp`` for
            unstructured. Gradient criteria (taylor, hessian) need ``data``.
        sparsity: fraction of the prunable (block) parameters to remove, in [0, 1).
        data: iterable of (images, labels) batches (DataLoader or list), used for ``num_batches`` batches.
        loss_fn: ``loss_fn(outputs, labels)``; default cross-entropy.
        **method_options: passed to the method (grouped: ``macs``, ``prune_heads``, ``prune_head_dims``,
            ``prune_mlp``, ``prune_residual``, ``round_to``, ``allow_empty``, ``normalize``, ...).
    The plan's ``meta`` records method, criterion, target and exact parameter/MAC statistics
    (``plan.summary()``).
    """
    from sparsevit.prune import criteria as C

    spec = get_method(method)
    if sparsity is not None and method_options.get("macs") is None:
        try:
            s = float(sparsity)
        except (TypeError, ValueError):
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
        if not (0.0 <= s < 1.0):
            raise ValueError(f"sparsity={sparsity} is impossible: it is the fraction of prunable parameters "
                             "removed and must be in [0, 1) (e.g. 0.5 removes half).")
    if spec.criteria is not None:
        if not isinstance(criterion, str) or criterion.lower() not in spec.criteria:
            raise ValueError(f"unknown criterion '{criterion}' for method '{spec.name}'; choose one of "
                             f"{list(spec.criteria)}.")
        C.check_data(criterion, data)
    if spec.needs_data and data is None:
        raise ValueError(f"method '{spec.name}' needs data: pass data=<iterable of (images, labels) batches>.")
    result = spec.fn(model, criterion=criterion, sparsity=sparsity, data=data, num_batches=num_batches,
                     loss_fn=loss_fn, **method_options)
    # training methods asked for their weights (return_model=True) give (plan, model)
    plan = result[0] if isinstance(result, tuple) else result
    plan.meta.setdefault("method", spec.name)
    plan.meta.setdefault("criterion", criterion)
    return result


class _CallablePackage(types.ModuleType):
    """Importing the submodule ``sparsevit.prune`` rebinds ``sparsevit.prune`` to this package; making
    the package callable keeps ``sparsevit.prune(model, ...)`` working either way."""

    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
