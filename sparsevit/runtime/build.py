"""Builds the sparse replacement of one block from the values its adapter hands out.

Nothing here reads a timm module: the adapter slices the weights (``sliced_attention`` /
``sliced_mlp``) and names the attention scale, activation, rel-pos index and Swin windows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sparsevit.models.base import BlockInfo, ResolvedBlock
from sparsevit.models.masking import MaskedLayerNorm
from sparsevit.runtime.linear import LinearFactory
from sparsevit.runtime.mlp_pair import choose_mlp_pair
from sparsevit.runtime.modules import (BranchIO, ConstBranch, SparseAttention, SparseBlock, SparseMlp, SparseSwinBlock,
                                       ZeroPaddedLayerNorm, head_norm)
from sparsevit.runtime.report import LayerDecision, Report


def sliced_layernorm(norm: nn.Module, keep: torch.Tensor) -> nn.LayerNorm:
    """A LayerNorm over ``keep`` channels of ``norm`` (a LayerNorm or a MaskedLayerNorm)."""
    if not isinstance(norm, (nn.LayerNorm, MaskedLayerNorm)):
        from sparsevit.errors import UnsupportedModelError

        raise UnsupportedModelError(f"expected a LayerNorm on the residual stream, found {type(norm).__name__}")
    w, b = norm.weight, norm.bias
    out = nn.LayerNorm(len(keep), eps=norm.eps, elementwise_affine=w is not None, bias=b is not None,
                       device=(w.device if w is not None else None), dtype=(w.dtype if w is not None else None))
    with torch.no_grad():
        if w is not None:
            out.weight.copy_(w[keep.to(w.device)])
        if b is not None:
            out.bias.copy_(b[keep.to(b.device)])
    return out


def _positions(subset: torch.Tensor, residual: torch.Tensor) -> Optional[torch.Tensor]:
    """Positions of ``subset`` inside the compact residual stream, or None when it is all of it."""
    if len(subset) == len(residual):
        return None
    return torch.searchsorted(residual, subset)


class _BranchBuilder:
    """What building either branch of one block needs: the block, its plan, masks and the factory."""

    def __init__(self, adapter, b: BlockInfo, r: ResolvedBlock, masks, make_linear: LinearFactory, report: Report):
        self.adapter, self.b, self.r, self.masks = adapter, b, r, masks
        self.make_linear, self.report = make_linear, report
        self.names = b.linear_names()
        self.dev = b.qkv.weight.device
        self.tokens = b.tokens * b.seqs  # tokens per image through the block's Linears

    def mask_of(self, role: str, rows: torch.Tensor, cols: torch.Tensor) -> Optional[torch.Tensor]:
        m = self.masks.get(self.names[role])
        return None if m is None else m[rows][:, cols].to(self.dev)

    def const_branch(self, bias: torch.Tensor, ls: Optional[torch.Tensor], out_idx: torch.Tensor) -> ConstBranch:
        val = bias.detach()[out_idx]
        if ls is not None:
            val = val * ls.detach()[out_idx]
        pos = _positions(out_idx, self.r.residual)
        return ConstBranch(val.clone(), None if pos is None else pos.to(self.dev))

    def io(self, norm: nn.Module, read: torch.Tensor, write: torch.Tensor) -> BranchIO:
        R = self.r.residual
        return BranchIO(sliced_layernorm(norm, R), _positions(read, R), _positions(write, R))


def _scaled(w: torch.Tensor, bias: Optional[torch.Tensor], ls: Optional[torch.Tensor], out_idx: torch.Tensor):
    """Fold a layer scale into the branch's last Linear."""
    if ls is None:
        return w, bias
    g = ls.detach()[out_idx]
    return w * g.unsqueeze(1), (None if bias is None else bias * g)


def _build_attention(bb: _BranchBuilder, attention_kernel: str):
    """(io, attention module, const branch) of the attention branch; the unused ones are None."""
    b, r, report = bb.b, bb.r, bb.report
    if r.attn_mode == "const":
        report.append(LayerDecision(f"{b.fqn}.attn", "dropped", "const", "add",
                                    "no heads left: branch reduced to its output bias"))
        return None, None, bb.const_branch(b.proj.bias, b.ls1, r.attn_out)
    if r.attn_mode != "full":
        report.append(LayerDecision(f"{b.fqn}.attn", "dropped", "none", "-", "attention branch removed"))
        return None, None, None
    v = bb.adapter.sliced_attention(b, r)
    proj_w, proj_b = _scaled(v.proj_weight, v.proj_bias, b.ls1, r.attn_out)
    qkv, _ = bb.make_linear(bb.names["qkv"], v.qkv_weight, v.qkv_bias, bb.mask_of("qkv", r.qkv_rows, r.attn_in),
                            tuple(b.qkv.weight.shape), bb.tokens)
    proj, _ = bb.make_linear(bb.names["proj"], proj_w, proj_b, bb.mask_of("proj", r.attn_out, r.proj_cols),
                             tuple(b.proj.weight.shape), bb.tokens)
    qk_dim, v_dim = r.qk.shape[1], r.v.shape[1]
    attn = SparseAttention(qkv, proj, len(r.heads), qk_dim, v_dim, v.scale, v.rel_table, v.rel_index,
                           r.heads.to(bb.dev), attention_kernel, q_norm=head_norm(v.q_norm), k_norm=head_norm(v.k_norm),
                           norm=None if v.out_norm is None else ZeroPaddedLayerNorm(v.out_norm))
    io = bb.io(b.norm1, r.attn_in, r.attn_out)
    _report_io(report, f"{b.fqn}.attn", io, len(r.attn_in), len(r.attn_out), len(r.residual), v.qkv_weight)
    sliced = len(r.heads) < b.num_heads or qk_dim < b.head_dim or v_dim < b.head_dim
    report.append(LayerDecision(f"{b.fqn}.attn", "sliced" if sliced else "kept",
                                f"heads {len(r.heads)}/{b.num_heads}, qk {qk_dim}, v {v_dim}",
                                *_attention_choice(attention_kernel, len(r.heads), b.tokens, qk_dim, v_dim,
                                                   v.qkv_weight)))
    return io, attn, None


def _build_mlp(bb: _BranchBuilder):
    """(io, MLP module, const branch) of the MLP branch; the unused ones are None."""
    b, r, report = bb.b, bb.r, bb.report
    if r.mlp_mode == "const":
        report.append(LayerDecision(f"{b.fqn}.mlp", "dropped", "const", "add",
                                    "no hidden channels left: branch reduced to its output bias"))
        return None, None, bb.const_branch(b.fc2.bias, b.ls2, r.mlp_out)
    if r.mlp_mode != "full":
        report.append(LayerDecision(f"{b.fqn}.mlp", "dropped", "none", "-", "MLP branch removed"))
        return None, None, None
    v = bb.adapter.sliced_mlp(b, r)
    fc2_w, fc2_b = _scaled(v.fc2_weight, v.fc2_bias, b.ls2, r.mlp_out)
    fc1, fused = bb.make_linear(bb.names["fc1"], v.fc1_weight, v.fc1_bias, bb.mask_of("fc1", r.hidden, r.mlp_in),
                                tuple(b.fc1.weight.shape), bb.tokens, activation=v.act_kind)
    fc2, _ = bb.make_linear(bb.names["fc2"], fc2_w, fc2_b, bb.mask_of("fc2", r.mlp_out, r.hidden),
                            tuple(b.fc2.weight.shape), bb.tokens)
    norm = None if v.norm is None else ZeroPaddedLayerNorm(v.norm)
    fc1, fc2 = choose_mlp_pair(bb.make_linear, (bb.names["fc1"], bb.names["fc2"]), fc1, fc2, norm)
    io = bb.io(b.norm2, r.mlp_in, r.mlp_out)
    _report_io(report, f"{b.fqn}.mlp", io, len(r.mlp_in), len(r.mlp_out), len(r.residual), v.fc1_weight)
    return io, SparseMlp(fc1, None if fused else v.act, fc2, norm), None


def build_block(adapter, b: BlockInfo, r: ResolvedBlock, masks, make_linear: LinearFactory, report: Report,
                attention_kernel: str = "sdpa") -> nn.Module:
    """The sparse module that replaces block ``b`` of ``adapter``'s model under resolved plan ``r``."""
    window = adapter.window(b)  # first: a model the runtime cannot build is refused before any work
    bb = _BranchBuilder(adapter, b, r, masks, make_linear, report)
    with torch.no_grad():
        attn_parts = _build_attention(bb, attention_kernel)
        mlp_parts = _build_mlp(bb)
    if window is not None:
        return SparseSwinBlock(window.window_size, window.shift_size, window.attn_mask, *attn_parts, *mlp_parts)
    return SparseBlock(*attn_parts, *mlp_parts)


def _report_io(report: Report, name: str, io: BranchIO, n_in: int, n_out: int, width: int, like: torch.Tensor):
    """Say how a branch's residual read/write subsets run (fused C++ ops, or why not)."""
    if io.read is None and io.write is None:
        return
    from sparsevit import _ext

    ok = like.device.type == "cpu" and like.dtype in (torch.float32, torch.bfloat16)
    if ok and _ext.has_op("layernorm_gather"):
        kernel, why = "cpp_layernorm_gather+scatter_add", "fused C++ LayerNorm+gather and scatter-add"
    else:
        kernel = "torch_reference"
        why = ("reference PyTorch ops: " + (_ext.unavailable_reason("layernorm_gather") if ok else
               f"the C++ ops take CPU float32/bfloat16, weights are {like.device.type} {like.dtype}"))
    report.append(LayerDecision(f"{name}.residual_io", "fused", f"read {n_in}/{width}, write {n_out}/{width}",
                                kernel, why))


def _attention_choice(kernel: str, heads: int, tokens: int, qk_dim: int, v_dim: int, like: torch.Tensor):
    """(kernel, reason) for the report: which attention runs for these shapes, and why."""
    if kernel == "sdpa":
        return "sdpa", "torch scaled_dot_product_attention: backend or device asks for plain torch"
    from sparsevit.ops import attention_kernel_name, attention_unsupported_reasons

    q = like.new_empty((1, heads, tokens, qk_dim))
    v = like.new_empty((1, heads, tokens, v_dim))
    reasons = attention_unsupported_reasons(q, q, v, None)
    if reasons:
        return "sdpa", "fused attention not used: " + "; ".join(reasons)
    name = attention_kernel_name(like.device)
    return name, f"{name} for {heads} heads, qk {qk_dim} / v {v_dim}"
