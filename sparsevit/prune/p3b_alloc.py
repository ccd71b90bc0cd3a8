"""P3B's arithmetic, free of models: keep ratios per block, unit ranks, thresholds and soft masks.

Everything here works on plain tensors so it can be tested on synthetic numbers (METHODS.md section 2):

- :func:`transform_benefit`: mean benefit per block -> importance (soft clip, divided by the block's
  remaining parameters, normalised to mean 1).
- :class:`KeepRatioAllocator`: EMA of the class-token and patch-token importances, their blend, and
  :func:`solve_keep_ratios`, the clamped iterative solve for the global parameter target.
- :func:`unit_ranks`, :func:`soft_mask`, :func:`block_threshold`: Taylor^2 scores -> per-gate rank
  normalisation with gate factors -> the block threshold meeting its keep ratio -> sigmoid masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# Units of every gate kind; a block is an attention branch (attn_*) or an MLP branch (mlp_*).
ATTN_GATES = ("attn_in", "attn_qkv", "attn_out")
MLP_GATES = ("mlp_in", "mlp_hid", "mlp_out")
DEFAULT_GATE_FACTORS = {"attn_out": 1.5, "mlp_hid": 0.75, "mlp_out": 1.5}
LN9 = math.log(9.0)  # the mask is 0.9 at N * tau ranks above the threshold


def transform_benefit(benefit: torch.Tensor, remaining_params: torch.Tensor, *, scale: float = 10.0,
                      slope: float = 1.4) -> torch.Tensor:
    """Importance of each block from its mean benefit ``b`` (CE before minus CE after the block).

    x = scale * b / max(b); f(x) = softplus(slope x) - softplus(slope x - scale) (a soft clip to
    (0, scale)); f is divided by the block's remaining parameters and normalised to mean 1.
    """
    b = benefit.double()
    top = b.max()
    denom = top if top > 0 else b.abs().max().clamp_min(1e-12)  # all harmful: keep the order, stay finite
    x = scale * b / denom
    f = F.softplus(slope * x) - F.softplus(slope * x - scale)
    imp = f / (remaining_params.double() + 1e-6)
    return imp / imp.mean().clamp_min(1e-30)


def solve_keep_ratios(importance: torch.Tensor, block_params: torch.Tensor, target_kept: float, *,
                      max_iter: int = 20) -> torch.Tensor:
    """Keep ratios ``kr_b = s * imp_b`` clamped to [0, 1] with ``sum kr_b W_b = target_kept``.

    ``target_kept`` is the number of block parameters to keep: the global target over all parameters
    minus the non-block ones (they are never pruned). Blocks that reach 1 (kept dense) or 0 (disabled)
    are fixed and ``s`` is re-solved over the others, up to ``max_iter`` times.
    """
    W = block_params.double()
    kr = importance.double().clone().clamp_min(0.0)
    total = float(W.sum())
    if target_kept >= total:
        return torch.ones_like(kr)
    if target_kept <= 0:
        return torch.zeros_like(kr)
    dense = torch.zeros_like(kr, dtype=torch.bool)
    disabled = kr <= 0
    for _ in range(max_iter + 1):
        kr[disabled], kr[dense] = 0.0, 1.0
        free = ~(dense | disabled)
        if not bool(free.any()):
            break
        rest = target_kept - float(W[dense].sum())
        denom = float((kr[free] * W[free]).sum())
        kr[free] *= max(rest, 0.0) / denom if denom > 0 else 0.0
        over, under = free & (kr >= 1.0), free & (kr <= 0.0)
        if not bool(over.any() or under.any()):
            break
        dense |= over
        disabled |= under
    return kr.clamp(0.0, 1.0)


@dataclass
class KeepRatioAllocator:
    """Keep ratios per block from the Block Performance Indicator, recomputed at every mask update.

    gamma: EMA weight of the new importance (1.0 = only the new one); alpha: weight of the class-token
    importance against the patch-token one. Because the ratios are recomputed from fresh benefits at
    every update, a block whose ratio fell to 0 (disabled) comes back when its benefit rises.
    """

    block_params: torch.Tensor
    target_kept: float
    gamma: float = 0.2
    alpha: float = 0.5
    scale: float = 10.0
    slope: float = 1.4
    max_iter: int = 20
    last_cls: Optional[torch.Tensor] = None
    last_patch: Optional[torch.Tensor] = None

    def update(self, benefit_cls: torch.Tensor, benefit_patch: torch.Tensor,
               remaining_params: torch.Tensor) -> torch.Tensor:
        """Goal keep ratio per block (the final target; the caller ramps towards it)."""
        cls = transform_benefit(benefit_cls, remaining_params, scale=self.scale, slope=self.slope)
        patch = transform_benefit(benefit_patch, remaining_params, scale=self.scale, slope=self.slope)
        if self.last_cls is not None:
            cls = self.gamma * cls + (1 - self.gamma) * self.last_cls
            patch = self.gamma * patch + (1 - self.gamma) * self.last_patch
        self.last_cls, self.last_patch = cls, patch
        imp = self.alpha * cls + (1 - self.alpha) * patch
        return solve_keep_ratios(imp, self.block_params, self.target_kept, max_iter=self.max_iter)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {} if self.last_cls is None else {"last_cls": self.last_cls, "last_patch": self.last_patch}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.last_cls, self.last_patch = state.get("last_cls"), state.get("last_patch")


# ---------------------------------------------------------------------------------------- inside a block
def unit_ranks(scores: Sequence[torch.Tensor], factors: Sequence[float]) -> torch.Tensor:
    """Position (1..N, ascending importance) of every unit of a block, gates concatenated in order.

    Each gate's scores are rank-normalised to (0, 1] ((rank + 1) / n), times the gate's factor, so
    gates of different sizes and score scales compete fairly; a tiny ramp breaks ties by order.
    """
    parts = []
    for s, f in zip(scores, factors):
        s = s.double().flatten()
        parts.append(f * (torch.argsort(torch.argsort(s)).double() + 1) / s.numel())
    imp = torch.cat(parts)
    imp = imp + torch.linspace(0, 1e-9, imp.numel(), dtype=imp.dtype)
    order = torch.argsort(imp)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(1, imp.numel() + 1)
    return pos


def soft_mask(positions: torch.Tensor, threshold: float, tau: float) -> torch.Tensor:
    """m_j = sigmoid(ln(9) (r_j - t) / (N tau)); tau = 0 gives the hard mask (r_j > t)."""
    n = positions.numel()
    r = positions.double()
    if tau <= 0:
        return (r > threshold).float()
    return torch.sigmoid(LN9 * (r - threshold) / (n * tau)).float()


def block_threshold(positions: torch.Tensor, sizes: Sequence[int], count_params, goal: float) -> int:
    """Number ``t`` of lowest-ranked units to remove so the block keeps as close to ``goal`` params
    as possible (the smallest ``t`` with ``count <= goal``, or one less when that is closer).

    ``count_params(kept_per_gate)`` is the block's exact parameter count for the kept unit counts;
    it only falls as ``t`` grows, so a bisection finds ``t``.
    """
    n = positions.numel()
    gate_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(list(sizes)))

    def kept(t: int) -> float:
        alive = positions > t
        return float(count_params([int(alive[gate_of == g].sum()) for g in range(len(sizes))]))

    lo, hi = 0, n  # kept(hi) <= goal is guaranteed for goal >= 0 (everything removed counts 0)
    if kept(0) <= goal:
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if kept(mid) <= goal:
            hi = mid
        else:
            lo = mid
    return lo if abs(kept(lo) - goal) < abs(kept(hi) - goal) else hi


def ramp(step: int, start: int, end: int) -> float:
    """0 before ``start``, 1 from ``end`` on, linear in between."""
    if end <= start:
        return 1.0 if step >= start else 0.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


def split_by_gate(values: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
    return list(torch.split(values, list(sizes)))


def ramped_keep_ratio(goal: torch.Tensor, progress: float) -> torch.Tensor:
    """Keep ratios moving linearly from 1 (nothing pruned) to ``goal`` as ``progress`` goes 0 -> 1."""
    return 1 - (1 - goal) * progress


def tau_at(progress: float, tau_max: float, tau_min: float) -> float:
    """Mask temperature while sharpening: ``tau_max`` at the start, ``tau_min`` (0: hard) at the end."""
    return progress * tau_min + (1 - progress) * tau_max


def branch_counts(kind: str, heads: int, qkv_bias: bool, proj_bias: bool) -> Tuple[float, float, float, float]:
    """Coefficients (a1, c1, a2, c2) of a branch's parameter count a1*m*i + c1*m + a2*m*o + c2*o for
    i input, m middle (head-dim or hidden) and o output channels kept."""
    if kind == "attn":
        return 3.0 * heads, 3.0 * heads * qkv_bias, float(heads), float(proj_bias)
    return 1.0, float(qkv_bias), 1.0, float(proj_bias)
