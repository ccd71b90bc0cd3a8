"""The HyperSparse regulariser (Glandorf et al., ICCV'23 W), as a loss module for any training loop.

With ``w`` all regularised weights flattened together, ``kappa`` the target prune rate and
``|w|_(kappa)`` the ``floor(kappa * N)``-th smallest ``|w|``::

    s  = 0.6585 / |w|_(kappa)                  (a constant: no gradient flows through it)
    T  = sum_j tanh(s * |w_j|)
    HS = sum_i |w_i| * T / sg(T) - sum_i |w_i|  (sg = stop-gradient)

The value is always 0 (``T / sg(T) = 1``); only the gradient matters::

    dHS/dw_i = sign(w_i) * s * sech^2(s * |w_i|) * ||w||_1 / T

an L1 pull on the weights below the prune threshold that fades to ~0 for the large ones, so the
weights that will be pruned shrink while the ones that stay are left alone. 0.6585 puts the
threshold weight where ``sech^2`` has fallen to ~0.66 of its peak. The per-weight gradient is O(1)
whatever the model size (``||w||_1 / T`` is a mean), so the weight ``alpha`` of the loss does not
need rescaling with the number of weights; it is balanced against the task loss's gradients.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Union

import torch
from torch import nn

SCALE_CONSTANT = 0.6585


def _check_kappa(kappa: float) -> float:
    try:
        k = float(kappa)
    except (TypeError, ValueError):
        raise ValueError(f"kappa must be a number in (0, 1), got {kappa!r}") from None
    if not (0.0 < k < 1.0) or math.isnan(k):
        raise ValueError(f"kappa={kappa} is impossible: it is the fraction of weights to prune, in (0, 1).")
    return k


def regularised_weights(model: nn.Module) -> List[torch.Tensor]:
    """The weights HyperSparse acts on: the prunable Linears of a supported timm ViT/Swin (the ones
    sparsevit masks), else every ``nn.Linear`` / ``nn.Conv*d`` weight of ``model``."""
    from sparsevit.errors import UnsupportedModelError
    from sparsevit.models import get_adapter

    try:
        return [lin.weight for lin in get_adapter(model).linear_modules().values()]
    except UnsupportedModelError:
        convs = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        weights = [m.weight for m in model.modules() if isinstance(m, convs)]
        if not weights:
            raise ValueError(f"{type(model).__name__} has no Linear/Conv weights to regularise.") from None
        return weights


class HyperSparseLoss(nn.Module):
    """``HS(w)`` for the target prune rate ``kappa``; call it on a model or on a list of weights.

    Example::

        hs = sparsevit.prune.hypersparse.HyperSparseLoss(kappa=0.9)
        loss = F.cross_entropy(model(x), y) + alpha * hs(model)
        loss.backward()

    On a model, the weights are those of :func:`regularised_weights`; one global threshold covers
    all of them (the ranking is global, as in the paper).
    """

    def __init__(self, kappa: float):
        super().__init__()
        self.kappa = _check_kappa(kappa)

    def extra_repr(self) -> str:
        return f"kappa={self.kappa}"

    def _weights(self, weights: Union[nn.Module, Iterable[torch.Tensor]]) -> List[torch.Tensor]:
        ws = regularised_weights(weights) if isinstance(weights, nn.Module) else list(weights)
        if not ws:
            raise ValueError("HyperSparseLoss got no weights.")
        return ws

    @torch.no_grad()
    def scale(self, weights: Union[nn.Module, Iterable[torch.Tensor]]) -> torch.Tensor:
        """``s = 0.6585 / |w|_(kappa)`` for the current weights (a detached scalar)."""
        flat = torch.cat([w.detach().abs().flatten().float() for w in self._weights(weights)])
        k = max(1, int(math.floor(self.kappa * flat.numel())))
        thr = flat.kthvalue(k).values
        # an all-zero low end (weights already pruned) would give s = inf and NaN gradients
        thr = thr.clamp_min(torch.finfo(torch.float32).eps * float(flat.max().clamp_min(1e-30)))
        return SCALE_CONSTANT / thr

    def forward(self, weights: Union[nn.Module, Iterable[torch.Tensor]]) -> torch.Tensor:
        ws = self._weights(weights)
        s = self.scale(ws)
        l1 = sum(w.abs().sum() for w in ws)
        T = sum(torch.tanh(s.to(w.device, w.dtype) * w.abs()).sum() for w in ws)
        return l1 * T / T.detach() - l1
