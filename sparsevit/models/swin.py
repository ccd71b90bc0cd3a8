"""Adapter for timm ``SwinTransformer`` (hierarchical, window attention, patch merging)."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from sparsevit.errors import PlanError, UnsupportedModelError
from sparsevit.models.base import BlockInfo, ModelAdapter


class SwinAdapter(ModelAdapter):
    """Blocks are numbered flat across stages. Residual channels are per stage: a stage's kept
    channels slice its blocks, the patch merging that produces it (output rows) and the one that
    consumes it (its norm and reduction columns over the 2x2 neighbourhood)."""

    family = "swin"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from timm.layers import Mlp

        i = 0
        for s, stage in enumerate(model.layers):
            dims = set()
            for j, blk in enumerate(stage.blocks):
                where = f"layers[{s}].blocks[{j}]"
                a = blk.attn
                if not hasattr(a, "relative_position_bias_table") or not hasattr(a, "qkv"):
                    raise UnsupportedModelError(f"{where}.attn is {type(a).__name__}; expected timm WindowAttention.")
                if not isinstance(blk.mlp, Mlp):
                    raise UnsupportedModelError(f"{where}.mlp is {type(blk.mlp).__name__}; only timm Mlp is supported.")
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
                    hidden=blk.mlp.fc1.out_features, tokens=wh * ww, seqs=windows))
                i += 1
            if len(dims) != 1:
                raise UnsupportedModelError(f"Swin stage {s} has blocks of widths {sorted(dims)}.")
            self.stage_dims.append(dims.pop())

    def _stage_res(self, s: int) -> tuple:
        stage = self.model.layers[s]
        return tuple(stage.blocks[0].input_resolution)

    def nonblock_params(self, residual: List[torch.Tensor]) -> Dict[str, int]:
        out = {}
        counts = [len(r) for r in residual]
        for name, p in self.model.named_parameters():
            if ".blocks." in name:
                continue
            if name.startswith("patch_embed."):
                out[name] = p.numel() // self.stage_dims[0] * counts[0]
            elif ".downsample." in name:
                s = int(name.split(".")[1])
                cin, cout = counts[s - 1] * 4, counts[s]
                out[name] = cin * cout if name.endswith("reduction.weight") else (
                    cout if name.endswith("reduction.bias") else cin)
            elif name.startswith("norm."):
                out[name] = counts[-1]
            elif name == "head.fc.weight":
                out[name] = p.shape[0] * counts[-1]
            elif name.startswith("absolute_pos_embed"):
                out[name] = p.numel() // self.stage_dims[0] * counts[0]
            else:
                out[name] = p.numel()
        return out

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

    def residual_coupled(self, residual: List[torch.Tensor]) -> List[tuple]:
        m = self.model
        R0 = residual[0]
        out = [(m.patch_embed.proj, "weight", 0, R0), (m.patch_embed.proj, "bias", 0, R0),
               (m.patch_embed, "norm", None, R0), (m, "absolute_pos_embed", -1, R0)]
        for s in range(1, len(m.layers)):
            ds = m.layers[s].downsample
            if isinstance(ds, nn.Identity):
                continue
            # PatchMerging concatenates the 2x2 neighbourhood as 4 groups of the previous width
            c_in = self.stage_dims[s - 1]
            keep_in = (torch.arange(4).unsqueeze(1) * c_in + residual[s - 1].unsqueeze(0)).reshape(-1).sort().values
            out += [(ds, "norm", None, keep_in), (ds.reduction, "weight", 0, residual[s]),
                    (ds.reduction, "weight", 1, keep_in)]
        out.append((m, "norm", None, residual[-1]))
        if isinstance(getattr(m.head, "fc", None), nn.Linear):
            out.append((m.head.fc, "weight", 1, residual[-1]))
        return out

    def _check_residual_supported(self, plan) -> None:
        for s in range(1, len(self.model.layers)):
            if isinstance(self.model.layers[s].downsample, nn.Identity) and \
                    self.stage_dims[s] != self.stage_dims[s - 1]:
                raise PlanError(f"Swin stage {s} changes width without patch merging; cannot slice residual.")
