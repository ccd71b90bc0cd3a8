"""Adapters for timm's plain (isotropic) ViTs: ``vision_transformer`` (ViT, DeiT) and ``beit``."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from sparsevit.errors import PlanError, UnsupportedModelError
from sparsevit.models.base import BlockInfo, ModelAdapter
from sparsevit.models.coupling import Coupled, channels, pre_norm_block_coupling


def _layer_scale_slot(block: nn.Module, which: int) -> Optional[Tuple[nn.Module, str]]:
    """Where a branch's per-channel layer scale lives: timm ViT's ``ls{1,2}.gamma`` or BeiT's
    ``gamma_{1,2}`` (None without one)."""
    ls = getattr(block, f"ls{which}", None)
    if ls is not None and not isinstance(ls, nn.Identity):
        return ls, "gamma"
    if getattr(block, f"gamma_{which}", None) is not None:
        return block, f"gamma_{which}"
    return None


def _check_block(model, i: int, blk: nn.Module, kind: str) -> None:
    from timm.layers import Mlp

    where = f"{type(model).__name__}.blocks[{i}]"
    for attr in ("norm1", "attn", "norm2", "mlp"):
        if not hasattr(blk, attr):
            raise UnsupportedModelError(f"{where} ({type(blk).__name__}) has no '{attr}': only pre-norm "
                                        "transformer blocks (timm Block / beit Block) are supported.")
    if not isinstance(blk.mlp, Mlp) or not isinstance(blk.mlp.fc1, nn.Linear):
        raise UnsupportedModelError(f"{where}.mlp is {type(blk.mlp).__name__}; only timm.layers.Mlp with "
                                    "Linear fc1/fc2 is supported (SwiGLU/GLU/conv MLPs are not yet).")
    if kind == "vit" and getattr(blk.attn, "gate", None) is not None:
        raise UnsupportedModelError(f"{where}.attn is gated attention; not supported yet.")
    if not hasattr(blk.attn, "qkv"):
        raise UnsupportedModelError(f"{where}.attn ({type(blk.attn).__name__}) has no fused qkv Linear; "
                                    "only timm's Attention / beit Attention are supported.")
    if type(blk).__name__ in ("ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock"):
        raise UnsupportedModelError(f"{where} is a {type(blk).__name__}; only pre-norm Block is supported.")


class ViTAdapter(ModelAdapter):
    """timm ``VisionTransformer`` (ViT, DeiT, DeiT-3, ...) with pre-norm ``Block``s."""

    family = "vit"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if getattr(model, "attn_pool", None) is not None:
            self.has_attn_pool = True
        else:
            self.has_attn_pool = False
        tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
        dim = model.embed_dim
        self.stage_dims = [dim]
        for i, blk in enumerate(model.blocks):
            kind = self.kind_of(blk)
            _check_block(model, i, blk, kind)
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
        head = getattr(m, "head", None)
        if isinstance(head, nn.Linear):
            macs += head.out_features * Dk
        return macs

    def nonblock_coupling(self, stage: int) -> List[Coupled]:
        m, units = self.model, channels(self.stage_dims[0])
        pe = m.patch_embed
        out = [Coupled(pe.proj, "weight", 0, units, "out")]
        out += [Coupled(pe.proj, "bias", 0, units, "out")] if pe.proj.bias is not None else []
        out += [Coupled(owner, name, -1, units) for owner, name in ((m, "cls_token"), (m, "reg_token"),
                                                                     (m, "pos_embed"))
                if getattr(owner, name, None) is not None]
        out += [Coupled(owner, name, None, units) for owner, name in ((pe, "norm"), (m, "norm_pre"), (m, "norm"),
                                                                       (m, "fc_norm"))
                if not isinstance(getattr(owner, name, nn.Identity()), nn.Identity)]
        if isinstance(getattr(m, "head", None), nn.Linear):
            out.append(Coupled(m.head, "weight", 1, units, "in"))
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
