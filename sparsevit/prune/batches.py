"""Reading (images, labels) batches and the default loss: shared by scoring and fine-tuning."""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def default_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer labels, mean squared error for anything else."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if target.dtype in (torch.long, torch.int, torch.int64, torch.int32):
        return F.cross_entropy(out, target)
    return F.mse_loss(out, target)


def iter_batches(data: Iterable, num_batches: Optional[int]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of the first ``num_batches`` batches (all when None); dict batches with
    ``image``/``pixel_values`` and ``label``/``labels`` keys are accepted too."""
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            return
        if isinstance(batch, dict):
            yield batch.get("image", batch.get("pixel_values")), batch.get("label", batch.get("labels"))
        else:
            yield batch[0], batch[1]


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
