"""sparsevit's custom ops written as standard ONNX operators (onnxscript, opset 18).

Each function mirrors the op's PyTorch reference implementation in :mod:`sparsevit.ops` and is
handed to ``torch.onnx.export(custom_translation_table=...)``; the exporter traces it with the
op's inputs, so ``None`` optional inputs are plain Python ``None`` here. Only standard operators
are used (no com.microsoft contrib ops), so ONNX Runtime, OpenVINO and TensorRT all take them.

``sparsevit::bsr_linear`` has no entry on purpose: sparse weights are densified (or refused)
before export, at module level, where the layer's name is known.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from onnxscript import ir
from onnxscript import opset18 as op


def layernorm_gather(x, weight, bias, index, eps: float):
    """``layer_norm(x)[..., index]``: statistics over all channels, output for ``index`` only."""
    axes = op.Constant(value_ints=[-1])
    mean = op.ReduceMean(x, axes, keepdims=1)
    centered = op.Sub(x, mean)
    var = op.ReduceMean(op.Mul(centered, centered), axes, keepdims=1)
    inv_std = op.Reciprocal(op.Sqrt(op.Add(var, op.CastLike(op.Constant(value_float=eps), var))))
    y = op.Mul(op.Sub(op.Gather(x, index, axis=-1), mean), inv_std)
    if weight is not None:
        y = op.Mul(y, weight)
    if bias is not None:
        y = op.Add(y, bias)
    return y


def residual_scatter_add(x, index, y):
    """``x.index_add(-1, index, y)`` for the unique indices a plan holds: gather, add, scatter back
    (ScatterElements without a reduction, which every ONNX backend supports)."""
    updated = op.Add(op.Gather(x, index, axis=-1), y)
    indices = op.Expand(index, op.Shape(y))
    return op.ScatterElements(x, indices, updated, axis=-1)


def attention(q, k, v, attn_bias, scale: float):
    """``softmax(q k^T * scale + attn_bias) v`` for ``[B, H, N, D]`` inputs (a bool bias masks)."""
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])),
                    op.CastLike(op.Constant(value_float=scale), q))
    if attn_bias is not None:
        if attn_bias.dtype == ir.DataType.BOOL:
            scores = op.Where(attn_bias, scores, op.CastLike(op.Constant(value_float=float("-inf")), q))
        else:
            scores = op.Add(scores, op.CastLike(attn_bias, q))
    return op.MatMul(op.Softmax(scores, axis=-1), v)


def translation_table() -> Dict[Callable, Callable]:
    """``{torch.ops.sparsevit.<op>.default: onnxscript function}`` for ``torch.onnx.export``."""
    import sparsevit.ops.attention  # noqa: F401  (registers the ops the table refers to)
    import sparsevit.ops.residual  # noqa: F401

    ops = torch.ops.sparsevit
    return {
        ops.layernorm_gather.default: layernorm_gather,
        ops.residual_scatter_add.default: residual_scatter_add,
        ops.attention.default: attention,
    }
