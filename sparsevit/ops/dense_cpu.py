"""Dense CPU Linear candidates, for the chooser to time against each other and against sparse kernels.

``F.linear`` in fp32 runs on MKL, which takes no AVX-512 path on AMD CPUs (about 40% of the
machine's FMA peak, see ``bench/cpu_kernels.py``); oneDNN through torch with a weight reordered
once into its blocked layout runs the same product near peak, and sparsevit's own BSR kernel on a
full (density 1.0) weight sits in between. None is best everywhere, so the chooser measures:

    for cand in dense_candidates(linear.weight, linear.bias, activation="gelu"):
        if cand.not_supported_reasons:            # goes to the per-layer report
            continue
        module = cand.build()                     # nn.Module: forward(x[..., in]) -> [..., out]
        ...time module(x) ...

Candidates (``DenseCandidate.name``):

* ``"torch_linear"``  ``act(F.linear(x, W, b))``: MKL (fp32) / oneDNN (bf16) as torch picks; always
  supported, the baseline.
* ``"onednn_packed"`` ``torch.ops.mkldnn._linear_pointwise`` on a weight prepacked with
  ``torch.ops.mkldnn._reorder_linear_weight``, bias and GELU fused by oneDNN. CPU, float32/bfloat16.
  The packed weight is an opaque MKLDNN tensor: rebuild it from the dense weight after loading a
  checkpoint (the module keeps the plain weight as its state).
* ``"sparsevit_bsr_full"`` ``ops.bsr_linear`` on ``BlockSparseWeight.from_dense(W, block=(32, 32))``
  (every block kept), bias and GELU fused. CPU, float32/bfloat16.

Every module computes ``act(x @ W^T + b)`` in ``x``'s dtype (weights are cast to the dtype given to
:func:`dense_candidates`); they are for inference (no autograd through the oneDNN path).
"""
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsevit.ops.bsr import apply_activation

__all__ = ["DenseCandidate", "dense_candidates", "CANDIDATE_NAMES", "ACTIVATIONS"]

ACTIVATIONS = (None, "gelu", "gelu_tanh")
CANDIDATE_NAMES = ("torch_linear", "onednn_packed", "sparsevit_bsr_full")
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_ONEDNN_ACT = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


class DenseCandidate(NamedTuple):
    """One way to run a dense Linear: ``build()`` makes the module; empty reasons = it can run."""
    name: str
    build: Callable[[], nn.Module]
    not_supported_reasons: List[str]


class TorchLinear(nn.Module):
    """``act(F.linear(x, W, b))`` (MKL / oneDNN as torch dispatches)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str]):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.activation = "none" if activation is None else activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_activation(F.linear(x, self.weight, self.bias), self.activation)


class OneDNNPackedLinear(nn.Module):
    """oneDNN inner product on a weight reordered once into oneDNN's blocked layout, act fused."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str]):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.attr, self.algorithm = _ONEDNN_ACT[activation]
        self.out_features, self.in_features = weight.shape
        self.repack()

    def repack(self) -> None:
        """Re-derives the packed weight from ``self.weight`` (after loading or moving it)."""
        self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(x2d, self._packed, self.bias, self.attr, [], self.algorithm)
        return y.reshape(*lead, self.out_features)


class BsrFullLinear(nn.Module):
    """sparsevit's BSR kernel on a weight whose every 32x32 block is kept."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str]):
        super().__init__()
        from sparsevit.formats import BlockSparseWeight

        self.weight_bsr = BlockSparseWeight.from_dense(weight.detach(), block=(32, 32))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sparsevit.ops.bsr import bsr_linear

        return bsr_linear(x, self.weight_bsr, self.bias, self.activation)


def _onednn_reasons(weight: torch.Tensor, dtype: torch.dtype) -> List[str]:
    reasons = []
    if weight.device.type != "cpu":
        reasons.append(f"weight on {weight.device}: the oneDNN path is CPU only")
    if dtype not in _ONEDNN_DTYPES:
        reasons.append(f"dtype {dtype} (oneDNN path: float32, bfloat16)")
    if not torch.backends.mkldnn.is_available():
        reasons.append("this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    elif not (hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        reasons.append("this torch lacks torch.ops.mkldnn._linear_pointwise / _reorder_linear_weight")
    elif dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        reasons.append("oneDNN reports no bfloat16 support on this CPU")
    return reasons


def _bsr_reasons(weight: torch.Tensor, dtype: torch.dtype) -> List[str]:
    from sparsevit import _ext

    reasons = []
    if weight.device.type != "cpu":
        reasons.append(f"weight on {weight.device}: this candidate list is for CPU layers")
    if not _ext.has_op("bsr_linear"):
        reasons.append(_ext.unavailable_reason("bsr_linear") + "; bsr_linear would run its dense reference")
    if dtype not in (torch.float32, torch.bfloat16):
        reasons.append(f"dtype {dtype} (CPU BSR kernel: float32, bfloat16)")
    return reasons


def dense_candidates(weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     activation: Optional[str] = None, dtype: Optional[torch.dtype] = None
                     ) -> List[DenseCandidate]:
    """Every dense way to run ``act(x @ weight^T + bias)``, each with why it cannot run (if so).

    Args:
        weight: ``[out, in]`` (``nn.Linear.weight``), already masked/sliced as the model needs.
        bias: optional ``[out]``.
        activation: ``None``, ``"gelu"`` (erf, ``nn.GELU()``) or ``"gelu_tanh"``; fused where the
            backend can.
        dtype: the dtype the layer will run in (default ``weight.dtype``); weight and bias are cast.

    Returns:
        ``[DenseCandidate(name, build, not_supported_reasons)]`` in :data:`CANDIDATE_NAMES` order.
        ``build()`` must only be called when ``not_supported_reasons`` is empty.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of None, 'gelu', 'gelu_tanh'; got {activation!r}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    dtype = weight.dtype if dtype is None else dtype
    w = weight.detach().to(dtype)
    b = None if bias is None else bias.detach().to(dtype)
    return [
        DenseCandidate("torch_linear", lambda: TorchLinear(w, b, activation), []),
        DenseCandidate("onednn_packed", lambda: OneDNNPackedLinear(w, b, activation), _onednn_reasons(w, dtype)),
        DenseCandidate("sparsevit_bsr_full", lambda: BsrFullLinear(w, b, activation), _bsr_reasons(w, dtype)),
    ]
