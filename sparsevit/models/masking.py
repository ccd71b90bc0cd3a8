"""The masked dense model: a plan applied as zeros, and a plan read back from zeros.

Zeroing is exact for everything a plan removes inside a block: a head whose v rows (and proj
columns) are zero contributes nothing; a q/k channel whose q or k row is zero adds nothing to the
scores; an MLP channel whose fc1 row and bias are zero gives act(0) = 0. Removing residual
(embedding) channels is the one place where zeros are not enough, because LayerNorm statistics would
still count the removed channels; there :class:`MaskedLayerNorm` normalises over the kept channels
only, which is what the physically narrower model computes.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparsevit.plan import BlockPlan, SparsityPlan

_ZERO_AT_ZERO = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Identity)


class MaskedLayerNorm(nn.Module):
    """LayerNorm over a subset of channels; the other channels come out as zero.

    Keeps the wrapped norm's full-size parameters (so masked fine-tuning can train them) and a
    ``keep`` index buffer.
    """

    def __init__(self, norm: nn.LayerNorm, keep: torch.Tensor):
        super().__init__()
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        self.register_buffer("keep", keep.to(torch.long).clone(), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.keep
        w = self.weight[keep] if self.weight is not None else None
        b = self.bias[keep] if self.bias is not None else None
        y = F.layer_norm(x.index_select(-1, keep), (len(keep),), w, b, self.eps)
        out = x.new_zeros(x.shape)
        return out.index_copy(-1, keep, y)


def _mask1d(n: int, keep: torch.Tensor, device) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool, device=device)
    m[keep.to(device)] = True
    return m


def _zero_outside(weight: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> None:
    """Zero every entry of a 2-D weight outside rows x cols (None = all)."""
    dev = weight.device
    m = torch.ones_like(weight, dtype=torch.bool)
    if rows is not None:
        m &= _mask1d(weight.shape[0], rows, dev).unsqueeze(1)
    if cols is not None:
        m &= _mask1d(weight.shape[1], cols, dev).unsqueeze(0)
    weight.mul_(m.to(weight.dtype))


def _zero_vec(v: Optional[torch.Tensor], keep: Optional[torch.Tensor]) -> None:
    if v is None:
        return
    if keep is None:
        v.zero_()
    else:
        v.mul_(_mask1d(v.shape[-1], keep, v.device).to(v.dtype))


@torch.no_grad()
def apply_plan_masks(adapter, plan: SparsityPlan) -> None:
    """Zero, in place on ``adapter.model``, every weight ``plan`` removes."""
    residual = adapter.residual_indices(plan)
    for i, b in enumerate(adapter.blocks):
        r = adapter.resolve(plan, i, residual)
        nothing = torch.zeros(0, dtype=torch.long)
        attn_rows = r.qkv_rows if r.attn_mode == "full" else nothing
        _zero_outside(b.qkv.weight, attn_rows, r.attn_in)
        if b.kind == "beit":
            HD = b.num_heads * b.head_dim
            _zero_vec(b.attn.q_bias, attn_rows[attn_rows < HD])
            _zero_vec(b.attn.v_bias, attn_rows[attn_rows >= 2 * HD] - 2 * HD)
        else:
            _zero_vec(b.qkv.bias, attn_rows)
        _zero_outside(b.proj.weight, r.attn_out, r.proj_cols if r.attn_mode == "full" else nothing)
        _zero_vec(b.proj.bias, r.attn_out if r.attn_mode != "none" else nothing)
        mlp_rows = r.hidden if r.mlp_mode == "full" else nothing
        _zero_outside(b.fc1.weight, mlp_rows, r.mlp_in)
        _zero_vec(b.fc1.bias, mlp_rows)
        _zero_outside(b.fc2.weight, r.mlp_out, mlp_rows)
        _zero_vec(b.fc2.bias, r.mlp_out if r.mlp_mode != "none" else nothing)
        if (r.mlp_mode != "none" or plan.blocks[i].mlp_channels is not None) and \
                not isinstance(b.mlp.act, _ZERO_AT_ZERO):
            raise ValueError(f"{b.fqn}.mlp.act is {type(b.mlp.act).__name__}; pruning MLP channels needs "
                             "an activation with act(0) = 0 (GELU, ReLU, SiLU).")
    linears = adapter.linear_modules()
    for name, mask in plan.masks.items():
        w = linears[name].weight
        w.mul_(mask.to(device=w.device, dtype=w.dtype))
    if plan.residual_channels is not None:
        _apply_residual_masks(adapter, residual)


def _mask_norm(parent: nn.Module, attr: str, keep: torch.Tensor) -> None:
    norm = getattr(parent, attr, None)
    if norm is None or isinstance(norm, nn.Identity):
        return
    if isinstance(norm, MaskedLayerNorm):
        norm.keep = keep.to(norm.keep.device)
        return
    if not isinstance(norm, nn.LayerNorm):
        from sparsevit.errors import UnsupportedModelError

        raise UnsupportedModelError(f"residual channel pruning needs LayerNorm, found {type(norm).__name__} "
                                    f"at .{attr}")
    setattr(parent, attr, MaskedLayerNorm(norm, keep))


def _apply_residual_masks(adapter, residual: List[torch.Tensor]) -> None:
    for b in adapter.blocks:
        R = residual[b.stage]
        if len(R) == b.dim:
            continue
        _mask_norm(b.block, "norm1", R)
        _mask_norm(b.block, "norm2", R)
        for ls in (b.ls1, b.ls2):
            _zero_vec(ls, R)
    for parent, attr, dim, keep in adapter.residual_coupled(residual):
        if dim is None:
            _mask_norm(parent, attr, keep)
            continue
        t = getattr(parent, attr, None)
        if t is None:
            continue
        shape = [1] * t.dim()
        shape[dim] = t.shape[dim]
        t.mul_(_mask1d(t.shape[dim], keep, t.device).view(shape).to(t.dtype))


# ------------------------------------------------------------------------------------------ inference
def _nz_rows(w: torch.Tensor, atol: float) -> torch.Tensor:
    return (w.abs() > atol).any(dim=1)


def _as_list(mask: torch.Tensor) -> Optional[List[int]]:
    """Index list of a bool mask, or None when everything is kept."""
    if bool(mask.all()):
        return None
    return torch.nonzero(mask).flatten().tolist()


@torch.no_grad()
def infer_plan_from_zeros(adapter, atol: float = 0.0) -> SparsityPlan:
    """Recover the structured plan and the unstructured masks from the zeros of ``adapter.model``."""
    residual_channels = []
    for s, dim in enumerate(adapter.stage_dims):
        first = next(b for b in adapter.blocks if b.stage == s)
        n1 = first.block.norm1
        residual_channels.append(n1.keep.tolist() if isinstance(n1, MaskedLayerNorm) and len(n1.keep) < dim else None)
    plan = SparsityPlan(family=adapter.family, blocks=[],
                        residual_channels=residual_channels if any(r is not None for r in residual_channels) else None,
                        signature=adapter.signature())
    residual = adapter.residual_indices(plan)
    for b in adapter.blocks:
        plan.blocks.append(_infer_block(b, residual[b.stage], atol))
    # unstructured leftovers inside what the structure keeps
    linears = adapter.linear_modules()
    for i, b in enumerate(adapter.blocks):
        r = adapter.resolve(plan, i, residual)
        slices = {"qkv": (r.qkv_rows, r.attn_in, r.attn_mode), "proj": (r.attn_out, r.proj_cols, r.attn_mode),
                  "fc1": (r.hidden, r.mlp_in, r.mlp_mode), "fc2": (r.mlp_out, r.hidden, r.mlp_mode)}
        for role, name in b.linear_names().items():
            rows, cols, mode = slices[role]
            if mode != "full":
                continue
            nz = linears[name].weight.abs() > atol
            if not bool(nz[rows][:, cols].all()):
                plan.masks[name] = nz.cpu()
    return plan


def _infer_block(b, R: torch.Tensor, atol: float) -> BlockPlan:
    H, hd = b.num_heads, b.head_dim
    HD = H * hd
    bias = b.qkv_bias()
    rows_nz = _nz_rows(b.qkv.weight, atol)
    if bias is not None:
        rows_nz |= bias.abs() > atol
    proj_cols_nz = (b.proj.weight.abs() > atol).any(dim=0)
    q_nz = rows_nz[:HD].view(H, hd)
    k_nz = rows_nz[HD:2 * HD].view(H, hd)
    v_used = (rows_nz[2 * HD:] & proj_cols_nz).view(H, hd)
    qk_used = q_nz & k_nz
    head_kept = v_used.any(dim=1)
    bp = BlockPlan()
    heads = torch.nonzero(head_kept).flatten()
    if len(heads) < H:
        bp.heads = heads.tolist()
    if len(heads) > 0:
        bp.v_channels = _head_channels(v_used[heads])
        qk = qk_used[heads].clone()
        qk[~qk.any(dim=1), 0] = True  # keep one (zero) q/k channel rather than an empty score
        bp.qk_channels = _head_channels(qk)
        rows = torch.cat([(heads * hd).unsqueeze(1) + torch.arange(hd)] * 1).reshape(-1)
        kept_rows = torch.cat((rows, rows + HD, rows + 2 * HD))
        in_nz = (b.qkv.weight[kept_rows].abs() > atol).any(dim=0)
        bp.attn_in = _subset_list(in_nz, R)
        out_nz = (b.proj.weight[:, (heads * hd).unsqueeze(1).add(torch.arange(hd)).reshape(-1)].abs() > atol).any(1)
    else:
        out_nz = torch.zeros(b.dim, dtype=torch.bool)
    if b.proj.bias is not None:
        out_nz |= b.proj.bias.abs() > atol
    bp.attn_out = _subset_list(out_nz, R)
    if len(heads) == 0 and not bool(out_nz.any()):
        bp.drop_attn = True
    # MLP
    fc1, fc2 = b.fc1, b.fc2
    if isinstance(b.mlp.act, _ZERO_AT_ZERO) and isinstance(b.mlp.norm, nn.Identity):
        h_nz = _nz_rows(fc1.weight, atol)
        if fc1.bias is not None:
            h_nz |= fc1.bias.abs() > atol
        h_used = h_nz & (fc2.weight.abs() > atol).any(dim=0)
    else:
        h_used = torch.ones(b.hidden, dtype=torch.bool)
    hidden = torch.nonzero(h_used).flatten()
    bp.mlp_channels = _as_list(h_used)
    if len(hidden) > 0:
        bp.mlp_in = _subset_list((fc1.weight[hidden].abs() > atol).any(dim=0), R)
        o_nz = (fc2.weight[:, hidden].abs() > atol).any(dim=1)
    else:
        o_nz = torch.zeros(b.dim, dtype=torch.bool)
    if fc2.bias is not None:
        o_nz |= fc2.bias.abs() > atol
    bp.mlp_out = _subset_list(o_nz, R)
    if len(hidden) == 0 and not bool(o_nz.any()):
        bp.drop_mlp = True
    return bp


def _subset_list(nz: torch.Tensor, R: torch.Tensor) -> Optional[List[int]]:
    """Kept residual channels of a branch, None when it uses all of the stage's residual R."""
    sel = R[nz[R]]
    if len(sel) == len(R):
        return None
    return sel.tolist()


def _head_channels(used: torch.Tensor):
    """Per-head channel sets: shared list when equal, per-head lists when equal-sized, else union."""
    if bool(used.all()):
        return None
    first = used[0]
    if bool((used == first).all()):
        return torch.nonzero(first).flatten().tolist()
    counts = used.sum(dim=1)
    if bool((counts == counts[0]).all()):
        return [torch.nonzero(u).flatten().tolist() for u in used]
    union = used.any(dim=0)
    return None if bool(union.all()) else torch.nonzero(union).flatten().tolist()
