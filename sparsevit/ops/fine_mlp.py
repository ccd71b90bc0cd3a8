"""``sparsevit::fine_mlp``: ``fc2(act(fc1(x)))`` with both weights fine-grained sparse, in one call.

At 90% sparsity about a third of a :func:`~sparsevit.ops.fine_linear.fine_linear` call is fixed cost
that sparsity does not shrink, and in a ViT MLP most of it moves the hidden activation (4x the block
width): fc1 transposes its output from the kernel's tokens-in-lanes layout back to ``[T, hidden]``
and fc2 immediately packs it into that layout again. The fused op keeps the hidden activation in
the packed layout (one token tile at a time, in the owning thread's L2): fc1 leaves its finished
rows where fc2 reads them. Same micro-kernels, same summation order and (bf16) the same rounding of
the hidden activation, so it returns exactly what two ``fine_linear`` calls return (NaN/Inf
included: a non-finite input or hidden value reruns the call unfused, whose fix-up gives the dense
semantics).

* float32 and bfloat16 on CPU; :func:`not_fusable_reasons` says why a pair of layers is not fused,
  and they then run as two ``fine_linear`` calls;
* default implementation (any device without the kernel): the two layers' reference paths;
* eager CPU inference calls the compiled kernel directly (see ``eager_cpu_call_ok``).
"""
from typing import List, Optional

import torch

from sparsevit import _ext
from sparsevit.formats.fine import FineSparseWeight
from sparsevit.ops.fine_linear import _reference, cpp_kernel_takes_dtype, not_supported_reasons
from sparsevit.ops.linear_kernels import ACT_CODE, eager_cpu_call_ok, run_mlp_wrapper, token_rows

__all__ = ["fine_mlp", "not_fusable_reasons", "fused_mlp_forward", "direct_pair_ok", "run_direct_pair"]


def _reference_mlp(x, v1, c1, r1, s1, b1, hidden, act1, v2, c2, r2, s2, b2, out_features, in_features):
    h = _reference(x, v1, c1, r1, hidden, in_features, b1, act1)
    return _reference(h, v2, c2, r2, out_features, hidden, b2, "none")


@torch.library.custom_op("sparsevit::fine_mlp", mutates_args=())
def _fine_mlp_op(x: torch.Tensor, values1: torch.Tensor, col_indices1: torch.Tensor, row_ptr1: torch.Tensor,
                 seg_ptr1: torch.Tensor, bias1: Optional[torch.Tensor], hidden: int, activation: str,
                 values2: torch.Tensor, col_indices2: torch.Tensor, row_ptr2: torch.Tensor, seg_ptr2: torch.Tensor,
                 bias2: Optional[torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
    return _reference_mlp(x, values1, col_indices1, row_ptr1, seg_ptr1, bias1, hidden, activation, values2,
                          col_indices2, row_ptr2, seg_ptr2, bias2, out_features, in_features)


@_fine_mlp_op.register_fake
def _(x, values1, col_indices1, row_ptr1, seg_ptr1, bias1, hidden, activation, values2, col_indices2, row_ptr2,
      seg_ptr2, bias2, out_features, in_features):
    torch._check(x.dim() == 2, lambda: "sparsevit::fine_mlp takes x as [tokens, in_features]")
    return x.new_empty(x.shape[0], out_features)


def _kernel_takes(dtype: torch.dtype, values1, values2) -> bool:
    return _ext.has_op("fine_mlp") and cpp_kernel_takes_dtype(dtype, values1) and cpp_kernel_takes_dtype(dtype, values2)


def _cpp_fine_mlp(x, v1, c1, r1, s1, b1, hidden, act1, v2, c2, r2, s2, b2, out_features, in_features):
    return torch.ops.sparsevit_C.fine_mlp(x, v1, c1, s1, b1, hidden, v1.shape[1], ACT_CODE[act1], v2, c2, s2,
                                          b2, out_features, in_features, v2.shape[1], -1)


def _fine_mlp_cpu(x, v1, c1, r1, s1, b1, hidden, act1, v2, c2, r2, s2, b2, out_features, in_features):
    args = (x, v1, c1, r1, s1, b1, hidden, act1, v2, c2, r2, s2, b2, out_features, in_features)
    return _cpp_fine_mlp(*args) if _kernel_takes(x.dtype, v1, v2) else _reference_mlp(*args)


def _op_args(x2d, w1: FineSparseWeight, b1, act: str, w2: FineSparseWeight, b2) -> tuple:
    """The op's arguments, in its schema's order."""
    return (x2d, w1.values, w1.col_indices, w1.row_ptr, w1.seg_ptr, b1, w1.shape[0], act, w2.values,
            w2.col_indices, w2.row_ptr, w2.seg_ptr, b2, w2.shape[0], w1.shape[1])


_fine_mlp_op.register_kernel("cpu")(_fine_mlp_cpu)
torch.library.register_autocast("sparsevit::fine_mlp", "cpu", torch.bfloat16)  # as fine_linear does


def not_fusable_reasons(x: torch.Tensor, w1: FineSparseWeight, w2: FineSparseWeight) -> List[str]:
    """Why fc1 (``w1``) and fc2 (``w2``) cannot run as one fused call on ``x`` (empty: they can)."""
    reasons = [] if _ext.has_op("fine_mlp") else [_ext.unavailable_reason("fine_mlp")]
    for name, w in (("fc1", w1), ("fc2", w2)):
        reasons += [f"{name}: {why}" for why in not_supported_reasons(x, w)]
    if w2.shape[1] != w1.shape[0]:
        reasons.append(f"fc2 takes {w2.shape[1]} features, fc1 gives {w1.shape[0]}")
    return reasons


def fine_mlp(x: torch.Tensor, w1: FineSparseWeight, b1: Optional[torch.Tensor], activation: Optional[str],
             w2: FineSparseWeight, b2: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(act(F.linear(x, w1, b1)), w2, b2)`` with fine-grained sparse ``w1``, ``w2``.

    Args:
        x: ``[..., in_features]`` float32 or bfloat16 on CPU for the fused kernel (else: the reference).
        w1, b1: fc1's :class:`~sparsevit.formats.fine.FineSparseWeight` ``(hidden, in)`` and bias.
        activation: ``None``, ``"gelu"`` or ``"gelu_tanh"``, applied to fc1's output.
        w2, b2: fc2's weight ``(out, hidden)`` and bias.

    Returns:
        ``[..., out]``: exactly ``fine_linear(fine_linear(x, w1, b1, activation), w2, b2)``.
    """
    return run_mlp_wrapper("fine_mlp", x, w1, b1, activation, w2, b2, FineSparseWeight, "FineSparseWeight.from_dense(linear.weight, mask, tile=1)", _op_args,
                           _fine_mlp_cpu, _fine_mlp_op)


def _cpp_fine_layer(m) -> bool:
    return getattr(m, "is_fine", False) and m.kernel != "reference"


def direct_pair_ok(fc1, fc2, dtype: torch.dtype) -> bool:
    """Whether :func:`fused_mlp_forward` runs ``fc1``/``fc2`` as one compiled call for an eager CPU input
    of ``dtype`` with ``act`` and ``norm`` None (it depends on nothing else of the input; the lean block
    path asks once per forward and then calls :func:`run_direct_pair`)."""
    if not (_cpp_fine_layer(fc1) and _cpp_fine_layer(fc2)) or fc2.in_features != fc1.out_features:
        return False
    return _kernel_takes(dtype, fc1._buffers["values"], fc2._buffers["values"])


def run_direct_pair(fc1, fc2, x2d: torch.Tensor) -> torch.Tensor:
    """``sparsevit_C::fine_mlp`` on ``x2d`` ``[tokens, in]`` with the two modules' buffers (where
    :func:`direct_pair_ok` holds; the op checks every argument)."""
    a, b = fc1._buffers, fc2._buffers
    return _cpp_fine_mlp(x2d, a["values"], a["col_indices"], a["row_ptr"], a["seg_ptr"], a["bias"], fc1.out_features,
                         fc1.activation or "none", b["values"], b["col_indices"], b["row_ptr"], b["seg_ptr"], b["bias"],
                         fc2.out_features, fc1.in_features)


def fused_mlp_forward(fc1, act, norm, fc2, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``fc2(act(fc1(x)))`` through the fused kernel when both layers are fine-grained
    :class:`~sparsevit.runtime.linear.SparseLinear` modules on the compiled kernel, fc1 fuses the
    activation (``act`` and ``norm`` are None) and this is an eager CPU call the kernel takes; else None
    (the caller runs the layers one by one). Traced and exported graphs keep the per-layer ops."""
    if act is not None or norm is not None or not direct_pair_ok(fc1, fc2, x.dtype):
        return None
    if x.shape[-1] != fc1.in_features:
        return None
    if not (eager_cpu_call_ok(x, fc1.values, fc1.bias) and eager_cpu_call_ok(x, fc2.values, fc2.bias)):
        return None
    y = run_direct_pair(fc1, fc2, token_rows(x, fc1.in_features))
    return y.reshape(*x.shape[:-1], fc2.out_features)
