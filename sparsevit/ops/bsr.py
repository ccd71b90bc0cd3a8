"""``sparsevit::bsr_linear``: ``act(x @ W^T + b)`` with ``W`` a :class:`~sparsevit.formats.BlockSparseWeight`.

One schema, carrying everything any implementation needs (the canonical BSR fields for GPU
kernels, the pre-packed values for the CPU kernel) and the implementation to run:

    bsr_linear(Tensor x, Tensor values, Tensor col_indices, Tensor crow_indices, Tensor packed,
               int out_features, int in_features, int bh, int bw, Tensor? bias, str activation,
               str kernel) -> Tensor

``kernel`` is a name from :mod:`sparsevit.ops.linear_kernels` (``"cpp_bsr"``, ``"triton_bsr"``,
``"cuda_bsr"``, ``"reference"``) or ``"auto"``: the first implementation in the registry's
priority order that can run the input on its device (C++ on CPU; CUDA C++, then Triton on CUDA),
else the PyTorch reference. A named kernel that cannot run raises
:class:`~sparsevit.errors.KernelError` with the reasons. This module registers the CPU and CUDA
implementations, the fake (meta) one (``torch.compile``, ``.to("meta")``) and the autocast rule
(inputs cast to the autocast dtype, like ``F.linear``); every other device runs the reference.

``x`` reaching the op is 2-D ``[tokens, in_features]``; :func:`bsr_linear` flattens leading dims.
In plain eager CPU calls (no autograd, autocast, tracing or dispatch mode) :func:`bsr_linear` runs
the resolved implementation without the op's Python dispatch, which costs more than a small layer.
"""
from typing import Optional

import torch

from sparsevit.formats import format_string
from sparsevit.formats.bsr import BlockSparseWeight
from sparsevit.ops._autocast import register_autocast
from sparsevit.ops.linear_kernels import (ACTIVATIONS, KernelInput, Reference, apply_activation,  # noqa: F401
                                          check_linear_inputs, eager_cpu_call_ok, resolve, token_rows)

__all__ = ["bsr_linear", "reference_bsr_linear", "apply_activation", "ACTIVATIONS"]


def reference_bsr_linear(x2d: torch.Tensor, w: BlockSparseWeight, bias: Optional[torch.Tensor] = None,
                         activation: Optional[str] = None) -> torch.Tensor:
    """PyTorch reference of ``act(x2d @ W^T + b)``: what every fast kernel is tested against."""
    return Reference.run_bsr(x2d, w.values, w.col_indices, w.crow_indices, w.packed, w.shape[0], w.shape[1],
                             w.block[0], w.block[1], bias, "none" if activation is None else activation)


@torch.library.custom_op("sparsevit::bsr_linear", mutates_args=())
def _bsr_linear_op(x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
                   crow_indices: torch.Tensor, packed: torch.Tensor, out_features: int,
                   in_features: int, bh: int, bw: int, bias: Optional[torch.Tensor],
                   activation: str, kernel: str) -> torch.Tensor:
    # devices without a registered implementation
    return Reference.run_bsr(x, values, col_indices, crow_indices, packed, out_features, in_features, bh,
                             bw, bias, activation)


def _dispatch(x, values, col_indices, crow_indices, packed, out_features, in_features, bh, bw, bias,
              activation, kernel):
    inp = KernelInput(x.device.type, x.dtype, format_string("bsr", (bh, bw)),
                      None if activation == "none" else activation, x.device.index)
    impl = resolve(inp, kernel)  # cached per input description
    return impl.run_bsr(x, values, col_indices, crow_indices, packed, out_features, in_features, bh, bw,
                        bias, activation)


_bsr_linear_op.register_kernel("cpu")(_dispatch)
_bsr_linear_op.register_kernel("cuda")(_dispatch)


@_bsr_linear_op.register_fake
def _(x, values, col_indices, crow_indices, packed, out_features, in_features, bh, bw, bias, activation,
      kernel):
    torch._check(x.dim() == 2, lambda: "sparsevit::bsr_linear takes x as [tokens, in_features]")
    return x.new_empty(x.shape[0], out_features)


register_autocast("sparsevit::bsr_linear", "lower")


def bsr_linear(x: torch.Tensor, w: BlockSparseWeight, bias: Optional[torch.Tensor] = None,
               activation: Optional[str] = None, kernel: str = "auto") -> torch.Tensor:
    """``act(x @ W^T + bias)`` with a block-sparse weight, fused in one kernel where available.

    Args:
        x: ``[..., in_features]``, same dtype and device as ``w`` (under ``torch.autocast`` both are
            cast to the autocast dtype, as for ``F.linear``).
        w: :class:`sparsevit.formats.BlockSparseWeight` of logical shape ``(out_features, in_features)``.
        bias: optional ``[out_features]``.
        activation: ``None``, ``"gelu"`` (``nn.GELU()``, erf form) or ``"gelu_tanh"``
            (``nn.GELU(approximate="tanh")``), applied in fp32 before the output is rounded.
        kernel: ``"auto"`` or an implementation name (see the module docstring).

    Returns:
        ``[..., out_features]``; equals ``act(F.linear(x, w.to_dense(), bias))`` up to rounding,
        NaN/Inf in ``x`` included.
    """
    act = check_linear_inputs(x, w, bias, activation, BlockSparseWeight,
                              "BlockSparseWeight.from_dense(linear.weight, block=(32, 32))")
    lead = x.shape[:-1]
    x2d = token_rows(x, w.shape[1])
    args = (x2d, w.values, w.col_indices, w.crow_indices, w.packed, w.shape[0], w.shape[1], w.block[0],
            w.block[1], bias, act, kernel)
    y = _dispatch(*args) if eager_cpu_call_ok(x2d, w.values, bias) else _bsr_linear_op(*args)
    return y.reshape(*lead, w.shape[0])
