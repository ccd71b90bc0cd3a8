"""``sparsevit::bsr_mlp``: ``fc2(act(fc1(x)))`` with both weights block-sparse, in one call.

Two :func:`~sparsevit.ops.bsr.bsr_linear` calls write fc1's ``[tokens, hidden]`` output (4x the block
width in a ViT: 9.7 MB fp32 for DeiT-S at batch 8, far above L2) and fc2 reads it back, so both pass
through L3/DRAM. The fused op (csrc/cpu/bsr_mlp.cpp) runs fc1 then fc2 per group of token tiles, the
hidden tile staying in the thread's L2 in the row-major layout fc2's kernel reads in place. Same
micro-kernels, same per-element summation order and (bf16) the same rounding of the hidden
activation: it returns exactly what two ``bsr_linear`` calls return, NaN/Inf included (a non-finite
input or hidden value reruns the call unfused, whose fix-up gives the dense semantics).

* float32 and bfloat16 on CPU, blocks at least 9 rows high in both layers (the row-major kernel);
  :func:`not_fusable_reasons` says why a pair cannot be fused;
* default implementation (any device without the kernel): the two layers' reference paths;
* whether a pair runs fused is a measured choice (:mod:`sparsevit.runtime.mlp_pair`), marked on fc1
  as ``fc1.fuse_bsr_mlp = True`` and honoured by :func:`bsr_mlp_forward`.
"""
from typing import List, Optional

import torch

from sparsevit import _ext
from sparsevit.formats import packed_block_rows
from sparsevit.formats.bsr import BlockSparseWeight
from sparsevit.ops.linear_kernels import ACT_CODE, Reference, eager_cpu_call_ok, run_mlp_wrapper

__all__ = ["bsr_mlp", "not_fusable_reasons", "bsr_mlp_forward", "run_direct_pair", "FUSED_FLAG"]

FUSED_FLAG = "fuse_bsr_mlp"  # attribute set on fc1 when the measured choice is the fused pair
_MIN_PACKED_ROWS = 16  # kernel A (row-major activations) runs packed block heights >= 16


def _reference_mlp(x, v1, c1, r1, p1, b1, hidden, act1, v2, c2, r2, p2, b2, out_features, in_features, bh1, bw1,
                   bh2, bw2):
    h = Reference.run_bsr(x, v1, c1, r1, p1, hidden, in_features, bh1, bw1, b1, act1)
    return Reference.run_bsr(h, v2, c2, r2, p2, out_features, hidden, bh2, bw2, b2, "none")


@torch.library.custom_op("sparsevit::bsr_mlp", mutates_args=())
def _bsr_mlp_op(x: torch.Tensor, values1: torch.Tensor, col_indices1: torch.Tensor, crow_indices1: torch.Tensor,
                packed1: torch.Tensor, bias1: Optional[torch.Tensor], hidden: int, activation: str,
                values2: torch.Tensor, col_indices2: torch.Tensor, crow_indices2: torch.Tensor, packed2: torch.Tensor,
                bias2: Optional[torch.Tensor], out_features: int, in_features: int, bh1: int, bw1: int, bh2: int,
                bw2: int) -> torch.Tensor:
    return _reference_mlp(x, values1, col_indices1, crow_indices1, packed1, bias1, hidden, activation, values2,
                          col_indices2, crow_indices2, packed2, bias2, out_features, in_features, bh1, bw1, bh2, bw2)


@_bsr_mlp_op.register_fake
def _(x, values1, col_indices1, crow_indices1, packed1, bias1, hidden, activation, values2, col_indices2,
      crow_indices2, packed2, bias2, out_features, in_features, bh1, bw1, bh2, bw2):
    torch._check(x.dim() == 2, lambda: "sparsevit::bsr_mlp takes x as [tokens, in_features]")
    return x.new_empty(x.shape[0], out_features)


def _kernel_takes(x: torch.Tensor, packed1: torch.Tensor, packed2: torch.Tensor) -> bool:
    """The compiled op runs this call (fused, or as two bsr_linear calls where the blocks do not fuse)."""
    return (_ext.has_op("bsr_mlp") and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and packed1.dtype == x.dtype and packed2.dtype == x.dtype)


def _fuses(packed1: torch.Tensor, packed2: torch.Tensor) -> bool:
    """Both layers on the row-major kernel with the same token tile (see :func:`not_fusable_reasons`)."""
    return packed1.shape[2] == packed2.shape[2] >= _MIN_PACKED_ROWS


def _cpp_bsr_mlp(x, v1, c1, r1, p1, b1, hidden, act1, v2, c2, r2, p2, b2, out_features, in_features, bh1, bw1,
                 bh2, bw2):
    return torch.ops.sparsevit_C.bsr_mlp(x, p1, c1, r1, b1, hidden, bh1, bw1, ACT_CODE[act1], p2, c2, r2, b2,
                                         out_features, in_features, bh2, bw2, -1, 0)


def _bsr_mlp_cpu(*args):
    x, p1, p2 = args[0], args[4], args[11]
    return _cpp_bsr_mlp(*args) if _kernel_takes(x, p1, p2) else _reference_mlp(*args)


_bsr_mlp_op.register_kernel("cpu")(_bsr_mlp_cpu)
torch.library.register_autocast("sparsevit::bsr_mlp", "cpu", torch.bfloat16)  # as bsr_linear does


def _op_args(x2d, w1: BlockSparseWeight, b1, act: str, w2: BlockSparseWeight, b2) -> tuple:
    """The op's arguments, in its schema's order."""
    return (x2d, w1.values, w1.col_indices, w1.crow_indices, w1.packed, b1, w1.shape[0], act, w2.values,
            w2.col_indices, w2.crow_indices, w2.packed, b2, w2.shape[0], w1.shape[1], *w1.block, *w2.block)


def not_fusable_reasons(x: torch.Tensor, w1: BlockSparseWeight, w2: BlockSparseWeight) -> List[str]:
    """Why fc1 (``w1``) and fc2 (``w2``) cannot run as one fused call on ``x`` (empty: they can)."""
    reasons = [] if _ext.has_op("bsr_mlp") else [_ext.unavailable_reason("bsr_mlp")]
    if x.device.type != "cpu":
        reasons.append(f"the fused op runs on CPU, x is on {x.device}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        reasons.append(f"dtype {x.dtype} (takes float32, bfloat16)")
    if w2.shape[1] != w1.shape[0]:
        reasons.append(f"fc2 takes {w2.shape[1]} features, fc1 gives {w1.shape[0]}")
    rows = [packed_block_rows(w.block[0]) for w in (w1, w2)]
    if min(rows) < _MIN_PACKED_ROWS:
        reasons.append(f"blocks {w1.block[0]}x{w1.block[1]} / {w2.block[0]}x{w2.block[1]}: both layers need blocks "
                       "at least 9 rows high (the fused op reads the hidden tile row-major)")
    elif rows[0] != rows[1]:
        reasons.append(f"fc1 and fc2 block heights {w1.block[0]} and {w2.block[0]} pack to different register "
                       "tiles; the fused op runs both layers on the same token tiles")
    return reasons


def bsr_mlp(x: torch.Tensor, w1: BlockSparseWeight, b1: Optional[torch.Tensor], activation: Optional[str],
            w2: BlockSparseWeight, b2: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(act(F.linear(x, w1, b1)), w2, b2)`` with block-sparse ``w1``, ``w2``.

    Args:
        x: ``[..., in_features]`` float32 or bfloat16 on CPU for the fused kernel (else: the reference).
        w1, b1: fc1's :class:`~sparsevit.formats.BlockSparseWeight` ``(hidden, in)`` and bias.
        activation: ``None``, ``"gelu"`` or ``"gelu_tanh"``, applied to fc1's output.
        w2, b2: fc2's weight ``(out, hidden)`` and bias.

    Returns:
        ``[..., out]``: exactly ``bsr_linear(bsr_linear(x, w1, b1, activation), w2, b2)`` on the C++
        kernel (a pair :func:`not_fusable_reasons` rejects runs as those two calls).
    """
    return run_mlp_wrapper("bsr_mlp", x, w1, b1, activation, w2, b2, BlockSparseWeight, "BlockSparseWeight.from_dense(linear.weight, block=(32, 32))", _op_args,
                           _bsr_mlp_cpu, _bsr_mlp_op)


def run_direct_pair(fc1, direct1: tuple, fc2, direct2: tuple, x2d: torch.Tensor) -> torch.Tensor:
    """``sparsevit_C::bsr_mlp`` on ``x2d`` with two :class:`~sparsevit.runtime.linear.SparseLinear`
    modules' buffers and their ``direct_args()`` (out, in, bh, bw, act, isa): the fused counterpart of
    ``fc2.run_direct(fc1.run_direct(x2d, direct1), direct2)`` (the op checks every argument)."""
    a, b = fc1._buffers, fc2._buffers
    return torch.ops.sparsevit_C.bsr_mlp(x2d, a["packed"], a["col_indices"], a["crow_indices"], a["bias"], direct1[0],
                                         direct1[2], direct1[3], direct1[4], b["packed"], b["col_indices"],
                                         b["crow_indices"], b["bias"], direct2[0], direct1[1], direct2[2],
                                         direct2[3], direct1[5], 0)


def fused_pair_args(fc1, fc2):
    """``(direct1, direct2)`` when ``fc1`` is marked fused and both layers would run the C++ BSR kernel
    (fc2 without an activation) on their current device and dtype; else None."""
    if not fc1.__dict__.get(FUSED_FLAG) or not _ext.has_op("bsr_mlp"):
        return None
    d1, d2 = fc1.direct_args(), fc2.direct_args()
    if not d1 or not d2 or d2[4] != 0 or d1[0] != d2[1]:
        return None
    p1, p2 = fc1._buffers["packed"], fc2._buffers["packed"]
    if not (_kernel_takes(fc1._buffers["values"], p1, p2) and _fuses(p1, p2)):
        return None
    return d1, d2


def bsr_mlp_forward(fc1, act, norm, fc2, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``fc2(act(fc1(x)))`` through the fused kernel when fc1 is marked fused (``FUSED_FLAG``, set by
    the pair chooser), both are BSR :class:`~sparsevit.runtime.linear.SparseLinear` modules on the C++
    kernel, fc1 fuses the activation (``act`` and ``norm`` are None) and this is an eager CPU call;
    else None (the caller runs the layers one by one). Traced graphs keep the per-layer ops."""
    if act is not None or norm is not None:
        return None
    pair = fused_pair_args(fc1, fc2)
    if pair is None or x.shape[-1] != pair[0][1]:
        return None
    b1 = fc1._buffers
    if not (eager_cpu_call_ok(x, b1["values"], b1["bias"]) and eager_cpu_call_ok(x, fc2._buffers["values"],
                                                                                   fc2._buffers["bias"])):
        return None
    y = run_direct_pair(fc1, pair[0], fc2, pair[1], x.reshape(-1, pair[0][1]))
    return y.view(*x.shape[:-1], pair[1][0])
