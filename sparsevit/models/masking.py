"""The masked dense model: a plan applied as zeros, and a plan read back from zeros.

Zeroing is exact for everything a plan removes inside a block: a head whose v rows (and proj
columns) are zero contributes nothing; a q/k channel whose q or k row is zero adds nothing to the
scores; an MLP channel whose fc1 row and bias are zero gives act(0) = 0 (the plan validation accepts
MLP-channel pruning only for such activations). A LayerNorm over a branch's inner channels (timm's
scale-norm over the heads' outputs, the MLP norm over the hidden channels) sees the removed channels
as zeros and counts them in its statistics: that is the function the plan means, and the
accelerated model computes it from the kept channels and the count of zeros. Removing residual
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


def _zero_outside(t: torch.Tensor, dim: int, keep: torch.Tensor) -> None:
    """Zero every slice of ``t`` along ``dim`` whose position is not in ``keep``."""
    shape = [1] * t.dim()
    shape[dim] = t.shape[dim]
    t.mul_(_mask1d(t.shape[dim], keep, t.device).view(shape).to(t.dtype))


def _kept_positions(block, kept_units) -> dict:
    """Per (tensor, dim) the positions some kept unit of some kind owns.

    Kinds share tensors (q, k and v rows partition the fused qkv weight), so the kept positions of a
    tensor dim are the union over the kinds that own it.
    """
    keep = {}
    for kind, units in kept_units.items():
        for e in block.coupling[kind]:
            if e.dim is None or e.get() is None:
                continue
            key = (id(e.owner), e.attr, e.dim)
            keep.setdefault(key, [e, []])[1].append(e.positions(units))
    return keep


@torch.no_grad()
def apply_plan_masks(adapter, plan: SparsityPlan) -> None:
    """Zero, in place on ``adapter.model``, every weight ``plan`` removes."""
    residual = adapter.residual_indices(plan)
    for i, b in enumerate(adapter.blocks):
        r = adapter.resolve(plan, i, residual)
        kept = r.kept_units()
        del kept["residual"]  # norms and layer scales follow the global residual only (below)
        for e, parts in _kept_positions(b, kept).values():
            _zero_outside(e.get(), e.dim, torch.cat(parts))
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


def _mask_entries(entries, units: torch.Tensor) -> None:
    for e in entries:
        keep = e.positions(units)
        if e.dim is None:
            _mask_norm(e.owner, e.attr, keep)
        elif e.get() is not None:
            _zero_outside(e.get(), e.dim, keep)


def _apply_residual_masks(adapter, residual: List[torch.Tensor]) -> None:
    for b in adapter.blocks:
        R = residual[b.stage]
        if len(R) < b.dim:
            _mask_entries(b.coupling["residual"], R)
    for s, R in enumerate(residual):
        _mask_entries(adapter.nonblock_coupling(s), R)


# ------------------------------------------------------------------------------------------ inference
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


def _alive(b, kind: str, atol: float, normed: bool = False) -> torch.Tensor:
    """Per unit of ``kind``: some producing slice (row, bias entry) is nonzero and, when the kind
    has consumers (columns), some consuming slice is nonzero too.

    ``normed``: a norm runs between producer and consumer; its output at a zero input is not zero
    and a nonzero input changes its statistics, so a unit is dead only when both sides are zero."""
    produced = consumed = None
    for e in b.coupling[kind]:
        if e.role not in ("out", "in"):
            continue
        t = e.get()
        d = e.dim % t.dim()
        nz = (t.detach().abs() > atol)
        nz = nz.any(dim=tuple(x for x in range(t.dim()) if x != d)) if t.dim() > 1 else nz
        unit_nz = nz[e.index.to(nz.device)].any(dim=1).cpu()
        if e.role == "out":
            produced = unit_nz if produced is None else produced | unit_nz
        else:
            consumed = unit_nz if consumed is None else consumed | unit_nz
    if consumed is None:
        return produced
    return (produced | consumed) if normed else (produced & consumed)


def _branch_nz(w: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor],
               atol: float) -> torch.Tensor:
    """Which inputs (``cols=None``: columns over ``rows``) or outputs (rows over ``cols``) are nonzero."""
    w = w.detach()
    if cols is None:
        return (w[rows].abs() > atol).any(dim=0).cpu()
    return (w[:, cols].abs() > atol).any(dim=1).cpu()


def _infer_block(b, R: torch.Tensor, atol: float) -> BlockPlan:
    bp = BlockPlan()
    _infer_attention(b, R, atol, bp)
    _infer_mlp(b, R, atol, bp)
    return bp


def _infer_attention(b, R: torch.Tensor, atol: float, bp: BlockPlan) -> None:
    H, hd = b.num_heads, b.head_dim
    if b.prunable("qk"):
        qk_used = (_alive(b, "q", atol) & _alive(b, "k", atol)).view(H, hd)
    else:  # under qk-norm, zero q/k rows stay (as unstructured zeros): they cannot be removed
        qk_used = torch.ones(H, hd, dtype=torch.bool)
    v_used = _alive(b, "v", atol, normed=b.has_norm("attn")).view(H, hd)
    heads = torch.nonzero(v_used.any(dim=1)).flatten()
    if len(heads) < H:
        bp.heads = heads.tolist()
    if len(heads) > 0:
        bp.v_channels = _head_channels(v_used[heads])
        qk = qk_used[heads].clone()
        qk[~qk.any(dim=1), 0] = True  # keep one (zero) q/k channel rather than an empty score
        bp.qk_channels = _head_channels(qk)
        units = ((heads * hd).unsqueeze(1) + torch.arange(hd)).reshape(-1)
        rows = torch.cat([b.rows_of(kind, units) for kind in ("q", "k", "v")])
        bp.attn_in = _subset_list(_branch_nz(b.qkv.weight, rows, None, atol), R)
        out_nz = _branch_nz(b.proj.weight, None, b.proj_cols(units), atol)
    else:
        out_nz = torch.zeros(b.dim, dtype=torch.bool)
    if b.proj.bias is not None:
        out_nz |= b.proj.bias.detach().abs().cpu() > atol
    bp.attn_out = _subset_list(out_nz, R)
    if len(heads) == 0 and not bool(out_nz.any()):
        bp.drop_attn = True


def _infer_mlp(b, R: torch.Tensor, atol: float, bp: BlockPlan) -> None:
    fc1, fc2 = b.fc1, b.fc2
    if b.prunable("mlp"):
        h_used = _alive(b, "mlp", atol, normed=b.has_norm("mlp"))
    else:
        h_used = torch.ones(b.hidden, dtype=torch.bool)
    hidden = torch.nonzero(h_used).flatten()
    bp.mlp_channels = _as_list(h_used)
    if len(hidden) > 0:
        bp.mlp_in = _subset_list(_branch_nz(fc1.weight, hidden, None, atol), R)
        o_nz = _branch_nz(fc2.weight, None, hidden, atol)
    else:
        o_nz = torch.zeros(b.dim, dtype=torch.bool)
    if fc2.bias is not None:
        o_nz |= fc2.bias.detach().abs().cpu() > atol
    bp.mlp_out = _subset_list(o_nz, R)
    if len(hidden) == 0 and not bool(o_nz.any()):
        bp.drop_mlp = True


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
