"""``sparsevit::bsr_linear``: ``act(x @ W^T + b)`` with ``W`` a :class:`~sparsevit.formats.BlockSparseWeight`.

One schema, carrying everything any kernel needs (the canonical BSR fields for GPU kernels, the
pre-packed values for the CPU kernel):

    bsr_linear(Tensor x, Tensor values, Tensor col_indices, Tensor crow_indices, Tensor packed,
               int out_features, int in_features, int bh, int bw, Tensor? bias, str activation)

* the default implementation is the PyTorch reference (:func:`reference_bsr_linear`), used for any
  device without a registered kernel and on CPU when the compiled extension is missing;
* CPU: ``torch.ops.sparsevit_C.bsr_linear`` (csrc/cpu/bsr_linear.cpp, AVX-512/AVX2, fp32 and bf16);
* CUDA: registered from another module with ``torch.library.register_kernel("sparsevit::bsr_linear",
  "cuda", fn)``;
* a fake (meta) implementation so the op traces under ``torch.compile``.

``x`` reaching the op is 2-D ``[tokens, in_features]``; :func:`bsr_linear` flattens leading dims.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from sparsevit import _ext
from sparsevit.formats.bsr import BlockSparseWeight, packed_block_rows

__all__ = ["bsr_linear", "reference_bsr_linear", "apply_activation", "cpp_kernel_name",
           "cpp_unsupported_reasons", "ACTIVATIONS"]

ACTIVATIONS = (None, "gelu", "gelu_tanh")
_ACT_CODE = {"none": 0, "gelu": 1, "gelu_tanh": 2}
_CPP_DTYPES = (torch.float32, torch.bfloat16)


def apply_activation(y: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """``nn.GELU()`` for ``"gelu"``, ``nn.GELU(approximate="tanh")`` for ``"gelu_tanh"``, identity
    for ``None`` / ``"none"``."""
    if activation in (None, "none"):
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    raise ValueError(f"activation must be one of None, 'gelu', 'gelu_tanh'; got {activation!r}")


def _reference(x2d, values, col_indices, crow_indices, out_features, in_features, bh, bw, bias,
               activation):
    """Dense reconstruction + F.linear: exact to dense-torch rounding in the input dtype."""
    nbr, nbc = -(-out_features // bh), -(-in_features // bw)
    counts = (crow_indices[1:] - crow_indices[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(nbr, device=values.device), counts,
                                   output_size=values.shape[0])
    full = values.new_zeros(nbr, nbc, bh, bw)
    full[rows, col_indices.long()] = values
    w = full.transpose(1, 2).reshape(nbr * bh, nbc * bw)[:out_features, :in_features]
    return apply_activation(F.linear(x2d, w, bias), activation)


def reference_bsr_linear(x2d: torch.Tensor, w: BlockSparseWeight, bias: Optional[torch.Tensor] = None,
                         activation: Optional[str] = None) -> torch.Tensor:
    """PyTorch reference of ``act(x2d @ W^T + b)``: what every fast kernel is tested against."""
    return _reference(x2d, w.values, w.col_indices, w.crow_indices, w.shape[0], w.shape[1],
                      w.block[0], w.block[1], bias, activation)


@torch.library.custom_op("sparsevit::bsr_linear", mutates_args=())
def _bsr_linear_op(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                   crow_indices: torch.Tensor, packed: torch.Tensor, out_features: int,
                   in_features: int, bh: int, bw: int, bias: Optional[torch.Tensor],
                   activation: str) -> torch.Tensor:
    return _reference(x, values, col_indices, crow_indices, out_features, in_features, bh, bw, bias,
                      activation)


@_bsr_linear_op.register_fake
def _(x, values, col_indices, crow_indices, packed, out_features, in_features, bh, bw, bias,
      activation):
    torch._check(x.dim() == 2, lambda: "sparsevit::bsr_linear takes x as [tokens, in_features]")
    return x.new_empty(x.shape[0], out_features)


def cpp_unsupported_reasons(x: torch.Tensor, w: BlockSparseWeight) -> list:
    """Why the compiled CPU kernel cannot take this input (empty list: it can)."""
    reasons = []
    if not _ext.has_op("bsr_linear"):
        reasons.append(_ext.unavailable_reason("bsr_linear"))
    elif not torch.ops.sparsevit_C.bsr_linear_isa(-1):
        reasons.append("CPU lacks AVX2+FMA")
    if x.device.type != "cpu":
        reasons.append(f"input on {x.device}, the C++ kernel is CPU only")
    if x.dtype not in _CPP_DTYPES:
        reasons.append(f"dtype {x.dtype} (C++ kernel: float32, bfloat16)")
    if w.packed.shape[2] != packed_block_rows(w.block[0]):
        reasons.append("packed layout does not match the block height")
    return reasons


def cpp_kernel_name() -> Optional[str]:
    """Name of the compiled CPU kernel this machine runs (e.g. ``cpp_bsr_avx512_bf16``), or None."""
    if not _ext.has_op("bsr_linear"):
        return None
    return torch.ops.sparsevit_C.bsr_linear_isa(-1) or None


_CPP_READY = []  # [bool] once probed: compiled op present and the CPU has AVX2+FMA at least


def _cpp_ready() -> bool:
    if not _CPP_READY:
        _CPP_READY.append(bool(_ext.has_op("bsr_linear") and torch.ops.sparsevit_C.bsr_linear_isa(-1)))
    return _CPP_READY[0]


def _bsr_linear_cpu(x, values, col_indices, crow_indices, packed, out_features, in_features, bh, bw,
                    bias, activation):
    if (_cpp_ready() and x.dtype in _CPP_DTYPES and packed.dtype == x.dtype
            and packed.dim() == 4 and packed.shape[2] == packed_block_rows(bh)):
        return torch.ops.sparsevit_C.bsr_linear(x, packed, col_indices, crow_indices, bias,
                                                out_features, in_features, bh, bw,
                                                _ACT_CODE[activation], -1)
    return _reference(x, values, col_indices, crow_indices, out_features, in_features, bh, bw, bias,
                      activation)


_bsr_linear_op.register_kernel("cpu")(_bsr_linear_cpu)


def _check_inputs(x: torch.Tensor, w: BlockSparseWeight, bias: Optional[torch.Tensor],
                  activation: Optional[str]) -> str:
    if not isinstance(w, BlockSparseWeight):
        raise TypeError(f"w must be a sparsevit.formats.BlockSparseWeight, got {type(w).__name__}; "
                        f"build one with BlockSparseWeight.from_dense(linear.weight, block=(32, 32))")
    if activation not in ACTIVATIONS and activation != "none":
        raise ValueError(f"activation must be one of None, 'gelu', 'gelu_tanh'; got {activation!r}")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features (shape {tuple(x.shape)}) but the "
                         f"weight expects in_features={w.shape[1]} (weight shape {w.shape})")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weight is on {w.device}; move one of them, "
                         f"e.g. w = w.to(device=x.device)")
    if x.dtype != w.dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {w.dtype}; cast one of them, e.g. "
                        f"w = w.to(dtype=x.dtype) (re-packs) or x.to({w.dtype})")
    if bias is not None:
        if bias.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != x.device or bias.dtype != x.dtype:
            raise TypeError(f"bias is {bias.dtype} on {bias.device}, x is {x.dtype} on {x.device}; "
                            f"use bias.to(x)")
    return "none" if activation is None else activation


def bsr_linear(x: torch.Tensor, w: BlockSparseWeight, bias: Optional[torch.Tensor] = None,
               activation: Optional[str] = None) -> torch.Tensor:
    """``act(x @ W^T + bias)`` with a block-sparse weight, fused in one kernel where available.

    Args:
        x: ``[..., in_features]``, same dtype and device as ``w`` (float32/bfloat16 use the C++ CPU
            kernel; other dtypes and devices without a kernel use the PyTorch reference).
        w: :class:`sparsevit.formats.BlockSparseWeight` of logical shape ``(out_features, in_features)``.
        bias: optional ``[out_features]``.
        activation: ``None``, ``"gelu"`` (``nn.GELU()``, erf form) or ``"gelu_tanh"``
            (``nn.GELU(approximate="tanh")``), applied in fp32 before the output is rounded.

    Returns:
        ``[..., out_features]`` in ``x.dtype``; equals ``act(F.linear(x, w.to_dense(), bias))`` up to
        rounding.
    """
    act = _check_inputs(x, w, bias, activation)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, w.shape[1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y = _bsr_linear_op(x2d, w.values, w.col_indices, w.crow_indices, w.packed, w.shape[0], w.shape[1],
                       w.block[0], w.block[1], bias, act)
    return y.reshape(*lead, w.shape[0])
