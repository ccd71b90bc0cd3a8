"""Find the layers of an accelerated model that still hold sparse weights, and densify them.

Structured plans leave plain sliced ``nn.Linear``s that every runtime understands; unstructured
plans leave packed block-sparse (BSR) or 2:4 weights that only sparsevit's kernels (or cuSPARSELt)
can run. Exporters that target other runtimes (ONNX) must either refuse those layers or turn them
back into dense Linears; this module does both, by duck typing so it does not depend on the
internals of each sparse module class:

* a module is *sparse* when it is not an ``nn.Linear`` and has a ``to_dense`` method (the BSR
  modules), or holds a parameter/buffer that is a tensor subclass (2:4 semi-structured weights);
* its dense weight comes from ``to_dense()`` (an ``nn.Linear`` or a tensor) or from the
  subclass weight's own ``to_dense()``; ``bias`` and the fused ``activation`` attribute are kept.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn

from sparsevit.errors import UnsupportedModelError

_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)
_GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def _has_subclass_tensor(module: nn.Module) -> bool:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return any(type(t) not in _PLAIN_TENSOR_TYPES for t in tensors)


def is_sparse_layer(module: nn.Module) -> bool:
    """True for a layer whose weight is stored in a sparse format (BSR, packed, 2:4)."""
    if isinstance(module, nn.Linear) and not _has_subclass_tensor(module):
        return False
    return callable(getattr(module, "to_dense", None)) or _has_subclass_tensor(module)


def sparse_layers(model: nn.Module) -> List[Tuple[str, str]]:
    """``(qualified name, class name)`` of every sparse layer in ``model``, in module order."""
    found = []
    for name, module in model.named_modules():
        if is_sparse_layer(module) and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, type(module).__name__))
    return found


def _dense_weight(name: str, module: nn.Module) -> torch.Tensor:
    to_dense = getattr(module, "to_dense", None)
    if callable(to_dense):
        dense = to_dense()
        dense = dense.weight if isinstance(dense, nn.Module) else dense
    else:
        weight = getattr(module, "weight", None)
        dense = weight.to_dense() if callable(getattr(weight, "to_dense", None)) else None
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
        raise UnsupportedModelError(
            f"{name}: cannot densify a {type(module).__name__} (no dense 2-D weight from to_dense()); "
            f"re-accelerate the model with backend='dense' to export it.")
    return dense.detach()


def dense_equivalent(name: str, module: nn.Module) -> nn.Module:
    """A plain ``nn.Linear`` (followed by its fused GELU, if any) computing what ``module`` does."""
    weight = _dense_weight(name, module)
    bias: Optional[torch.Tensor] = getattr(module, "bias", None)
    activation = getattr(module, "activation", None)
    if activation not in (None, "none", *_GELU_APPROXIMATE):
        raise UnsupportedModelError(f"{name}: unknown fused activation {activation!r}; cannot densify it.")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.detach().to(weight.dtype))
    linear.requires_grad_(False)
    if activation in (None, "none"):
        return linear
    return nn.Sequential(linear, nn.GELU(approximate=_GELU_APPROXIMATE[activation]))


def densified(model: nn.Module) -> Tuple[nn.Module, List[Tuple[str, str, float]]]:
    """A copy of ``model`` with every sparse layer replaced by its dense equivalent.

    Returns the copy and, per replaced layer, ``(name, class name, fraction of zero weights)``:
    the sparsity the dense layer now multiplies through.
    """
    out = copy.deepcopy(model)
    replaced = []
    for name, cls_name in sparse_layers(out):
        dense = dense_equivalent(name, out.get_submodule(name))
        first = dense[0] if isinstance(dense, nn.Sequential) else dense
        zeros = float((first.weight == 0).float().mean())
        parent_name, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent_name), attr, dense)
        replaced.append((name, cls_name, zeros))
    return out, replaced
