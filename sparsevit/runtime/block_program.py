"""The lean block path as one compiled call (``sparsevit_C::lean_vit_blocks``, csrc/cpu/lean_blocks.cpp).

:func:`runtime.modules._lean_forward` runs a ViT's blocks as straight op calls; where every call of
every block is one of the ops the C++ loop knows (qkv and proj on the BSR kernel, the MLP as the
fused ``bsr_mlp`` pair or two BSR calls, the fused CPU attention, the fused residual add + norm),
:func:`block_program` packs their arguments once per forward and the loop runs in C++: the same ops on
the same arguments in the same order, so the output is bit-identical, without ~13 Python-level op
calls and views a block (DeiT-S on 2 cores, batch 1, interleaved A/B: combined plan 7.02 -> 6.74 ms,
32x32 blocks 70% 12.44 -> 12.19 ms). Anything else (fine-grained or dense layers, an unfused norm, an attention the kernel does not take) returns
None and the Python loop runs as before.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from sparsevit import _ext
from sparsevit.ops.bsr_mlp import fused_pair_args
from sparsevit.ops.cpu_attention import not_supported_reasons as attention_unsupported
from sparsevit.runtime.linear import SparseLinear

Program = Tuple[List[Optional[torch.Tensor]], List[int], List[float]]


def _bsr(lin, dtype) -> Optional[tuple]:
    """(packed, col, crow, bias), direct args of a SparseLinear whose lean call is the direct BSR call
    (what :meth:`SparseLinear.lean_call` returns for it); else None."""
    if type(lin) is not SparseLinear or lin._forward_hooks or lin._forward_pre_hooks:
        return None
    b = lin._buffers
    if b["values"].dtype != dtype:
        return None
    direct = lin.direct_args()
    if not direct:
        return None
    return (b["packed"], b["col_indices"], b["crow_indices"], b["bias"]), direct


def _mlp(mlp, dtype) -> Optional[tuple]:
    """(kind, fc1 layer, fc2 layer): kind 0 where the lean path makes one fused bsr_mlp call, 1 where it
    makes two BSR calls (modules._lean_mlp; its fused fine-grained pair needs fine layers, which _bsr
    refuses); None for anything else."""
    fc1, fc2 = mlp._modules.get("fc1"), mlp._modules.get("fc2")
    first, second = _bsr(fc1, dtype), _bsr(fc2, dtype)
    if first is None or second is None:
        return None
    return (0 if fused_pair_args(fc1, fc2) is not None else 1), first, second


def block_program(parts, x: torch.Tensor, add_norm_args) -> Optional[Program]:
    """The arguments of ``lean_vit_blocks`` for the blocks in ``parts`` (modules._lean_parts) on ``x``,
    or None where one step is not one of its ops. ``add_norm_args(io, reader, dtype)`` is the lean
    path's own choice of the fused add+norm arguments (None: not fused)."""
    if not _ext.has_op("lean_vit_blocks"):
        return None
    B, N, _ = x.shape
    tensors: List[Optional[torch.Tensor]] = []
    ints: List[int] = []
    floats: List[float] = []
    for i, (blk, attn_io, mlp_io, attention, _qkv, _proj, _mlp_call) in enumerate(parts):
        am = attention._modules
        qkv, proj = _bsr(am.get("qkv"), x.dtype), _bsr(am.get("proj"), x.dtype)
        mlp = _mlp(blk._modules["mlp"], x.dtype)
        attn_norm = add_norm_args(attn_io, mlp_io, x.dtype)
        last = i + 1 == len(parts)
        mlp_norm = (None,) * 4 + (0.0,) if last else add_norm_args(mlp_io, parts[i + 1][1], x.dtype)
        if qkv is None or proj is None or mlp is None or attn_norm is None or mlp_norm is None:
            return None
        H, d = attention.num_heads, attention.qk_dim
        probe = torch.empty((), dtype=x.dtype).expand(B, H, N, d)  # shape and dtype only: no memory
        if attention_unsupported(probe, probe, probe):
            return None
        kind, fc1, fc2 = mlp
        tensors += [*qkv[0], *proj[0], *fc1[0], *fc2[0], *attn_norm[:4], *mlp_norm[:4]]
        ints += [H, d, kind, *qkv[1], *proj[1], *fc1[1], *fc2[1]]
        floats += [float(attention.scale), float(attn_norm[4]), float(mlp_norm[4])]
    return tensors, ints, floats


def run_program(x: torch.Tensor, normed: torch.Tensor, program: Program) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x after all blocks but the last MLP write-back, that MLP's output): see lean_blocks.cpp."""
    return torch.ops.sparsevit_C.lean_vit_blocks(x, normed, *program)
