"""The coupling table: which tensor slices go together when one structural unit is removed.

This is the one place that writes down a block's layout (Torch-Pruning's idea of a pruning group:
a list of ``(tensor, dim, indices)``). Scoring (``prune.criteria``), the dependency groups
(``prune.groups``), masking, plan inference, counting and building all read it; none of them knows
how timm lays out a fused qkv weight, where BeiT keeps its q/v biases or which dim of a rel-pos table
runs over heads.

Unit kinds of a block (``BlockInfo.coupling[kind]``) and how their units are numbered:

==========  ======================  ============================================================
kind        unit                    coupled slices
==========  ======================  ============================================================
q, k        ``h * head_dim + c``    the q (k) row of channel c of head h in the fused qkv weight,
                                    and its bias entry (fused bias, or BeiT's separate q_bias)
v           ``h * head_dim + c``    the v row (+ bias entry) and the matching ``proj`` column
head        ``h``                   what belongs to the head as a whole and to none of its
                                    channels: its column of the relative-position-bias table
mlp         ``j``                   ``fc1`` row j (+ bias j) and ``fc2`` column j
attn_in     residual channel        ``qkv`` input column (what the attention branch reads)
attn_out    residual channel        ``proj`` output row and bias entry (what it writes)
mlp_in      residual channel        ``fc1`` input column
mlp_out     residual channel        ``fc2`` output row and bias entry
residual    residual channel        the block's norms and layer scales (they follow only the
                                    stage's global residual channels)
==========  ======================  ============================================================

Outside the blocks, ``ModelAdapter.nonblock_coupling(stage)`` lists the same kind of entries for a
stage's residual channels (embeddings, norms, patch merging, classifier).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

#: entry roles: ``out`` produces the unit (a Linear row, a bias entry), ``in`` consumes it (a Linear
#: column), ``param`` is any other parameter that follows the unit (norms, tables, layer scales)
ROLES = ("out", "in", "param")


@dataclass
class Coupled:
    """One tensor slice that follows a unit kind: ``index[u]`` are unit u's positions along ``dim``.

    The tensor is looked up as ``getattr(owner, attr)`` every time, so an entry stays valid when
    masking wraps a norm or ``accelerate`` replaces a parameter by its sliced copy.

    dim:   the tensor dim the positions run over; ``None`` when ``owner.attr`` is a norm module over
           its last dim (its weight and bias follow the unit).
    index: ``[n_units, slots]`` long tensor (``slots > 1`` when a unit owns several positions, e.g.
           Swin patch merging reads channel c of each of the 4 neighbours).
    """

    owner: nn.Module
    attr: str
    dim: Optional[int]
    index: torch.Tensor
    role: str = "param"

    def get(self):
        """The coupled tensor or norm module (``None`` when the model has none)."""
        t = getattr(self.owner, self.attr, None)
        return None if isinstance(t, nn.Identity) else t

    def positions(self, units: torch.Tensor) -> torch.Tensor:
        """Positions along ``dim`` of ``units``, slot by slot: the order a sliced tensor keeps."""
        return self.index[units.to(torch.long)].t().reshape(-1)

    def tensors(self) -> List[Tuple[torch.Tensor, int]]:
        """``(tensor, dim)`` pairs this entry stands for (a norm stands for its weight and bias)."""
        t = self.get()
        if t is None:
            return []
        if self.dim is None:
            return [(p, -1) for p in (getattr(t, "weight", None), getattr(t, "bias", None))
                    if isinstance(p, torch.Tensor)]
        return [(t, self.dim)] if isinstance(t, torch.Tensor) else []

    def same_slot(self, owner: nn.Module, attr: str, dim: Optional[int]) -> bool:
        return self.owner is owner and self.attr == attr and self.dim == dim


def channels(n: int, slots: int = 1, stride: int = 0) -> torch.Tensor:
    """``[n, slots]`` index of units that own positions ``u + s * stride`` (s < slots)."""
    return torch.arange(n).unsqueeze(1) + stride * torch.arange(slots).unsqueeze(0)


def _entry(owner: nn.Module, attr: str, dim: Optional[int], index: torch.Tensor, role: str) -> List[Coupled]:
    """A one-entry list, or an empty one when ``owner`` has no such tensor / norm."""
    t = getattr(owner, attr, None)
    if t is None or isinstance(t, nn.Identity):
        return []
    return [Coupled(owner, attr, dim, index, role)]


def fused_qkv_coupling(attn: nn.Module, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, *,
                       separate_qv_bias: bool) -> Dict[str, List[Coupled]]:
    """Units of a fused ``[q | k | v]`` qkv Linear (timm Attention, BeiT Attention, WindowAttention).

    Row ``h * head_dim + c`` of each third belongs to channel c of head h. ``separate_qv_bias``:
    BeiT keeps ``attn.q_bias`` / ``attn.v_bias`` (its k bias is fixed at zero) instead of ``qkv.bias``.
    """
    HD = num_heads * head_dim
    units = channels(HD)
    table: Dict[str, List[Coupled]] = {}
    for third, kind in enumerate(("q", "k", "v")):
        rows = units + third * HD
        entries = [Coupled(qkv, "weight", 0, rows, "out")]
        if separate_qv_bias:
            if kind != "k":
                entries += _entry(attn, f"{kind}_bias", 0, units, "out")
        else:
            entries += _entry(qkv, "bias", 0, rows, "out")
        table[kind] = entries
    table["v"].append(Coupled(proj, "weight", 1, units, "in"))
    table["head"] = _entry(attn, "relative_position_bias_table", 1, channels(num_heads), "param")
    return table


def mlp_coupling(fc1: nn.Linear, fc2: nn.Linear, hidden: int) -> Dict[str, List[Coupled]]:
    units = channels(hidden)
    return {"mlp": [Coupled(fc1, "weight", 0, units, "out"), Coupled(fc2, "weight", 1, units, "in")]
            + _entry(fc1, "bias", 0, units, "out")}


def branch_io_coupling(block: nn.Module, qkv: nn.Linear, proj: nn.Linear, fc1: nn.Linear, fc2: nn.Linear,
                       dim: int, layer_scales: List[Tuple[nn.Module, str]]) -> Dict[str, List[Coupled]]:
    """The residual-channel kinds of a pre-norm block (``norm1``/``norm2`` on ``block``)."""
    units = channels(dim)
    table = {
        "attn_in": [Coupled(qkv, "weight", 1, units, "in")],
        "attn_out": [Coupled(proj, "weight", 0, units, "out")] + _entry(proj, "bias", 0, units, "out"),
        "mlp_in": [Coupled(fc1, "weight", 1, units, "in")],
        "mlp_out": [Coupled(fc2, "weight", 0, units, "out")] + _entry(fc2, "bias", 0, units, "out"),
        "residual": _entry(block, "norm1", None, units, "param") + _entry(block, "norm2", None, units, "param"),
    }
    for owner, attr in layer_scales:
        table["residual"] += _entry(owner, attr, 0, units, "param")
    return table


def pre_norm_block_coupling(block: nn.Module, attn: nn.Module, mlp: nn.Module, num_heads: int, head_dim: int,
                            dim: int, *, separate_qv_bias: bool = False,
                            layer_scales: List[Tuple[nn.Module, str]] = ()) -> Dict[str, List[Coupled]]:
    """The whole table of a pre-norm block with a fused-qkv attention and an fc1/fc2 MLP."""
    table = fused_qkv_coupling(attn, attn.qkv, attn.proj, num_heads, head_dim, separate_qv_bias=separate_qv_bias)
    table.update(mlp_coupling(mlp.fc1, mlp.fc2, mlp.fc1.out_features))
    table.update(branch_io_coupling(block, attn.qkv, attn.proj, mlp.fc1, mlp.fc2, dim, list(layer_scales)))
    return table


def find(entries: List[Coupled], owner: nn.Module, attr: str, dim: Optional[int]) -> Coupled:
    for e in entries:
        if e.same_slot(owner, attr, dim):
            return e
    raise KeyError(f"no coupling entry for .{attr} dim {dim}")


# ------------------------------------------------------------------------------- explicit values
@dataclass
class NormValues:
    """A LayerNorm over a vector of ``width`` channels of which only ``len(weight)`` are kept.

    The removed channels are zeros in the masked dense model, and the norm's statistics run over the
    full width, zeros included (``runtime.modules.ZeroPaddedLayerNorm`` computes them from the kept
    channels and the count of implicit zeros). ``weight`` / ``bias`` (None without affine) are
    already sliced to the kept channels.
    """

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    width: int


def norm_values(norm: nn.Module, keep: Optional[torch.Tensor] = None) -> Optional[NormValues]:
    """The (sliced) values of a LayerNorm, None for an Identity (no norm)."""
    if norm is None or isinstance(norm, nn.Identity):
        return None
    width = int(norm.normalized_shape[0])
    w, b = norm.weight, norm.bias

    def take(t):
        if t is None:
            return None
        t = t.detach()
        return (t if keep is None else t[keep.to(t.device)]).clone()

    return NormValues(take(w), take(b), float(norm.eps), width)


@dataclass
class AttentionValues:
    """What the sparse attention of one block is built from, already sliced to the kept units.

    ``qkv_weight`` rows are ``[q | k | v]`` of the kept heads and channels; ``qkv_bias`` is the fused
    bias (zeros where the source model has none, e.g. BeiT's k); ``rel_table`` keeps the kept heads'
    columns and ``rel_index`` is the ``[N, N]`` lookup into it. ``q_norm`` / ``k_norm``: timm's
    qk-norm over each head's full head dim (q/k channels are never sliced under it); ``out_norm``:
    timm's scale-norm over all heads' outputs, sliced to the kept v channels.
    """

    qkv_weight: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    proj_weight: torch.Tensor
    proj_bias: Optional[torch.Tensor]
    scale: float
    rel_table: Optional[torch.Tensor] = None
    rel_index: Optional[torch.Tensor] = None
    q_norm: Optional[NormValues] = None
    k_norm: Optional[NormValues] = None
    out_norm: Optional[NormValues] = None


@dataclass
class MlpValues:
    """What the sparse MLP of one block is built from, sliced to the kept hidden channels.

    ``act_kind`` names the activation when a kernel can fuse it (``gelu``, ``gelu_tanh``), else None;
    ``act`` is the activation module to run when it is not fused. ``norm``: timm's scale-mlp-norm
    over the hidden channels (after the activation), sliced to the kept ones.
    """

    fc1_weight: torch.Tensor
    fc1_bias: Optional[torch.Tensor]
    fc2_weight: torch.Tensor
    fc2_bias: Optional[torch.Tensor]
    act: nn.Module
    act_kind: Optional[str]
    norm: Optional[NormValues] = None


@dataclass
class WindowValues:
    """Swin shifted-window attention: window and shift sizes and the ``[nW, N, N]`` shift mask."""

    window_size: Tuple[int, int]
    shift_size: Tuple[int, int]
    attn_mask: Optional[torch.Tensor]


def activation_kind(act: nn.Module) -> Optional[str]:
    """``gelu`` / ``gelu_tanh`` for the activations sparse kernels fuse (torch's or timm's GELU classes,
    checked to compute exactly ``F.gelu``), else None."""
    from sparsevit.models.features import activation_facts

    return activation_facts(act).fused
