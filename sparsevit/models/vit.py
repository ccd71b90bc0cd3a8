"""Adapters for timm's plain (isotropic) ViTs: ``vision_transformer`` (ViT, DeiT) and ``beit``."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from sparsevit.errors import PlanError, UnsupportedModelError
from sparsevit.models.base import BlockInfo, ModelAdapter


def _layer_scale(block: nn.Module, which: int):
    """Per-channel layer scale of a branch: timm ViT's ``ls{1,2}.gamma`` or BeiT's ``gamma_{1,2}``."""
    ls = getattr(block, f"ls{which}", None)
    if ls is not None and not isinstance(ls, nn.Identity):
        return ls.gamma
    return getattr(block, f"gamma_{which}", None)


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
            self.blocks.append(BlockInfo(
                index=i, stage=0, fqn=f"blocks.{i}", block=blk, attn=a, mlp=blk.mlp,
                norm1=blk.norm1, norm2=blk.norm2, kind=kind, dim=a.qkv.weight.shape[1], num_heads=H,
                head_dim=hd, hidden=blk.mlp.fc1.out_features, tokens=tokens,
                ls1=_layer_scale(blk, 1), ls2=_layer_scale(blk, 2)))
        if any(b.dim != dim for b in self.blocks):
            raise UnsupportedModelError("blocks of different widths in an isotropic ViT are not supported.")

    def kind_of(self, blk) -> str:
        return "vit"

    # residual-coupled parameters outside the blocks, with the dim that is the residual channel
    def _nonblock_layout(self) -> Dict[str, int]:
        """name -> dim along which the parameter follows the residual channels (None: not coupled)."""
        layout = {}
        for name, p in self.model.named_parameters():
            if name.startswith("blocks."):
                continue
            if name.startswith("patch_embed.proj."):
                layout[name] = 0
            elif name in ("head.weight",):
                layout[name] = 1
            elif name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed.norm.", "norm_pre.",
                                  "norm.", "fc_norm.")):
                layout[name] = p.dim() - 1
            else:
                layout[name] = None
        return layout

    def nonblock_params(self, residual: List[torch.Tensor]) -> Dict[str, int]:
        out = {}
        D, Dk = self.stage_dims[0], len(residual[0])
        params = dict(self.model.named_parameters())
        for name, dim in self._nonblock_layout().items():
            p = params[name]
            out[name] = p.numel() if dim is None else p.numel() // D * Dk
        return out

    def nonblock_macs(self, residual: List[torch.Tensor]) -> int:
        m = self.model
        Dk = len(residual[0])
        conv = m.patch_embed.proj
        macs = m.patch_embed.num_patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * Dk
        head = getattr(m, "head", None)
        if isinstance(head, nn.Linear):
            macs += head.out_features * Dk
        return macs

    def residual_coupled(self, residual: List[torch.Tensor]) -> List[tuple]:
        m, R = self.model, residual[0]
        out = [(m.patch_embed.proj, "weight", 0, R), (m.patch_embed.proj, "bias", 0, R),
               (m.patch_embed, "norm", None, R)]
        out += [(m, name, -1, R) for name in ("cls_token", "reg_token", "pos_embed")]
        out += [(m, name, None, R) for name in ("norm_pre", "norm", "fc_norm")]
        if isinstance(getattr(m, "head", None), nn.Linear):
            out.append((m.head, "weight", 1, R))
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

    def _nonblock_layout(self) -> Dict[str, int]:
        layout = super()._nonblock_layout()
        for name in list(layout):
            if name.startswith("rel_pos_bias."):
                layout[name] = None  # shared table: per head, not per channel
        return layout
