"""The CUDA side of ``sparsevit::bsr_linear``: availability checks and launchers of its two GPU
implementations, used by :mod:`sparsevit.ops.linear_kernels` (``cuda_bsr``, ``triton_bsr``).

* ``cuda_bsr``: ``torch.ops.sparsevit_C.bsr_linear_cuda`` (``csrc/cuda/bsr_linear.cu``, WMMA tensor
  cores, fp16/bf16, tile sides 16/32/64), present when the extension was built with CUDA;
* ``triton_bsr``: :func:`sparsevit.kernels.bsr_linear_triton`, wrapped here as the custom op
  ``sparsevit::bsr_linear_triton`` so it stays opaque (and traceable through its fake impl) under
  ``torch.compile``.
"""
from typing import List, Optional

import torch
from torch import Tensor

from sparsevit import _ext
from sparsevit.ops.linear_kernels import ACT_CODE

try:
    from sparsevit import kernels as _kernels
except Exception as exc:  # noqa: BLE001 - the CPU and reference paths must keep working
    _kernels = None
    _KERNELS_ERROR = f"sparsevit.kernels failed to import ({type(exc).__name__}: {exc})"
else:
    _KERNELS_ERROR = None



def cuda_cpp_reasons(device_index: Optional[int] = None) -> List[str]:
    """Why the CUDA C++ kernel cannot run on this build / GPU (empty: it can)."""
    if not _ext.HAS_CUDA_EXTENSION:
        return ["CUDA C++ kernels not built: " + (_ext.LOAD_ERROR or "extension built without CUDA")]
    if not _ext.has_op("bsr_linear_cuda"):
        return [_ext.unavailable_reason("bsr_linear_cuda")]
    if torch.cuda.is_available() and torch.cuda.get_device_capability(device_index or 0)[0] < 8:
        return ["the CUDA C++ kernel needs sm_80+"]
    return []


def triton_reasons() -> List[str]:
    """Why the Triton kernel cannot run in this install (empty: it can)."""
    if _kernels is None:
        return [_KERNELS_ERROR]
    if not _kernels.HAS_TRITON:
        return [_kernels.TRITON_UNAVAILABLE_REASON]
    return []


@torch.library.custom_op("sparsevit::bsr_linear_triton", mutates_args=())
def _bsr_linear_triton_op(x: Tensor, values: Tensor, col_indices: Tensor, crow_indices: Tensor,
                          out_features: int, bias: Optional[Tensor], activation: str) -> Tensor:
    return _kernels.bsr_linear_triton(x, values, col_indices, crow_indices, out_features, bias,
                                      None if activation == "none" else activation)


@_bsr_linear_triton_op.register_fake
def _(x, values, col_indices, crow_indices, out_features, bias, activation):
    return x.new_empty((*x.shape[:-1], out_features))


def _register_cpp_fake() -> None:
    if not _ext.has_op("bsr_linear_cuda"):
        return
    try:
        @torch.library.register_fake("sparsevit_C::bsr_linear_cuda")
        def _(x, values, col_indices, crow_indices, out_features, bias, activation):
            return x.new_empty((*x.shape[:-1], out_features))
    except Exception:  # noqa: BLE001 - already registered (module reloaded)
        pass


_register_cpp_fake()


def run_cuda_cpp(x: Tensor, values: Tensor, col_indices: Tensor, crow_indices: Tensor, out_features: int,
                 bias: Optional[Tensor], act: str) -> Tensor:
    return torch.ops.sparsevit_C.bsr_linear_cuda(x, values, col_indices.to(torch.int32),
                                                 crow_indices.to(torch.int32), int(out_features), bias,
                                                 ACT_CODE[act])
