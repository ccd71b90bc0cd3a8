"""Pictures of a plan: what each block keeps, as a heat map (``sparsevit report --png``).

One row per transformer block, one column per kind of unit (heads, q/k and v head-dim channels, MLP
channels, the residual channels each branch reads and writes, and the density of each Linear's
unstructured mask); each cell is the kept fraction, 0 (all removed) to 1 (all kept). Blocks past
the plan's depth cut and dropped branches show as 0. Reads only the plan (its ``signature`` holds
the original sizes), so it works on a plan file or on a loaded model's ``sparsevit_plan``.
matplotlib is an optional dependency, needed only here.
"""
from __future__ import annotations

import os
from typing import List, Tuple

from sparsevit.errors import PlanError

COLUMNS = ("heads", "q/k dim", "v dim", "MLP", "attn in", "attn out", "MLP in", "MLP out",
           "qkv", "proj", "fc1", "fc2")


def _frac(kept, total: int) -> float:
    if kept is None:
        return 1.0
    if len(kept) > 0 and isinstance(kept[0], (list, tuple)):  # per-head channel lists of equal length
        kept = kept[0]
    return len(kept) / total if total else 1.0


def kept_fractions(plan) -> Tuple[List[List[float]], List[str]]:
    """The heat map's values: one row per block (list of floats in COLUMNS order) and row labels."""
    sig = plan.signature.get("blocks")
    if not sig or len(sig) != len(plan.blocks):
        raise PlanError("this plan carries no model signature (sizes per block); make it with "
                        "sparsevit.prune or SparsityPlan.dense(model) so it can be drawn.")
    names = _linear_names_by_block(plan)
    rows, labels = [], []
    for i, (bp, (dim, heads, head_dim, hidden)) in enumerate(zip(plan.blocks, sig)):
        cut = plan.depth is not None and i >= plan.depth
        attn_off = cut or bp.attn_dropped()
        mlp_off = cut or bp.mlp_dropped()
        attn = [_frac(bp.heads, heads), _frac(bp.qk_channels, head_dim), _frac(bp.v_channels, head_dim)]
        mlp = [_frac(bp.mlp_channels, hidden)]
        io_attn = [_frac(bp.attn_in, dim), _frac(bp.attn_out, dim)]
        io_mlp = [_frac(bp.mlp_in, dim), _frac(bp.mlp_out, dim)]
        dens = [_density(plan, names.get((i, role))) for role in ("qkv", "proj", "fc1", "fc2")]
        row = ([0.0] * 3 if attn_off else attn) + ([0.0] if mlp_off else mlp) + \
              ([0.0] * 2 if attn_off else io_attn) + ([0.0] * 2 if mlp_off else io_mlp) + \
              [0.0 if attn_off else d for d in dens[:2]] + [0.0 if mlp_off else d for d in dens[2:]]
        rows.append(row)
        labels.append(f"block {i}" + (" (cut)" if cut else ""))
    return rows, labels


def _linear_names_by_block(plan) -> dict:
    """``(flat block index, role) -> mask name`` for the plan's unstructured masks."""
    dims = [b[0] for b in plan.signature["blocks"]]
    starts = [i for i in range(len(dims)) if i == 0 or dims[i] != dims[i - 1]]  # Swin: a stage per width
    index = {}
    for name in plan.masks:
        parts = name.split(".")
        j = int(parts[parts.index("blocks") + 1])
        stage = int(parts[1]) if parts[0] == "layers" else 0
        if stage >= len(starts):
            raise PlanError(f"mask {name} names stage {stage}, the plan's signature has {len(starts)}.")
        index[(starts[stage] + j, parts[-1])] = name
    return index


def _density(plan, name) -> float:
    return 1.0 if name is None else float(plan.masks[name].float().mean())


def plot_plan(plan, path: str, title: str = "") -> str:
    """Write the heat map of ``plan`` to ``path`` (PNG); returns ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("drawing a plan needs matplotlib: pip install matplotlib") from None
    rows, labels = kept_fractions(plan)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(COLUMNS), 1.2 + 0.32 * len(rows)))
    im = ax.imshow(rows, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(COLUMNS)), COLUMNS, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for r, row in enumerate(rows):
        for c, v in enumerate(row):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="kept fraction")
    ax.set_title(title or f"{plan.family} plan: kept fraction per block")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
