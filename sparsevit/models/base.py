"""What every model adapter shares: the block view, plan resolution, validation and counting.

An adapter is the only place that knows a timm family's attribute names. Pruning methods and the
runtime see a model through it: a flat list of :class:`BlockInfo` (one per transformer block) plus a
few family hooks for the non-block parameters (embeddings, norms, head, Swin patch merging).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from sparsevit.errors import PlanError, UnsupportedModelError
from sparsevit.plan import BlockPlan, SparsityPlan


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

    def qkv_bias(self) -> Optional[torch.Tensor]:
        """The effective qkv bias (BeiT keeps q/v biases apart and k's at zero)."""
        if self.kind == "beit":
            if self.attn.q_bias is None:
                return None
            return torch.cat((self.attn.q_bias, torch.zeros_like(self.attn.q_bias), self.attn.v_bias))
        return self.attn.qkv.bias

    def rel_pos_table(self) -> Optional[torch.Tensor]:
        return getattr(self.attn, "relative_position_bias_table", None)


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

    @property
    def qkv_rows(self) -> torch.Tensor:
        return torch.cat((self.q_rows, self.k_rows, self.v_rows))


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
    def nonblock_params(self, residual: List[torch.Tensor]) -> Dict[str, int]:
        """Parameter counts outside the blocks as they will be after residual slicing, by name."""
        raise NotImplementedError

    def nonblock_macs(self, residual: List[torch.Tensor]) -> int:
        raise NotImplementedError

    def residual_coupled(self, residual: List[torch.Tensor]) -> List[tuple]:
        """Everything outside the blocks that follows the residual channels.

        Returns ``(parent_module, attribute, dim, keep)`` tuples: ``dim`` is the tensor dim that runs
        over residual channels, or ``None`` when the attribute is a LayerNorm over them. Masking zeroes
        (or masks) these; ``accelerate`` slices them.
        """
        raise NotImplementedError

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
        base = (heads * hd).unsqueeze(1)
        q_rows = (base + qk).reshape(-1)
        k_rows = q_rows + H * hd
        v_rows = (base + v).reshape(-1) + 2 * H * hd
        proj_cols = (base + v).reshape(-1)
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
                             hidden, mlp_in, mlp_out, mlp_mode, R)

    # ---------------------------------------------------------------- validation
    def validate_plan(self, plan: SparsityPlan) -> None:
        if not isinstance(plan, SparsityPlan):
            raise PlanError(f"expected a SparsityPlan, got {type(plan).__name__}")
        if plan.family != self.family:
            raise PlanError(f"plan was made for a '{plan.family}' model but this model is '{self.family}' "
                            f"({type(self.model).__name__}); make the plan on this model.")
        n = len(self.blocks)
        if len(plan.blocks) != n:
            raise PlanError(f"plan has {len(plan.blocks)} blocks but the model has {n}; "
                            "the plan was made for another depth/variant.")
        sig = plan.signature.get("blocks")
        if sig is not None:
            for i, (b, s) in enumerate(zip(self.blocks, sig)):
                if list(s) != [b.dim, b.num_heads, b.head_dim, b.hidden]:
                    raise PlanError(f"block {i}: plan was made for dim/heads/head_dim/hidden {list(s)}, "
                                    f"model has {[b.dim, b.num_heads, b.head_dim, b.hidden]}.")
        if plan.depth is not None and not (0 <= plan.depth <= n):
            raise PlanError(f"depth={plan.depth} is outside [0, {n}] blocks.")
        rc = plan.residual_channels
        if rc is not None:
            if len(rc) != len(self.stage_dims):
                raise PlanError(f"residual_channels has {len(rc)} stages, model has {len(self.stage_dims)}.")
            for s, (r, d) in enumerate(zip(rc, self.stage_dims)):
                _check_index(r, d, f"residual_channels[stage {s}]")
                if r is not None and len(r) == 0:
                    raise PlanError(f"residual_channels[stage {s}] is empty: a model needs at least one channel.")
            self._check_residual_supported(plan)
        residual = self.residual_indices(plan)
        for i, (b, bp) in enumerate(zip(self.blocks, plan.blocks)):
            where = f"block {i} ({b.fqn})"
            if not isinstance(bp, BlockPlan):
                raise PlanError(f"{where}: expected BlockPlan, got {type(bp).__name__}")
            _check_index(bp.heads, b.num_heads, f"{where}.heads")
            _check_index(bp.mlp_channels, b.hidden, f"{where}.mlp_channels")
            nh = b.num_heads if bp.heads is None else len(bp.heads)
            for field in ("qk_channels", "v_channels"):
                _check_head_channels(getattr(bp, field), nh, b.head_dim, f"{where}.{field}")
            R = set(residual[b.stage].tolist())
            for field in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
                v = getattr(bp, field)
                _check_index(v, b.dim, f"{where}.{field}")
                if v is not None and not set(v) <= R:
                    raise PlanError(f"{where}.{field} uses residual channels removed by residual_channels "
                                    f"(e.g. {sorted(set(v) - R)[:5]}); keep them or drop them from the field.")
            qk_len = _channel_count(bp.qk_channels, b.head_dim)
            v_len = _channel_count(bp.v_channels, b.head_dim)
            if qk_len == 0 and v_len > 0 and nh > 0 and not bp.drop_attn:
                raise PlanError(f"{where}: qk_channels is empty while v channels are kept; attention "
                                "would be uniform. Keep at least one q/k channel or drop the heads.")
            if b.kind == "vit" and not isinstance(b.attn.q_norm, nn.Identity) and bp.qk_channels is not None:
                raise PlanError(f"{where}: qk_channels cannot be pruned with qk_norm (LayerNorm over the "
                                "head dim); prune whole heads instead.")
            if not isinstance(getattr(b.attn, "norm", nn.Identity()), nn.Identity) and (
                    bp.heads is not None or bp.v_channels is not None):
                raise PlanError(f"{where}: heads/v_channels cannot be pruned with scale_norm (LayerNorm over "
                                "all heads); prune MLP channels only.")
            if not isinstance(getattr(b.mlp, "norm", nn.Identity()), nn.Identity) and bp.mlp_channels is not None:
                raise PlanError(f"{where}: mlp_channels cannot be pruned with an MLP norm over the hidden dim.")
        linears = self.linear_modules()
        for name, mask in plan.masks.items():
            if name not in linears:
                raise PlanError(f"mask '{name}' names no Linear of this model; prunable Linears look like "
                                f"{next(iter(linears), '?')}.")
            if tuple(mask.shape) != tuple(linears[name].weight.shape):
                raise PlanError(f"mask '{name}' has shape {tuple(mask.shape)}, weight is "
                                f"{tuple(linears[name].weight.shape)}; masks use the original weight shape.")

    def _check_residual_supported(self, plan: SparsityPlan) -> None:
        pass

    # ---------------------------------------------------------------- counting
    def count(self, plan: SparsityPlan) -> Dict:
        """Exact parameter counts and MACs per image of what ``accelerate`` keeps under ``plan``.

        Structured removal is counted exactly (equal to the accelerated model's parameter count);
        weights under an unstructured mask count as their nonzeros (params) and nonzero multiply-adds
        (MACs), i.e. what a sparse kernel stores and computes, not the padding of its blocks.
        """
        residual = self.residual_indices(plan)
        blocks = []
        tot_pb = tot_pa = tot_mb = tot_ma = 0
        dense = SparsityPlan(family=self.family, blocks=[BlockPlan() for _ in self.blocks])
        for i, b in enumerate(self.blocks):
            r = self.resolve(plan, i, residual)
            _, mb = self._block_cost(b, self.resolve(dense, i), {})
            pb = sum(p.numel() for p in b.block.parameters())
            pa, ma = self._block_cost(b, r, plan.masks)
            blocks.append({"index": i, "fqn": b.fqn, "params_before": pb, "params_after": pa,
                           "macs_before": mb, "macs_after": ma, "heads": len(r.heads) if r.attn_mode == "full" else 0,
                           "mlp_channels": len(r.hidden) if r.mlp_mode == "full" else 0})
            tot_pb, tot_pa, tot_mb, tot_ma = tot_pb + pb, tot_pa + pa, tot_mb + mb, tot_ma + ma
        full = [torch.arange(d) for d in self.stage_dims]
        nb_before, nb_after = sum(self.nonblock_params(full).values()), sum(self.nonblock_params(residual).values())
        total = {
            "params_before": tot_pb + nb_before, "params_after": tot_pa + nb_after,
            "macs_before": tot_mb + self.nonblock_macs(full), "macs_after": tot_ma + self.nonblock_macs(residual),
            "prunable_before": tot_pb, "prunable_after": tot_pa,
            "prunable_removed": 1 - tot_pa / max(tot_pb, 1),
        }
        total["params_removed"] = 1 - total["params_after"] / total["params_before"]
        total["mac_ratio"] = total["macs_before"] / max(total["macs_after"], 1)
        return {"blocks": blocks, "total": total}

    def _block_cost(self, b: BlockInfo, r: ResolvedBlock, masks: Dict[str, torch.Tensor]):
        """(params, MACs per image) of a block as accelerate builds it: layer scale is folded into
        proj/fc2, BeiT's q/v biases become one fused qkv bias, rel-pos tables keep the kept heads."""
        names = b.linear_names()
        T = b.tokens * b.seqs  # tokens per image through the block's Linears

        def lin(role, rows, cols):
            m = masks.get(names[role])
            w = len(rows) * len(cols) if m is None else int(m[rows][:, cols].sum())
            return w, w * T

        params = macs = 0
        if r.attn_mode == "full":
            w, m = lin("qkv", r.qkv_rows, r.attn_in)
            params += w + _norm_params(b.norm1, len(r.attn_in))
            macs += m
            if b.qkv_bias() is not None:  # BeiT's zero k bias is materialised in the fused qkv bias
                params += len(r.qkv_rows)
            table = b.rel_pos_table()
            if table is not None:
                params += table.shape[0] * len(r.heads)
            params += sum(p.numel() for p in b.attn.q_norm.parameters()) if hasattr(b.attn, "q_norm") else 0
            params += sum(p.numel() for p in b.attn.k_norm.parameters()) if hasattr(b.attn, "k_norm") else 0
            w, m = lin("proj", r.attn_out, r.proj_cols)
            params += w + (len(r.attn_out) if b.proj.bias is not None else 0)
            macs += m + b.seqs * len(r.heads) * b.tokens * b.tokens * (r.qk.shape[1] + r.v.shape[1])
        if r.attn_mode == "const":
            params += len(r.attn_out)
        if r.mlp_mode == "full":
            w, m = lin("fc1", r.hidden, r.mlp_in)
            params += w + _norm_params(b.norm2, len(r.mlp_in)) + (len(r.hidden) if b.fc1.bias is not None else 0)
            macs += m
            w, m = lin("fc2", r.mlp_out, r.hidden)
            params += w + (len(r.mlp_out) if b.fc2.bias is not None else 0)
            macs += m
        if r.mlp_mode == "const":
            params += len(r.mlp_out)
        return params, macs

    # ---------------------------------------------------------------- masking and inference
    def apply_masks(self, plan: SparsityPlan):
        """Zero (in place, on ``self.model``) every weight the plan removes. See ``masking.py``."""
        from sparsevit.models.masking import apply_plan_masks

        apply_plan_masks(self, plan)

    def infer_plan(self, atol: float = 0.0) -> SparsityPlan:
        from sparsevit.models.masking import infer_plan_from_zeros

        return infer_plan_from_zeros(self, atol)


def _norm_params(norm: nn.Module, n_channels: int) -> int:
    """Parameters of a residual-stream norm once sliced to ``n_channels``."""
    return sum(p.numel() // p.shape[-1] * n_channels for p in norm.parameters())


def _check_index(v, n: int, where: str) -> None:
    if v is None:
        return
    if not isinstance(v, (list, tuple)):
        raise PlanError(f"{where} must be a list of ints or None, got {type(v).__name__}")
    if any(isinstance(i, (list, tuple)) for i in v):
        raise PlanError(f"{where} must be a flat list of ints")
    bad = [i for i in v if not isinstance(i, int) or i < 0 or i >= n]
    if bad:
        raise PlanError(f"{where} has indices outside [0, {n}): {bad[:5]}")
    if len(set(v)) != len(v):
        raise PlanError(f"{where} has duplicate indices")


def _check_head_channels(v, n_heads: int, head_dim: int, where: str) -> None:
    if v is None:
        return
    if len(v) > 0 and isinstance(v[0], (list, tuple)):
        if len(v) != n_heads:
            raise PlanError(f"{where} gives {len(v)} per-head lists but {n_heads} heads are kept")
        if len({len(c) for c in v}) > 1:
            raise PlanError(f"{where}: per-head lists must have equal lengths (one head dim per layer), "
                            f"got {sorted({len(c) for c in v})}")
        for h, c in enumerate(v):
            _check_index(list(c), head_dim, f"{where}[{h}]")
    else:
        _check_index(v, head_dim, where)


def _channel_count(v, head_dim: int) -> int:
    if v is None:
        return head_dim
    if len(v) > 0 and isinstance(v[0], (list, tuple)):
        return len(v[0])
    return len(v)


def unsupported(model, supported: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"sparsevit does not know how to read {type(model).__module__}.{type(model).__name__}. "
        f"Supported: {supported}. Wrap other models in a timm one or open an issue.")
