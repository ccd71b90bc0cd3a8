"""Residual-subset ops of P3B-style plans: a branch reads some residual channels and writes others.

``layernorm_gather`` fuses the gather into the norm before the branch (statistics over all channels,
output only for the channels the branch reads); ``residual_scatter_add`` adds the branch output back
into its channels of the residual stream. Both are custom ops with a C++ CPU kernel (each token row
read from memory once, no intermediate full-width tensor) and a PyTorch reference path.
``residual_add_layernorm`` does a branch's write-back (full or scattered) and the next branch's norm
(full or gathered) in one pass over each row, in eager CPU inference; elsewhere it is the composition
of the ops above.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from sparsevit import _ext
from sparsevit.ops._autocast import register_autocast
from sparsevit.ops.linear_kernels import eager_cpu_call_ok


def _ln_gather_reference(x, weight, bias, index, eps):
    acc = torch.promote_types(x.dtype, torch.float32)  # half inputs accumulate in fp32, like F.layer_norm
    var, mean = torch.var_mean(x.to(acc), dim=-1, keepdim=True, unbiased=False)
    y = (x.index_select(-1, index).to(acc) - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


@torch.library.custom_op("sparsevit::layernorm_gather", mutates_args=())
def _layernorm_gather(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      index: torch.Tensor, eps: float) -> torch.Tensor:
    if x.device.type == "cpu" and _ext.has_op("layernorm_gather") and x.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.sparsevit_C.layernorm_gather(x.contiguous(), weight, bias, index, eps)
    return _ln_gather_reference(x, weight, bias, index, eps)


@_layernorm_gather.register_fake
def _(x, weight, bias, index, eps):
    return x.new_empty((*x.shape[:-1], index.shape[0]))


@torch.library.custom_op("sparsevit::residual_scatter_add", mutates_args=())
def _residual_scatter_add(x: torch.Tensor, index: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and _ext.has_op("residual_scatter_add") and x.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.sparsevit_C.residual_scatter_add(x.contiguous(), index, y.contiguous())
    return x.index_add(-1, index, y.to(x.dtype))


@_residual_scatter_add.register_fake
def _(x, index, y):
    return torch.empty_like(x)


@torch.library.custom_op("sparsevit::residual_scatter_add_", mutates_args=("x",))
def _residual_scatter_add_(x: torch.Tensor, index: torch.Tensor, y: torch.Tensor) -> None:
    if x.device.type == "cpu" and _ext.has_op("residual_scatter_add_") and x.dtype in (torch.float32, torch.bfloat16) \
            and x.is_contiguous():
        torch.ops.sparsevit_C.residual_scatter_add_(x, index, y)
    else:
        x.index_add_(-1, index, y.to(x.dtype))


@_residual_scatter_add_.register_fake
def _(x, index, y):
    return None


# Under torch.autocast these behave like the aten ops they replace: the norm runs in float32 (as
# layer_norm does), the scatter-add promotes to the wider dtype (as add does), and the in-place
# variant keeps the residual stream's dtype.
register_autocast("sparsevit::layernorm_gather", "fp32")
register_autocast("sparsevit::residual_scatter_add", "promote")
register_autocast("sparsevit::residual_scatter_add_", "first")


def layernorm_gather(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     index: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``layer_norm(x)[..., index]`` without materialising the full-width normalised tensor.

    ``weight`` and ``bias`` are already gathered (length ``len(index)``); statistics run over all of
    ``x``'s last dim, exactly as the masked dense model's norm does.
    """
    if index.dtype != torch.long:
        raise TypeError(f"layernorm_gather: index must be int64 (got {index.dtype}); use index.long().")
    return _layernorm_gather(x, weight, bias, index, float(eps))


def residual_scatter_add(x: torch.Tensor, index: torch.Tensor, y: torch.Tensor, *,
                         inplace: bool = False) -> torch.Tensor:
    """``x`` with ``y`` added into channels ``index`` of its last dim.

    Out of place by default; ``inplace=True`` updates and returns ``x`` itself (saves a full copy of
    the residual stream when the caller owns ``x``).
    """
    if y.shape[-1] != index.shape[0] or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"residual_scatter_add: y {tuple(y.shape)} does not fit x {tuple(x.shape)} with "
                         f"{index.shape[0]} indices; y's last dim must equal len(index).")
    if inplace:
        _residual_scatter_add_(x, index, y)
        return x
    return _residual_scatter_add(x, index, y)


# dtypes the fused kernel runs for inside models: it beats add + layer_norm in float32 (1.2x at DeiT-S
# width, batch 8, bench/profile_forward.py --compare-unfused), and in bfloat16 for full-width rows (a
# plain pre-norm block), which have an AVX-512 row (1.3x ATen's bf16 add + layer_norm at [8, 197, 384],
# one thread, CPU time). bf16 rows with a write or read subset (P3B plans) take the generic row,
# which measured 0.9-1.0x of ATen, so they keep the separate ops.
FUSED_ADD_NORM_DTYPES = (torch.float32, torch.bfloat16)
_FULL_WIDTH_ONLY_DTYPES = (torch.bfloat16,)
_fusion = {"enabled": True}


@contextlib.contextmanager
def add_norm_fusion(enabled: bool):
    """Turn the fused add+norm kernel on/off inside the ``with`` (for side-by-side timing)."""
    before = _fusion["enabled"]
    _fusion["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _fusion["enabled"] = before


def _fused_add_norm_ok(x: torch.Tensor, y: torch.Tensor, write: Optional[torch.Tensor],
                       read: Optional[torch.Tensor]) -> bool:
    """Whether the C++ add+norm kernel takes these inputs (eager CPU inference, same dtype, and for
    bf16 full-width rows only; traced graphs keep the separate ops, which the compilers and exporters
    know)."""
    return fused_add_norm_indices_ok(x.dtype, write, read) and fused_add_norm_call_ok(x, y)


def fused_add_norm_indices_ok(dtype: torch.dtype, write: Optional[torch.Tensor], read: Optional[torch.Tensor]) -> bool:
    """The part of :func:`_fused_add_norm_ok` that depends on the channel subsets: bf16 rows are fused
    at full width only."""
    return dtype not in _FULL_WIDTH_ONLY_DTYPES or (write is None and read is None)


def fused_add_norm_call_ok(x: torch.Tensor, y: torch.Tensor) -> bool:
    """The part of :func:`_fused_add_norm_ok` that depends on the call, not on the channel subsets
    (a caller that runs many add+norms on one residual stream may ask it once)."""
    return (_fusion["enabled"] and x.dtype in FUSED_ADD_NORM_DTYPES and y.device.type == "cpu"
            and eager_cpu_call_ok(x, y) and _ext.has_op("residual_add_layernorm"))


def residual_add_layernorm(x: torch.Tensor, y: torch.Tensor, write: Optional[torch.Tensor],
                           weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           read: Optional[torch.Tensor], eps: float = 1e-5, *, inplace: bool = False):
    """``(x2, layer_norm(x2)[..., read])`` with ``x2 = x`` plus ``y`` added into channels ``write``.

    The write-back of a branch into the residual stream and the next branch's norm in one pass over
    each row (C++ kernel, CPU, dtypes :data:`FUSED_ADD_NORM_DTYPES` (bfloat16: without ``write`` and
    ``read``; the kernel itself takes them: ``torch.ops.sparsevit_C.residual_add_layernorm``),
    statistics in float32 over the full row). ``write`` /
    ``read`` are ``None`` for all channels; ``weight``/``bias`` have one entry per read channel.
    ``inplace=True`` updates and returns ``x`` itself. Elsewhere (other dtypes, autograd, autocast, mixed dtypes,
    other devices, and under torch.compile/export/tracing, whose graphs keep the separate ops) it is
    the composition of the separate ops, so the result is the same.
    """
    for name, idx in (("write", write), ("read", read)):
        if idx is not None and idx.dtype != torch.long:
            raise TypeError(f"residual_add_layernorm: {name} index must be int64 (got {idx.dtype}); use .long().")
    width = x.shape[-1] if write is None else write.shape[0]
    if y.shape[-1] != width or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"residual_add_layernorm: y {tuple(y.shape)} does not fit x {tuple(x.shape)} with "
                         f"{width} written channels; y's last dim must equal len(write) (or x's width).")
    if _fused_add_norm_ok(x, y, write, read) and (not inplace or x.is_contiguous()):
        C = torch.ops.sparsevit_C
        if inplace:
            return x, C.residual_add_layernorm_(x, y.contiguous(), write, weight, bias, read, float(eps))
        return C.residual_add_layernorm(x.contiguous(), y.contiguous(), write, weight, bias, read, float(eps))
    if write is None:
        x = x.add_(y) if inplace else x + y
    else:
        x = residual_scatter_add(x, write, y, inplace=inplace)
    if read is None:
        return x, torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return x, layernorm_gather(x, weight, bias, read, eps)
