"""What every model adapter shares: the block view, the coupling table, plan resolution and the
sliced tensors the runtime builds from.

An adapter is the only place that knows a timm family's attribute names. Pruning methods and the
runtime see a model through it: a flat list of :class:`BlockInfo` (one per transformer block), each
with its coupling table (``models/coupling.py``), plus a few family hooks for the non-block
parameters (embeddings, norms, head, Swin patch merging).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from sparsevit.errors import UnsupportedModelError
from sparsevit.models.coupling import (AttentionValues, Coupled, MlpValues, WindowValues, activation_kind, find,
                                       norm_values)
from sparsevit.models.features import activation_facts
from sparsevit.models.counting import count
from sparsevit.models.masking import apply_plan_masks, infer_plan_from_zeros
from sparsevit.models.validation import validate_plan
from sparsevit.plan import BlockPlan, SparsityPlan, format_summary


@dataclass
class BlockInfo:
    """One transformer block as the adapter sees it.

    kind:   attention flavour: ``vit`` (fused qkv bias), ``beit`` (q_bias/v_bias, rel-pos table),
            ``swin`` (window attention, rel-pos table, shifted-window mask)
    tokens: tokens per attention sequence (a window for Swin)
    seqs:   attention sequences per image (windows for Swin, 1 otherwise)
    """

    index: int
    stage: int
    fqn: str
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    norm1: nn.Module
    norm2: nn.Module
    kind: str
    dim: int
    num_heads: int
    head_dim: int
    hidden: int
    tokens: int
    seqs: int = 1
    ls1: Optional[torch.Tensor] = None
    ls2: Optional[torch.Tensor] = None
    #: unit kind -> coupled slices (see ``models/coupling.py`` for the kinds and unit numbering)
    coupling: Dict[str, List[Coupled]] = field(default_factory=dict)

    @property
    def qkv(self) -> nn.Linear:
        return self.attn.qkv

    @property
    def proj(self) -> nn.Linear:
        return self.attn.proj

    @property
    def fc1(self) -> nn.Linear:
        return self.mlp.fc1

    @property
    def fc2(self) -> nn.Linear:
        return self.mlp.fc2

    def linear_names(self) -> Dict[str, str]:
        return {"qkv": f"{self.fqn}.attn.qkv", "proj": f"{self.fqn}.attn.proj",
                "fc1": f"{self.fqn}.mlp.fc1", "fc2": f"{self.fqn}.mlp.fc2"}

    # ------------------------------------------------------------ reading the coupling table
    def rows_of(self, kind: str, units: torch.Tensor) -> torch.Tensor:
        """Rows of the fused qkv weight that ``units`` of ``kind`` (q, k or v) occupy."""
        return find(self.coupling[kind], self.qkv, "weight", 0).positions(units)

    def proj_cols(self, v_units: torch.Tensor) -> torch.Tensor:
        """Columns of ``proj`` that read v channels ``v_units``."""
        return find(self.coupling["v"], self.proj, "weight", 1).positions(v_units)

    def _bias_entry(self, kind: str) -> Optional[Coupled]:
        for e in self.coupling[kind]:
            t = e.get()
            if e.role == "out" and isinstance(t, torch.Tensor) and t.dim() == 1:
                return e
        return None

    def has_qkv_bias(self) -> bool:
        return any(self._bias_entry(k) is not None for k in ("q", "k", "v"))

    def fused_qkv_bias(self, units: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The ``[q | k | v]`` bias of ``units`` per kind; zeros for a kind without a bias (BeiT's k)."""
        if not self.has_qkv_bias():
            return None
        w = self.qkv.weight
        parts = []
        for kind in ("q", "k", "v"):
            e = self._bias_entry(kind)
            u = units[kind]
            if e is None:
                parts.append(w.new_zeros(len(u)).detach())
            else:
                parts.append(e.get().detach()[e.positions(u).to(w.device)])
        return torch.cat(parts)

    def qkv_bias(self) -> Optional[torch.Tensor]:
        """The effective fused qkv bias of the whole block."""
        HD = torch.arange(self.num_heads * self.head_dim)
        return self.fused_qkv_bias({"q": HD, "k": HD, "v": HD})

    def rel_pos_table(self) -> Optional[torch.Tensor]:
        for e in self.coupling.get("head", []):
            if e.attr == "relative_position_bias_table":
                return e.get()
        return None

    def prunable(self, kind: str) -> bool:
        """Whether units of ``kind`` (``head``, ``qk``, ``v``, ``mlp``) can be removed exactly.

        Not q/k channels under qk-norm (zeroing a channel before a norm over the head dim is not
        removing it). Heads and v channels under scale-norm, and MLP channels under an MLP norm, are:
        the removed channels are zeros the norm statistics count (``NormValues``). MLP channels need
        an elementwise activation with act(0) = 0 (``features.activation_facts``).
        """
        if kind == "qk":
            return isinstance(getattr(self.attn, "q_norm", nn.Identity()), nn.Identity)
        if kind == "mlp":
            return activation_facts(self.mlp.act).sliceable
        return kind in ("head", "v")

    def has_norm(self, branch: str) -> bool:
        """Whether a norm runs over all of a branch's inner channels (``attn``: scale-norm over the
        heads' outputs; ``mlp``: the norm over the hidden channels)."""
        module = self.attn if branch == "attn" else self.mlp
        return not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity)

    def branch_parameters(self, branch: str) -> List[torch.Tensor]:
        """Every parameter of the ``attn`` or ``mlp`` branch: its module, its norm and its layer scale."""
        module, norm, ls = (self.attn, self.norm1, self.ls1) if branch == "attn" else (self.mlp, self.norm2, self.ls2)
        return list(module.parameters()) + list(norm.parameters()) + ([ls] if ls is not None else [])


@dataclass
class ResolvedBlock:
    """A block's plan turned into concrete index tensors (original coordinates).

    attn_mode / mlp_mode: ``full`` (the branch runs), ``const`` (no heads / channels left, only the
    output bias remains: the branch adds a constant), ``none`` (branch removed).
    """

    heads: torch.Tensor
    qk: torch.Tensor  # [H', dqk] head-dim channels per kept head
    v: torch.Tensor  # [H', dv]
    q_rows: torch.Tensor
    k_rows: torch.Tensor
    v_rows: torch.Tensor
    proj_cols: torch.Tensor
    attn_in: torch.Tensor
    attn_out: torch.Tensor
    attn_mode: str
    hidden: torch.Tensor
    mlp_in: torch.Tensor
    mlp_out: torch.Tensor
    mlp_mode: str
    residual: torch.Tensor
    qk_units: Optional[torch.Tensor] = None  # kept q/k units (``h * head_dim + c``), head by head
    v_units: Optional[torch.Tensor] = None

    @property
    def qkv_rows(self) -> torch.Tensor:
        return torch.cat((self.q_rows, self.k_rows, self.v_rows))

    def kept_units(self) -> Dict[str, torch.Tensor]:
        """Kept units per coupling kind (nothing of a branch that does not run in full)."""
        none = torch.zeros(0, dtype=torch.long)
        attn, mlp = self.attn_mode == "full", self.mlp_mode == "full"
        return {"q": self.qk_units if attn else none, "k": self.qk_units if attn else none,
                "v": self.v_units if attn else none, "head": self.heads if attn else none,
                "mlp": self.hidden if mlp else none, "attn_in": self.attn_in,
                "attn_out": self.attn_out if self.attn_mode != "none" else none,
                "mlp_in": self.mlp_in, "mlp_out": self.mlp_out if self.mlp_mode != "none" else none,
                "residual": self.residual}


def _idx(v, n: int) -> torch.Tensor:
    return torch.arange(n) if v is None else torch.as_tensor(sorted(v), dtype=torch.long).reshape(-1)


def _per_head(v, heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    if v is None:
        return torch.arange(head_dim).expand(len(heads), head_dim).clone()
    if len(v) > 0 and isinstance(v[0], (list, tuple)):
        return torch.as_tensor([sorted(c) for c in v], dtype=torch.long).reshape(len(v), -1)
    return torch.as_tensor(sorted(v), dtype=torch.long).expand(len(heads), len(v)).clone()


def _subset(v, residual: torch.Tensor) -> torch.Tensor:
    if v is None:
        return residual
    s = torch.as_tensor(sorted(v), dtype=torch.long)
    return s[torch.isin(s, residual)]


class ModelAdapter:
    """Base class. Subclasses fill ``self.blocks`` and implement the non-block hooks."""

    family = "base"
    supported_note = ""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks: List[BlockInfo] = []
        self.stage_dims: List[int] = []

    # ---------------------------------------------------------------- family hooks
    def nonblock_coupling(self, stage: int) -> List[Coupled]:
        """Everything outside the blocks that follows the residual channels of ``stage``.

        Entries index the stage's channels (``index`` is ``[stage_dim, slots]``); masking zeroes (or
        masks) them, ``accelerate`` slices them, scoring and counting read them.
        """
        raise NotImplementedError

    def nonblock_macs(self, residual: List[torch.Tensor]) -> int:
        raise NotImplementedError

    def attention_scale(self, b: BlockInfo) -> float:
        return float(b.attn.scale)

    def rel_pos_index(self, b: BlockInfo) -> Optional[torch.Tensor]:
        """``[N, N]`` index into the block's relative-position-bias table (None without a table)."""
        index = getattr(b.attn, "relative_position_index", None)
        if index is None or b.rel_pos_table() is None:
            return None
        n = index.shape[0]
        return index.detach().reshape(n, n).clone()

    def window(self, b: BlockInfo) -> Optional[WindowValues]:
        """Shifted-window attention values (Swin); None for global attention."""
        return None

    def input_shape(self) -> tuple:
        """``(channels, height, width)`` of the images the model was built for (a probe input)."""
        pe = self.model.patch_embed
        size = pe.img_size if isinstance(pe.img_size, (tuple, list)) else (pe.img_size, pe.img_size)
        return (int(pe.proj.in_channels), int(size[0]), int(size[1]))

    # ---------------------------------------------------------------- shared logic
    def signature(self) -> Dict:
        return {
            "family": self.family,
            "num_blocks": len(self.blocks),
            "stage_dims": list(self.stage_dims),
            "blocks": [[b.dim, b.num_heads, b.head_dim, b.hidden] for b in self.blocks],
        }

    def linear_modules(self) -> Dict[str, nn.Linear]:
        """The Linear layers inside blocks (what unstructured masks address), by fqn."""
        out = {}
        for b in self.blocks:
            for role, name in b.linear_names().items():
                out[name] = getattr(b, role)
        return out

    def residual_indices(self, plan: SparsityPlan) -> List[torch.Tensor]:
        rc = plan.residual_channels or [None] * len(self.stage_dims)
        return [_idx(r, d) for r, d in zip(rc, self.stage_dims)]

    def resolve(self, plan: SparsityPlan, i: int, residual: Optional[List[torch.Tensor]] = None) -> ResolvedBlock:
        b, bp = self.blocks[i], plan.blocks[i]
        residual = residual if residual is not None else self.residual_indices(plan)
        R = residual[b.stage]
        H, hd = b.num_heads, b.head_dim
        heads = _idx(bp.heads, H)
        qk = _per_head(bp.qk_channels, heads, hd)
        v = _per_head(bp.v_channels, heads, hd)
        qk_units = ((heads * hd).unsqueeze(1) + qk).reshape(-1)
        v_units = ((heads * hd).unsqueeze(1) + v).reshape(-1)
        q_rows, k_rows, v_rows = b.rows_of("q", qk_units), b.rows_of("k", qk_units), b.rows_of("v", v_units)
        proj_cols = b.proj_cols(v_units)
        attn_in, attn_out = _subset(bp.attn_in, R), _subset(bp.attn_out, R)
        cut = plan.depth is not None and i >= plan.depth
        if cut or bp.drop_attn or len(attn_out) == 0:
            attn_mode = "none"
        elif len(heads) == 0 or v.shape[1] == 0 or len(attn_in) == 0:
            attn_mode = "const" if b.proj.bias is not None else "none"
        else:
            attn_mode = "full"
        hidden = _idx(bp.mlp_channels, b.hidden)
        mlp_in, mlp_out = _subset(bp.mlp_in, R), _subset(bp.mlp_out, R)
        if cut or bp.drop_mlp or len(mlp_out) == 0:
            mlp_mode = "none"
        elif len(hidden) == 0 or len(mlp_in) == 0:
            mlp_mode = "const" if b.fc2.bias is not None else "none"
        else:
            mlp_mode = "full"
        return ResolvedBlock(heads, qk, v, q_rows, k_rows, v_rows, proj_cols, attn_in, attn_out, attn_mode,
                             hidden, mlp_in, mlp_out, mlp_mode, R, qk_units, v_units)

    def residual_coupling(self, stage: int) -> List[Coupled]:
        """Every slice a residual channel of ``stage`` couples: its blocks' branch inputs/outputs,
        norms and layer scales, and the entries outside the blocks."""
        out = []
        for b in self.blocks:
            if b.stage == stage:
                for kind in ("attn_in", "attn_out", "mlp_in", "mlp_out", "residual"):
                    out += b.coupling[kind]
        return out + self.nonblock_coupling(stage)

    # ---------------------------------------------------------------- plans
    def dense_plan(self) -> SparsityPlan:
        """A plan that keeps everything of the model."""
        return SparsityPlan(family=self.family, blocks=[BlockPlan() for _ in self.blocks],
                            signature=self.signature())

    def validate_plan(self, plan: SparsityPlan) -> None:
        """Raise :class:`PlanError` naming the block and field when ``plan`` does not fit the model."""
        validate_plan(self, plan)

    def count(self, plan: SparsityPlan) -> Dict:
        """Exact parameters and MACs per image before/after ``plan`` (see ``models/counting.py``)."""
        return count(self, plan)

    def summary(self, plan: SparsityPlan, *, as_dict: bool = False):
        """Count ``plan`` on this model, store the statistics in ``plan.meta["stats"]``, and return
        them as a table (or as a dict with ``as_dict=True``)."""
        stats = self.count(plan)
        plan.meta["stats"] = stats
        return stats if as_dict else format_summary(stats, plan.meta)

    # ---------------------------------------------------------------- sliced values for the runtime
    @torch.no_grad()
    def sliced_attention(self, b: BlockInfo, r: ResolvedBlock) -> AttentionValues:
        """The attention weights of ``b`` sliced to what ``r`` keeps (detached copies)."""
        dev = b.qkv.weight.device
        qkv_w = b.qkv.weight.detach()[r.qkv_rows.to(dev)][:, r.attn_in.to(dev)]
        qkv_b = b.fused_qkv_bias({"q": r.qk_units, "k": r.qk_units, "v": r.v_units})
        proj_w = b.proj.weight.detach()[r.attn_out.to(dev)][:, r.proj_cols.to(dev)]
        proj_b = None if b.proj.bias is None else b.proj.bias.detach()[r.attn_out.to(dev)]
        rel_table = rel_index = None
        for e in b.coupling.get("head", []):
            if e.attr == "relative_position_bias_table":
                t = e.get().detach()
                rel_table = t.index_select(e.dim, e.positions(r.heads).to(t.device)).clone()
                rel_index = self.rel_pos_index(b)
        a = b.attn
        return AttentionValues(qkv_w, qkv_b, proj_w, proj_b, self.attention_scale(b), rel_table, rel_index,
                               q_norm=norm_values(getattr(a, "q_norm", None)),
                               k_norm=norm_values(getattr(a, "k_norm", None)),
                               out_norm=norm_values(getattr(a, "norm", None), r.v_units))

    @torch.no_grad()
    def sliced_mlp(self, b: BlockInfo, r: ResolvedBlock) -> MlpValues:
        """The MLP weights of ``b`` sliced to what ``r`` keeps, and its activation."""
        dev = b.fc1.weight.device
        hidden = r.hidden.to(dev)
        fc1_w = b.fc1.weight.detach()[hidden][:, r.mlp_in.to(dev)]
        fc1_b = None if b.fc1.bias is None else b.fc1.bias.detach()[hidden]
        fc2_w = b.fc2.weight.detach()[r.mlp_out.to(dev)][:, hidden]
        fc2_b = None if b.fc2.bias is None else b.fc2.bias.detach()[r.mlp_out.to(dev)]
        return MlpValues(fc1_w, fc1_b, fc2_w, fc2_b, b.mlp.act, activation_kind(b.mlp.act),
                         norm=norm_values(getattr(b.mlp, "norm", None), r.hidden))

    def _check_residual_supported(self, plan: SparsityPlan) -> None:
        pass

    # ---------------------------------------------------------------- masking and inference
    def apply_masks(self, plan: SparsityPlan):
        """Zero (in place, on ``self.model``) every weight the plan removes. See ``masking.py``."""
        apply_plan_masks(self, plan)

    def infer_plan(self, atol: float = 0.0) -> SparsityPlan:
        """Read the plan back from the zeros of the model's weights (see ``masking.py``)."""
        return infer_plan_from_zeros(self, atol)


def unsupported(model, supported: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"sparsevit does not know how to read {type(model).__module__}.{type(model).__name__}. "
        f"Supported: {supported}. Wrap other models in a timm one or open an issue.")
