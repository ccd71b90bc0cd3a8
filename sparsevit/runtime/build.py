"""Builds the sparse replacement of one block from the timm block and its resolved plan."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sparsevit.models.base import BlockInfo, ResolvedBlock
from sparsevit.models.masking import MaskedLayerNorm
from sparsevit.runtime.linear import LinearFactory, _gelu_kind  # noqa: F401  (build_block's inputs)
from sparsevit.runtime.modules import BranchIO, ConstBranch, SparseAttention, SparseBlock, SparseMlp, SparseSwinBlock
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


def build_block(b: BlockInfo, r: ResolvedBlock, masks, make_linear: LinearFactory, report: Report,
                attention_kernel: str = "sdpa") -> nn.Module:
    """The sparse module that replaces timm block ``b`` under resolved plan ``r``."""
    R = r.residual
    dev = b.qkv.weight.device
    names = b.linear_names()

    def mask_of(role, rows, cols):
        m = masks.get(names[role])
        return None if m is None else m[rows][:, cols].to(dev)

    def const_branch(bias, ls, out_idx):
        val = bias.detach()[out_idx]
        if ls is not None:
            val = val * ls.detach()[out_idx]
        pos = _positions(out_idx, R)
        return ConstBranch(val.clone(), None if pos is None else pos.to(dev))

    def scaled(w, bias, ls, out_idx):
        if ls is None:
            return w, bias
        g = ls.detach()[out_idx]
        return w * g.unsqueeze(1), (None if bias is None else bias * g)

    # ---------------------------------------------------------------- attention branch
    attn = attn_io = attn_const = None
    if r.attn_mode == "full":
        with torch.no_grad():
            qkv_w = b.qkv.weight.detach()[r.qkv_rows][:, r.attn_in]
            qkv_b = b.qkv_bias()
            qkv_b = None if qkv_b is None else qkv_b.detach()[r.qkv_rows]
            proj_w = b.proj.weight.detach()[r.attn_out][:, r.proj_cols]
            proj_b = None if b.proj.bias is None else b.proj.bias.detach()[r.attn_out]
            proj_w, proj_b = scaled(proj_w, proj_b, b.ls1, r.attn_out)
        T = b.tokens * b.seqs
        qkv, _ = make_linear(names["qkv"], qkv_w, qkv_b, mask_of("qkv", r.qkv_rows, r.attn_in),
                             tuple(b.qkv.weight.shape), T)
        proj, _ = make_linear(names["proj"], proj_w, proj_b, mask_of("proj", r.attn_out, r.proj_cols),
                              tuple(b.proj.weight.shape), T)
        table = b.rel_pos_table()
        rel_table = rel_index = None
        if table is not None:
            rel_table = table.detach()[:, r.heads.to(dev)].clone()
            n = b.attn.relative_position_index.shape[0]
            rel_index = b.attn.relative_position_index.detach().reshape(n, n).clone()
        attn = SparseAttention(qkv, proj, len(r.heads), r.qk.shape[1], r.v.shape[1], b.attn.scale, rel_table,
                               rel_index, r.heads.to(dev), attention_kernel)
        attn_io = BranchIO(sliced_layernorm(b.norm1, R), _positions(r.attn_in, R), _positions(r.attn_out, R))
        _report_io(report, f"{b.fqn}.attn", attn_io, len(r.attn_in), len(r.attn_out), len(R), qkv_w)
        report.append(LayerDecision(f"{b.fqn}.attn", "sliced" if len(r.heads) < b.num_heads or
                                    r.qk.shape[1] < b.head_dim or r.v.shape[1] < b.head_dim else "kept",
                                    f"heads {len(r.heads)}/{b.num_heads}, qk {r.qk.shape[1]}, v {r.v.shape[1]}",
                                    *_attention_choice(attention_kernel, len(r.heads), b.tokens, r.qk.shape[1],
                                                       r.v.shape[1], qkv_w)))
    elif r.attn_mode == "const":
        attn_const = const_branch(b.proj.bias, b.ls1, r.attn_out)
        report.append(LayerDecision(f"{b.fqn}.attn", "dropped", "const", "add",
                                    "no heads left: branch reduced to its output bias"))
    else:
        report.append(LayerDecision(f"{b.fqn}.attn", "dropped", "none", "-", "attention branch removed"))

    # ---------------------------------------------------------------- MLP branch
    mlp = mlp_io = mlp_const = None
    if r.mlp_mode == "full":
        with torch.no_grad():
            fc1_w = b.fc1.weight.detach()[r.hidden][:, r.mlp_in]
            fc1_b = None if b.fc1.bias is None else b.fc1.bias.detach()[r.hidden]
            fc2_w = b.fc2.weight.detach()[r.mlp_out][:, r.hidden]
            fc2_b = None if b.fc2.bias is None else b.fc2.bias.detach()[r.mlp_out]
            fc2_w, fc2_b = scaled(fc2_w, fc2_b, b.ls2, r.mlp_out)
        T = b.tokens * b.seqs
        act = b.mlp.act
        fc1, fused = make_linear(names["fc1"], fc1_w, fc1_b, mask_of("fc1", r.hidden, r.mlp_in),
                                 tuple(b.fc1.weight.shape), T, activation=_gelu_kind(act))
        fc2, _ = make_linear(names["fc2"], fc2_w, fc2_b, mask_of("fc2", r.mlp_out, r.hidden),
                             tuple(b.fc2.weight.shape), T)
        mlp = SparseMlp(fc1, None if fused else act, fc2)
        mlp_io = BranchIO(sliced_layernorm(b.norm2, R), _positions(r.mlp_in, R), _positions(r.mlp_out, R))
        _report_io(report, f"{b.fqn}.mlp", mlp_io, len(r.mlp_in), len(r.mlp_out), len(R), fc1_w)
    elif r.mlp_mode == "const":
        mlp_const = const_branch(b.fc2.bias, b.ls2, r.mlp_out)
        report.append(LayerDecision(f"{b.fqn}.mlp", "dropped", "const", "add",
                                    "no hidden channels left: branch reduced to its output bias"))
    else:
        report.append(LayerDecision(f"{b.fqn}.mlp", "dropped", "none", "-", "MLP branch removed"))

    if b.kind == "swin":
        if getattr(b.block, "dynamic_mask", False):
            from sparsevit.errors import UnsupportedModelError

            raise UnsupportedModelError(f"{b.fqn}: Swin with dynamic_mask=True (variable input size) is not "
                                        "supported; create the model with a fixed img_size.")
        return SparseSwinBlock(b.block, attn_io, attn, attn_const, mlp_io, mlp, mlp_const)
    return SparseBlock(attn_io, attn, attn_const, mlp_io, mlp, mlp_const)


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
        where = "CPU" if like.device.type == "cpu" else "backend forced"
        return "sdpa", f"{where}: torch scaled_dot_product_attention (the Triton attention kernel is CUDA-only)"
    from sparsevit.ops import attention_unsupported_reasons

    q = like.new_empty((1, heads, tokens, qk_dim))
    v = like.new_empty((1, heads, tokens, v_dim))
    reasons = attention_unsupported_reasons(q, q, v, None)
    if reasons:
        return "sdpa", "Triton attention not used: " + "; ".join(reasons)
    return "triton_attention", f"Triton attention for {heads} heads, qk {qk_dim} / v {v_dim}"
