"""``sparsevit::nm_linear``: ``act(x @ W^T + b)`` with ``W`` an :class:`~sparsevit.formats.NMSparseWeight`.

    nm_linear(Tensor x, Tensor values, Tensor indices, int out_features, int in_features, int n,
              int m, Tensor? bias, str activation, str kernel) -> Tensor

The N:M counterpart of :mod:`sparsevit.ops.bsr` with the same conventions (``kernel`` is
``"auto"`` or a name from :mod:`sparsevit.ops.linear_kernels`: ``"semi_structured_2_4"`` on CUDA,
``"reference"`` anywhere). torch's 2:4 kernels take a compressed weight object that cannot be a
module buffer, so it is built from the canonical tensors on first use and cached here per weight
(keyed by storage and version: an in-place update or a move makes a new one).
"""
from typing import Dict, Optional, Tuple

import torch

from sparsevit.formats import NMSparseWeight
from sparsevit.ops._autocast import register_autocast
from sparsevit.ops.linear_kernels import KernelInput, Reference, resolve

__all__ = ["nm_linear", "semi_structured_weight"]

_SEMI_CACHE: Dict[Tuple, torch.Tensor] = {}
_SEMI_CACHE_SIZE = 256


def semi_structured_weight(values: torch.Tensor, indices: torch.Tensor, shape, n: int, m: int):
    """torch's semi-structured form of an N:M weight, cached per (storage, version, dtype)."""
    key = (values.untyped_storage().data_ptr(), values._version, values.dtype, values.device,
           indices.untyped_storage().data_ptr(), indices._version, tuple(shape))
    w = _SEMI_CACHE.get(key)
    if w is None:
        if len(_SEMI_CACHE) >= _SEMI_CACHE_SIZE:
            _SEMI_CACHE.clear()
        w = NMSparseWeight(values, indices, shape, n, m).to_semi_structured()
        _SEMI_CACHE[key] = w
    return w


@torch.library.custom_op("sparsevit::nm_linear", mutates_args=())
def _nm_linear_op(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, out_features: int,
                  in_features: int, n: int, m: int, bias: Optional[torch.Tensor], activation: str,
                  kernel: str) -> torch.Tensor:
    return Reference.run_nm(x, values, indices, out_features, in_features, n, m, bias, activation)


def _dispatch(x, values, indices, out_features, in_features, n, m, bias, activation, kernel):
    inp = KernelInput(x.device.type, x.dtype, f"{n}:{m}", None if activation == "none" else activation,
                      x.device.index)
    return resolve(inp, kernel).run_nm(x, values, indices, out_features, in_features, n, m, bias, activation)


_nm_linear_op.register_kernel("cpu")(_dispatch)
_nm_linear_op.register_kernel("cuda")(_dispatch)


@_nm_linear_op.register_fake
def _(x, values, indices, out_features, in_features, n, m, bias, activation, kernel):
    return x.new_empty(x.shape[0], out_features)


register_autocast("sparsevit::nm_linear", "lower")


def nm_linear(x: torch.Tensor, w: NMSparseWeight, bias: Optional[torch.Tensor] = None,
              activation: Optional[str] = None, kernel: str = "auto") -> torch.Tensor:
    """``act(x @ W^T + bias)`` with an N:M weight; ``x`` is ``[..., in_features]``."""
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects in_features={w.shape[1]}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, w.shape[1])
    y = _nm_linear_op(x2d, w.values, w.indices, w.shape[0], w.shape[1], w.n, w.m, bias,
                      "none" if activation is None else activation, kernel)
    return y.reshape(*lead, w.shape[0])
