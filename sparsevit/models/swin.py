"""Adapter for timm ``SwinTransformer`` (hierarchical, window attention, patch merging)."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from sparsevit.errors import PlanError, UnsupportedModelError
from sparsevit.models.base import BlockInfo, ModelAdapter
from sparsevit.models.coupling import Coupled, WindowValues, channels, pre_norm_block_coupling
from sparsevit.models.features import check_swin_block, check_top_level


class SwinAdapter(ModelAdapter):
    """Blocks are numbered flat across stages. Residual channels are per stage: a stage's kept
    channels slice its blocks, the patch merging that produces it (output rows) and the one that
    consumes it (its norm and reduction columns over the 2x2 neighbourhood)."""

    family = "swin"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        check_top_level(model, frozenset({"patch_embed", "layers", "norm", "head"}),
                        frozenset({"absolute_pos_embed"}))
        i = 0
        for s, stage in enumerate(model.layers):
            dims = set()
            for j, blk in enumerate(stage.blocks):
                check_swin_block(blk, f"layers.{s}.blocks.{j}")
                a = blk.attn
                H = a.num_heads
                hd = a.qkv.weight.shape[0] // (3 * H)
                res_h, res_w = blk.input_resolution
                wh, ww = blk.window_size
                windows = math.ceil(res_h / wh) * math.ceil(res_w / ww)
                dim = a.qkv.weight.shape[1]
                dims.add(dim)
                self.blocks.append(BlockInfo(
                    index=i, stage=s, fqn=f"layers.{s}.blocks.{j}", block=blk, attn=a, mlp=blk.mlp,
                    norm1=blk.norm1, norm2=blk.norm2, kind="swin", dim=dim, num_heads=H, head_dim=hd,
                    hidden=blk.mlp.fc1.out_features, tokens=wh * ww, seqs=windows,
                    coupling=pre_norm_block_coupling(blk, a, blk.mlp, H, hd, dim)))
                i += 1
            if len(dims) != 1:
                raise UnsupportedModelError(f"Swin stage {s} has blocks of widths {sorted(dims)}.")
            self.stage_dims.append(dims.pop())

    def _stage_res(self, s: int) -> tuple:
        stage = self.model.layers[s]
        return tuple(stage.blocks[0].input_resolution)

    def nonblock_macs(self, residual: List[torch.Tensor]) -> int:
        m = self.model
        counts = [len(r) for r in residual]
        conv = m.patch_embed.proj
        h, w = self._stage_res(0)
        macs = h * w * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * counts[0]
        for s in range(1, len(m.layers)):
            if not isinstance(m.layers[s].downsample, nn.Identity):
                h, w = self._stage_res(s)
                macs += h * w * 4 * counts[s - 1] * counts[s]
        fc = getattr(m.head, "fc", None)
        if isinstance(fc, nn.Linear):
            macs += fc.out_features * counts[-1]
        return macs

    def nonblock_coupling(self, stage: int) -> List[Coupled]:
        m, layers = self.model, self.model.layers
        units = channels(self.stage_dims[stage])
        out: List[Coupled] = []
        if stage == 0:
            pe = m.patch_embed
            out += [Coupled(pe.proj, "weight", 0, units, "out")]
            out += [Coupled(pe.proj, "bias", 0, units, "out")] if pe.proj.bias is not None else []
            out += [Coupled(pe, "norm", None, units)] if not isinstance(pe.norm, nn.Identity) else []
            out += [Coupled(m, "absolute_pos_embed", -1, units)] if getattr(m, "absolute_pos_embed", None) \
                is not None else []
        ds = layers[stage].downsample
        if stage > 0 and not isinstance(ds, nn.Identity):  # the patch merging that makes this stage
            out += [Coupled(ds.reduction, "weight", 0, units, "out")]
            out += [Coupled(ds.reduction, "bias", 0, units, "out")] if ds.reduction.bias is not None else []
        nxt = layers[stage + 1].downsample if stage + 1 < len(layers) else nn.Identity()
        if not isinstance(nxt, nn.Identity):
            # the next patch merging concatenates the 2x2 neighbourhood: 4 groups of this stage's width
            grouped = channels(self.stage_dims[stage], slots=4, stride=self.stage_dims[stage])
            out += [Coupled(nxt, "norm", None, grouped), Coupled(nxt.reduction, "weight", 1, grouped, "in")]
        if stage == len(layers) - 1:
            out.append(Coupled(m, "norm", None, units))
            if isinstance(getattr(m.head, "fc", None), nn.Linear):
                out.append(Coupled(m.head.fc, "weight", 1, units, "in"))
        return out

    def window(self, b: BlockInfo) -> Optional[WindowValues]:
        blk = b.block
        if getattr(blk, "dynamic_mask", False):
            raise UnsupportedModelError(f"{b.fqn}: Swin with dynamic_mask=True (variable input size) is not "
                                        "supported; create the model with a fixed img_size.")
        mask = getattr(blk, "attn_mask", None)
        return WindowValues(tuple(blk.window_size), tuple(blk.shift_size), None if mask is None else mask.clone())

    def _check_residual_supported(self, plan) -> None:
        for s in range(1, len(self.model.layers)):
            if isinstance(self.model.layers[s].downsample, nn.Identity) and \
                    self.stage_dims[s] != self.stage_dims[s - 1]:
                raise PlanError(f"Swin stage {s} changes width without patch merging; cannot slice residual.")
