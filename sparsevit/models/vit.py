"""Adapters for timm's plain (isotropic) ViTs: ``vision_transformer`` (ViT, DeiT) and ``beit``."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from sparsevit.errors import PlanError, UnsupportedModelError
from sparsevit.models.base import BlockInfo, ModelAdapter
from sparsevit.models.coupling import Coupled, channels, pre_norm_block_coupling
from sparsevit.models.features import check_beit_block, check_top_level, check_vit_block


def _layer_scale_slot(block: nn.Module, which: int) -> Optional[Tuple[nn.Module, str]]:
    """Where a branch's per-channel layer scale lives: timm ViT's ``ls{1,2}.gamma`` or BeiT's
    ``gamma_{1,2}`` (None without one)."""
    ls = getattr(block, f"ls{which}", None)
    if ls is not None and not isinstance(ls, nn.Identity):
        return ls, "gamma"
    if getattr(block, f"gamma_{which}", None) is not None:
        return block, f"gamma_{which}"
    return None


def _check_block(i: int, blk: nn.Module, kind: str) -> None:
    """Fail closed: the block holds only what the adapter and the runtime handle (``features.py``)."""
    if kind == "beit":
        check_beit_block(blk, f"blocks.{i}")
    else:
        check_vit_block(blk, f"blocks.{i}")


_VIT_TOP = frozenset({"patch_embed", "pos_drop", "patch_drop", "norm_pre", "blocks", "norm", "fc_norm", "head_drop",
                      "head", "attn_pool", "head_dist"})
_BEIT_TOP = frozenset({"patch_embed", "pos_drop", "rel_pos_bias", "blocks", "norm", "fc_norm", "head_drop", "head"})


class ViTAdapter(ModelAdapter):
    """timm ``VisionTransformer`` (ViT, DeiT, DeiT-3, ...) with pre-norm ``Block``s."""

    family = "vit"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if getattr(model, "attn_pool", None) is not None:
            self.has_attn_pool = True
        else:
            self.has_attn_pool = False
        if self.family == "beit":
            check_top_level(model, _BEIT_TOP, frozenset({"cls_token", "pos_embed"}))
        else:
            check_top_level(model, _VIT_TOP, frozenset({"cls_token", "reg_token", "pos_embed", "dist_token"}))
        tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
        dim = model.embed_dim
        self.stage_dims = [dim]
        for i, blk in enumerate(model.blocks):
            kind = self.kind_of(blk)
            _check_block(i, blk, kind)
            a = blk.attn
            H = a.num_heads
            hd = a.qkv.weight.shape[0] // (3 * H)
            slots = [_layer_scale_slot(blk, 1), _layer_scale_slot(blk, 2)]
            ls1, ls2 = (None if s is None else getattr(*s) for s in slots)
            table = pre_norm_block_coupling(blk, a, blk.mlp, H, hd, a.qkv.weight.shape[1],
                                            separate_qv_bias=kind == "beit",
                                            layer_scales=[s for s in slots if s is not None])
            self.blocks.append(BlockInfo(
                index=i, stage=0, fqn=f"blocks.{i}", block=blk, attn=a, mlp=blk.mlp,
                norm1=blk.norm1, norm2=blk.norm2, kind=kind, dim=a.qkv.weight.shape[1], num_heads=H,
                head_dim=hd, hidden=blk.mlp.fc1.out_features, tokens=tokens, ls1=ls1, ls2=ls2, coupling=table))
        if any(b.dim != dim for b in self.blocks):
            raise UnsupportedModelError("blocks of different widths in an isotropic ViT are not supported.")

    def kind_of(self, blk) -> str:
        return "vit"

    def nonblock_macs(self, residual: List[torch.Tensor]) -> int:
        m = self.model
        Dk = len(residual[0])
        conv = m.patch_embed.proj
        macs = m.patch_embed.num_patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * Dk
        for head in (getattr(m, "head", None), getattr(m, "head_dist", None)):
            if isinstance(head, nn.Linear):
                macs += head.out_features * Dk
        return macs

    def nonblock_coupling(self, stage: int) -> List[Coupled]:
        m, units = self.model, channels(self.stage_dims[0])
        pe = m.patch_embed
        out = [Coupled(pe.proj, "weight", 0, units, "out")]
        out += [Coupled(pe.proj, "bias", 0, units, "out")] if pe.proj.bias is not None else []
        out += [Coupled(owner, name, -1, units) for owner, name in ((m, "cls_token"), (m, "reg_token"),
                                                                     (m, "dist_token"), (m, "pos_embed"))
                if getattr(owner, name, None) is not None]
        out += [Coupled(owner, name, None, units) for owner, name in ((pe, "norm"), (m, "norm_pre"), (m, "norm"),
                                                                       (m, "fc_norm"))
                if not isinstance(getattr(owner, name, nn.Identity()), nn.Identity)]
        for head in ("head", "head_dist"):  # DeiT distilled reads its dist token with a second head
            if isinstance(getattr(m, head, None), nn.Linear):
                out.append(Coupled(getattr(m, head), "weight", 1, units, "in"))
        return out

    def _check_residual_supported(self, plan) -> None:
        if self.has_attn_pool:
            raise PlanError("residual_channels cannot be pruned on a model with attention pooling "
                            "(global_pool='map'); use global_pool='token' or 'avg'.")


class BeitAdapter(ViTAdapter):
    """timm ``Beit``: separate q/v biases and a per-head relative position bias table."""

    family = "beit"

    def kind_of(self, blk) -> str:
        return "beit"
