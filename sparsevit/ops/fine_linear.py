"""``sparsevit::fine_linear``: ``act(x @ W^T + b)`` with ``W`` a :class:`~sparsevit.formats.fine.FineSparseWeight`.

For unstructured masks and narrow 1x4 / 1x8 tiles at 60-95% sparsity, where block-sparse (BSR)
kernels have nothing to skip. Schema (the canonical fields plus the kernel's segment pointers):

    fine_linear(Tensor x, Tensor values, Tensor col_indices, Tensor row_ptr, Tensor seg_ptr,
                int out_features, int in_features, Tensor? bias, str activation) -> Tensor

* default implementation: the PyTorch reference (dense reconstruction + ``F.linear``), used on any
  device without a kernel and on CPU when the compiled extension or the ISA is missing;
* CPU: ``torch.ops.sparsevit_C.fine_linear`` (csrc/cpu/sparse_fine*.cpp: tokens in the vector lanes,
  AVX-512 / AVX512_BF16 / AVX2 chosen at run time, fused bias + GELU, OpenMP over token tiles x rows);
* a fake (meta) implementation so it traces under ``torch.compile``; CPU autocast runs it in bf16;
* eager CPU inference (no grad, autocast, trace or dispatch mode) calls the compiled kernel directly
  from :func:`fine_linear`, skipping the custom-op dispatcher's per-call cost (same kernel, same result).

:func:`not_supported_reasons` says why the compiled kernel would not take an input (the chooser
puts that in the per-layer report); the op itself then runs the reference, never something else.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F

from sparsevit import _ext
from sparsevit.formats.fine import FineSparseWeight, unit_width
from sparsevit.ops.bsr import apply_activation
from sparsevit.ops.linear_kernels import (ACT_CODE, ACTIVATIONS, check_linear_inputs, eager_cpu_call_ok,  # noqa: F401
                                          token_rows)

__all__ = ["fine_linear", "reference_fine_linear", "not_supported_reasons", "cpp_kernel_name", "ACTIVATIONS"]

_CPP_DTYPES = (torch.float32, torch.bfloat16)


def _dense_weight(values, col_indices, row_ptr, out_features, in_features):
    unit = values.shape[1]
    rp = row_ptr.to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(out_features, device=values.device), rp[1:] - rp[:-1],
                                   output_size=values.shape[0])
    full = values.new_zeros(out_features, -(-in_features // unit) * unit)
    cols = col_indices.to(torch.int64).unsqueeze(1) + torch.arange(unit, device=values.device)
    full[rows.unsqueeze(1).expand_as(cols), cols] = values
    return full[:, :in_features]


def _reference(x, values, col_indices, row_ptr, out_features, in_features, bias, activation):
    w = _dense_weight(values, col_indices, row_ptr, out_features, in_features)
    return apply_activation(F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype)), activation)


def reference_fine_linear(x2d: torch.Tensor, w: FineSparseWeight, bias: Optional[torch.Tensor] = None,
                          activation: Optional[str] = None) -> torch.Tensor:
    """PyTorch reference of ``act(x2d @ W^T + b)``: what the fast kernel is tested against."""
    return _reference(x2d, w.values, w.col_indices, w.row_ptr, w.shape[0], w.shape[1], bias,
                      "none" if activation is None else activation)


@torch.library.custom_op("sparsevit::fine_linear", mutates_args=())
def _fine_linear_op(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                    seg_ptr: torch.Tensor, out_features: int, in_features: int, bias: Optional[torch.Tensor],
                    activation: str) -> torch.Tensor:
    return _reference(x, values, col_indices, row_ptr, out_features, in_features, bias, activation)


@_fine_linear_op.register_fake
def _(x, values, col_indices, row_ptr, seg_ptr, out_features, in_features, bias, activation):
    torch._check(x.dim() == 2, lambda: "sparsevit::fine_linear takes x as [tokens, in_features]")
    return x.new_empty(x.shape[0], out_features)


_CPP_READY = []  # [bool] once probed: compiled op present and the CPU has AVX2+FMA at least


def _cpp_ready() -> bool:
    if not _CPP_READY:
        _CPP_READY.append(bool(_ext.has_op("fine_linear") and torch.ops.sparsevit_C.fine_linear_isa(-1)))
    return _CPP_READY[0]


def _kernel_takes(dtype: torch.dtype, values) -> bool:
    unit = values.shape[1] if values.dim() == 2 else 0
    return (dtype in _CPP_DTYPES and values.dtype == dtype and unit in (1, 2, 4, 8)
            and not (dtype == torch.bfloat16 and unit % 2))


def cpp_kernel_takes(x: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the op's CPU implementation runs the compiled kernel for these inputs (else the
    reference); the AOTInductor export asks the same question before it calls the kernel itself."""
    return cpp_kernel_takes_dtype(x.dtype, values)


def cpp_kernel_takes_dtype(dtype: torch.dtype, values: torch.Tensor) -> bool:
    """:func:`cpp_kernel_takes` for any input of ``dtype`` (it depends on nothing else of the input)."""
    return _cpp_ready() and _kernel_takes(dtype, values)


def cpp_fine_linear(x2d, values, col_indices, seg_ptr, bias, out_features: int, in_features: int,
                    activation: str) -> torch.Tensor:
    """The compiled kernel's call (where :func:`cpp_kernel_takes` holds; the op checks every argument)."""
    return torch.ops.sparsevit_C.fine_linear(x2d, values, col_indices, seg_ptr, bias, out_features, in_features,
                                             values.shape[1], ACT_CODE[activation], -1)


def _fine_linear_cpu(x, values, col_indices, row_ptr, seg_ptr, out_features, in_features, bias, activation):
    if cpp_kernel_takes(x, values):
        return cpp_fine_linear(x, values, col_indices, seg_ptr, bias, out_features, in_features, activation)
    return _reference(x, values, col_indices, row_ptr, out_features, in_features, bias, activation)


_fine_linear_op.register_kernel("cpu")(_fine_linear_cpu)
# Under torch.autocast("cpu") the op runs in the autocast dtype (bf16), like F.linear does. A weight
# packed for fp32 with tile 1 has no column pairs, so it then takes the reference path; pre-convert
# with w.to(dtype=torch.bfloat16) to keep the compiled kernel.
torch.library.register_autocast("sparsevit::fine_linear", "cpu", torch.bfloat16)


def cpp_kernel_name() -> Optional[str]:
    """Name of the compiled CPU kernel this machine runs (e.g. ``cpp_fine_avx512_bf16``), or None."""
    if not _ext.has_op("fine_linear"):
        return None
    return torch.ops.sparsevit_C.fine_linear_isa(-1) or None


def not_supported_reasons(x: torch.Tensor, w: FineSparseWeight) -> List[str]:
    """Why the compiled CPU kernel cannot take ``x`` with weight ``w`` (empty list: it can)."""
    reasons = []
    if not _ext.has_op("fine_linear"):
        reasons.append(_ext.unavailable_reason("fine_linear"))
    elif not torch.ops.sparsevit_C.fine_linear_isa(-1):
        reasons.append("CPU lacks AVX2+FMA")
    if x.device.type != "cpu" or w.device.type != "cpu":
        reasons.append(f"input on {x.device}, weight on {w.device}: the fine-grained kernel is CPU only")
    if x.dtype not in _CPP_DTYPES:
        reasons.append(f"dtype {x.dtype} (fine-grained kernel: float32, bfloat16)")
    if w.dtype != x.dtype:
        reasons.append(f"weight dtype {w.dtype} != input dtype {x.dtype}; convert with w.to(dtype=...)")
    elif w.unit != unit_width(w.tile, x.dtype):
        reasons.append(f"weight packed with unit {w.unit}, {x.dtype} needs {unit_width(w.tile, x.dtype)}")
    return reasons


def fine_linear(x: torch.Tensor, w: FineSparseWeight, bias: Optional[torch.Tensor] = None,
                activation: Optional[str] = None) -> torch.Tensor:
    """``act(x @ W^T + bias)`` with a fine-grained sparse weight, fused in one kernel where available.

    Args:
        x: ``[..., in_features]``, same dtype and device as ``w`` (float32/bfloat16 on CPU use the C++
            kernel; anything else uses the PyTorch reference).
        w: :class:`sparsevit.formats.fine.FineSparseWeight` of logical shape ``(out_features, in_features)``.
        bias: optional ``[out_features]``.
        activation: ``None``, ``"gelu"`` (``nn.GELU()``) or ``"gelu_tanh"``, applied in fp32 before
            the output is rounded.

    Returns:
        ``[..., out_features]`` in ``x.dtype``; equals ``act(F.linear(x, w.to_dense(), bias))`` up to
        rounding, NaN/Inf in ``x`` included (they propagate exactly as through the dense product).
    """
    act = check_linear_inputs(x, w, bias, activation, FineSparseWeight,
                              "FineSparseWeight.from_dense(linear.weight, mask, tile=1)")
    lead = x.shape[:-1]
    x2d = token_rows(x, w.shape[1])
    args = (x2d, w.values, w.col_indices, w.row_ptr, w.seg_ptr, w.shape[0], w.shape[1], bias, act)
    # eager CPU inference: the op's CPU implementation without the op's Python dispatch (~18 us a call)
    y = _fine_linear_cpu(*args) if eager_cpu_call_ok(x2d, w.values, bias) else _fine_linear_op(*args)
    return y.reshape(*lead, w.shape[0])
