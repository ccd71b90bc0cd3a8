"""SparsityPlan: what to keep of a timm Vision Transformer, as plain data.

A plan is produced by a pruning method (``sparsevit.prune``) or read back from the zeros of a masked
model (``SparsityPlan.from_masked_model``), and consumed by ``sparsevit.accelerate``. It never holds
weights, only index sets and masks, so it is small, serialisable (JSON for structure, safetensors for
masks) and checkable against a model before anything is built.

Coordinates: every index in a plan refers to the *original* model (channel ``i`` of the residual
stream, head ``h``, hidden channel ``j`` of the MLP, row/column of a Linear weight). Blocks are
numbered flat in forward order (Swin: stage by stage).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from sparsevit._io import atomic_write
from sparsevit.errors import PlanError

Index = Optional[List[int]]
HeadChannels = Optional[Union[List[int], List[List[int]]]]

PLAN_FORMAT_VERSION = 2  # 2: one checksummed file with embedded masks; 1: JSON + .masks.safetensors


@dataclass
class BlockPlan:
    """What one transformer block keeps. ``None`` always means "all of it".

    heads:        kept attention heads. ``[]`` removes the attention branch (same as ``drop_attn``).
    qk_channels:  kept head-dim channels of q and k: one list shared by every kept head, or one list
                  per kept head (all of the same length, in the order of ``heads``).
    v_channels:   same for v (and the matching input columns of ``proj``); may differ from q/k.
    mlp_channels: kept MLP hidden channels (fc1 rows, fc2 columns). ``[]`` removes the MLP branch.
    attn_in / mlp_in:   residual channels the branch reads (its norm still normalises over the
                        full residual stream; only the kept channels enter qkv / fc1).
    attn_out / mlp_out: residual channels the branch writes back into (scatter-add).
    drop_attn / drop_mlp: remove the branch entirely (the block becomes partly identity).
    """

    heads: Index = None
    qk_channels: HeadChannels = None
    v_channels: HeadChannels = None
    mlp_channels: Index = None
    attn_in: Index = None
    attn_out: Index = None
    mlp_in: Index = None
    mlp_out: Index = None
    drop_attn: bool = False
    drop_mlp: bool = False

    def attn_dropped(self) -> bool:
        return self.drop_attn or (self.heads is not None and len(self.heads) == 0) or \
            _empty(self.v_channels) or _empty(self.attn_out) or _empty(self.attn_in)

    def mlp_dropped(self) -> bool:
        return self.drop_mlp or (self.mlp_channels is not None and len(self.mlp_channels) == 0) or \
            _empty(self.mlp_out) or _empty(self.mlp_in)

    def is_identity(self) -> bool:
        """True when the plan keeps everything of this block."""
        return all(getattr(self, f) is None for f in _INDEX_FIELDS) and not (self.drop_attn or self.drop_mlp)


_INDEX_FIELDS = ("heads", "qk_channels", "v_channels", "mlp_channels", "attn_in", "attn_out", "mlp_in", "mlp_out")


def _empty(v) -> bool:
    if v is None:
        return False
    if len(v) == 0:
        return True
    return isinstance(v[0], (list, tuple)) and len(v[0]) == 0


@dataclass
class SparsityPlan:
    """The whole model's plan.

    family:            adapter family the plan was made for (``vit``, ``beit``, ``swin``)
    blocks:            one :class:`BlockPlan` per transformer block, flat in forward order
    residual_channels: per stage, the residual (embedding) channels kept everywhere (DepGraph-style
                       global width pruning); ``None`` for a stage keeps all. ViT-like models have one
                       stage.
    depth:             keep only the first ``depth`` blocks (SLS); later blocks become identity
                       (Swin keeps its patch-merging layers).
    masks:             per Linear (fully qualified name in the original model), an unstructured bool
                       mask of the weight's original shape; what survives the structured part is
                       packed into block-sparse formats by ``accelerate``.
    block:             tile shape ``[rows, cols]`` the unstructured masks were made for (e.g. ``[32, 32]``;
                       ``[1, 1]`` for fine-grained masks); ``accelerate`` tries this packing first.
    nm:                ``[n, m]`` when the masks are N:M (n kept of every m consecutive input weights).
    signature:         the model facts the plan was made for (block count, dims, heads), checked by
                       :meth:`validate`.
    meta:              free-form provenance (method, criterion, target, measured reductions).
    """

    family: str
    blocks: List[BlockPlan]
    residual_channels: Optional[List[Index]] = None
    depth: Optional[int] = None
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)
    block: Optional[List[int]] = None
    nm: Optional[List[int]] = None
    signature: Dict = field(default_factory=dict)
    meta: Dict = field(default_factory=dict)

    # ------------------------------------------------------------------ model-dependent operations
    # These read the model through its adapter. plan.py imports nothing of sparsevit.models: the
    # models package registers its adapter lookup here when it is imported (see
    # ``register_adapter_lookup``), which ``import sparsevit`` always does first.
    @classmethod
    def dense(cls, model) -> "SparsityPlan":
        """A plan that keeps everything of ``model`` (a starting point to edit)."""
        return _adapter(model).dense_plan()

    @classmethod
    def from_masked_model(cls, model, *, atol: float = 0.0) -> "SparsityPlan":
        """Read a plan back from the zeros already in a masked model's weights.

        Heads whose q, k and v rows are all zero, MLP channels whose fc1 row (and bias) is zero,
        residual channels that no branch reads or writes, whole zero branches, and the remaining
        scattered zeros of every Linear (as unstructured masks) are recovered.
        """
        return _adapter(model).infer_plan(atol=atol)

    def validate(self, model) -> "SparsityPlan":
        """Raise :class:`PlanError` naming the block and field when this plan does not fit ``model``."""
        _adapter(model).validate_plan(self)
        return self

    def summary(self, model=None, *, as_dict: bool = False):
        """Parameters and MACs before/after, per block and in total.

        Uses the statistics stored in the plan by the method that made it; with ``model`` they are
        recomputed from the model's shapes (exact counts of what ``accelerate`` keeps; MACs count
        the multiply-accumulates of every Linear/conv plus attention's two matmuls, per image).
        Same as ``sparsevit.summary(model, plan)``.
        """
        if model is not None:
            return _adapter(model).summary(self, as_dict=as_dict)
        stats = self.meta.get("stats")
        if stats is None:
            raise PlanError("plan.summary() needs the model: this plan carries no stored statistics. "
                            "Call plan.summary(model).")
        if as_dict:
            return stats
        return format_summary(stats, self.meta)

    def nonempty_masks(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in self.masks.items() if v is not None}

    # ------------------------------------------------------------------ (de)serialisation
    def to_json_dict(self) -> Dict:
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "family": self.family,
            "blocks": [asdict(b) for b in self.blocks],
            "residual_channels": self.residual_channels,
            "depth": self.depth,
            "block": None if self.block is None else [int(v) for v in self.block],
            "nm": None if self.nm is None else [int(v) for v in self.nm],
            "signature": self.signature,
            "meta": self.meta,
            "mask_names": sorted(self.masks),
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the plan to ``path``: one JSON file with the masks embedded and a SHA-256 checksum.

        The write is atomic (temporary file + rename), so an interrupted save never leaves a
        truncated plan behind; see :mod:`sparsevit.io.plan_file` for the layout.
        """
        from sparsevit.io.plan_file import check_plan_dict, encode_plan

        body = self.to_json_dict()
        check_plan_dict(body, where="plan")
        text = encode_plan(body, self.masks)
        path = os.fspath(path)

        def write(tmp):
            with open(tmp, "w", encoding="ascii") as f:
                f.write(text)
        atomic_write(path, write, suffix=".json")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SparsityPlan":
        """Read a plan written by :meth:`save` (or the older JSON + ``.masks.safetensors`` pair).

        The checksum and every field's type are checked; a corrupt or foreign file raises
        :class:`PlanError` naming the problem.
        """
        from sparsevit._io import check_readable_file
        from sparsevit.io.plan_file import decode_plan

        path = os.fspath(path)
        check_readable_file(path, lambda msg: PlanError(f"plan file not found: {msg}" if "no such" in msg else msg),
                            "plan")
        try:
            with open(path, encoding="ascii") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path} is not a sparsevit plan (invalid JSON: {exc}). "
                            "Re-create it with plan.save(path).") from None
        except OSError as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from None
        if not isinstance(d, dict):
            raise PlanError(f"{path} is not a sparsevit plan (a JSON {type(d).__name__}, not an object).")
        masks = decode_plan(d, path)
        if masks is None:
            masks = _load_v1_masks(path, d)
        return cls.from_json_dict(d, masks, where=path)

    @classmethod
    def from_json_dict(cls, d: Dict, masks: Optional[Dict[str, torch.Tensor]] = None,
                       where: str = "plan") -> "SparsityPlan":
        """Inverse of :meth:`to_json_dict` (masks travel separately); every field is type-checked."""
        from sparsevit.io.plan_file import check_mask, check_plan_dict

        check_plan_dict(d, where)
        version = d.get("format_version", 0)
        if version > PLAN_FORMAT_VERSION:
            raise PlanError(f"{where} was written by a newer sparsevit (format {version} > "
                            f"{PLAN_FORMAT_VERSION}); upgrade sparsevit.")
        masks = {k: check_mask(k, v, where) for k, v in (masks or {}).items()}
        missing = sorted(set(d.get("mask_names", [])) - set(masks))
        if missing:
            raise PlanError(f"{where} lists masks it does not hold (e.g. {missing[:3]}); re-save the plan.")
        blocks = [BlockPlan(**b) for b in d["blocks"]]
        return cls(family=d["family"], blocks=blocks, residual_channels=d.get("residual_channels"),
                   depth=d.get("depth"), masks=masks, block=d.get("block"), nm=d.get("nm"),
                   signature=d.get("signature") or {}, meta=d.get("meta") or {})

    def check_types(self) -> "SparsityPlan":
        """Raise :class:`PlanError` naming the field when a field has the wrong type (e.g. ``depth=1.5``,
        ``heads=[True]``, a float mask holding 0.5); model-independent, see :meth:`validate` for the rest."""
        from sparsevit.io.plan_file import check_mask, check_plan_dict

        check_plan_dict(self.to_json_dict())
        for k, v in self.masks.items():
            check_mask(k, v)
        return self

    # ------------------------------------------------------------------ helpers
    def copy(self) -> "SparsityPlan":
        import copy

        return SparsityPlan(family=self.family, blocks=copy.deepcopy(self.blocks),
                            residual_channels=copy.deepcopy(self.residual_channels), depth=self.depth,
                            block=copy.deepcopy(self.block), nm=copy.deepcopy(self.nm),
                            masks={k: v.clone() for k, v in self.masks.items()},
                            signature=copy.deepcopy(self.signature), meta=copy.deepcopy(self.meta))


_ADAPTER_LOOKUP: Optional[Callable] = None


def register_adapter_lookup(get_adapter: Callable) -> None:
    """Install the function that maps a model to its adapter (``sparsevit.models.get_adapter``).

    The adapter must offer ``dense_plan()``, ``infer_plan(atol)``, ``validate_plan(plan)`` and
    ``summary(plan, as_dict)``; that is all the plan asks of a model.
    """
    global _ADAPTER_LOOKUP
    _ADAPTER_LOOKUP = get_adapter


def _adapter(model):
    if _ADAPTER_LOOKUP is None:  # only when plan.py is loaded without the sparsevit package
        raise RuntimeError("no model adapters are registered; `import sparsevit` first.")
    return _ADAPTER_LOOKUP(model)


def _masks_path(path: str) -> str:
    return path + ".masks.safetensors"


def _load_v1_masks(path: str, d: Dict) -> Dict[str, torch.Tensor]:
    """Masks of a version-1 plan, read from its companion ``.masks.safetensors`` file."""
    names = d.get("mask_names")
    if not names:
        return {}
    if not isinstance(names, list):
        return {}  # check_plan_dict names the bad field
    mpath = _masks_path(path)
    try:
        from safetensors.torch import load_file

        masks = load_file(mpath)
    except FileNotFoundError:
        raise PlanError(f"plan {path} lists {len(names)} masks but {mpath} is missing; "
                        "copy it next to the plan.") from None
    except Exception as exc:
        raise PlanError(f"mask file {mpath} is corrupt ({exc}); re-save the plan.") from None
    missing = set(names) - set(masks)
    if missing:
        raise PlanError(f"mask file {mpath} lacks masks for {sorted(missing)[:3]}...; re-save the plan.")
    return {k: v for k, v in masks.items() if k in set(names)}


def format_summary(stats: Dict, meta: Optional[Dict] = None) -> str:
    """Render the statistics of :meth:`SparsityPlan.summary` as a table."""
    lines = []
    if meta and meta.get("method"):
        desc = ", ".join(f"{k}={meta[k]}" for k in ("method", "criterion", "sparsity", "target") if k in meta)
        lines.append(f"plan: {desc}")
    header = f"{'block':>6} {'params':>12} {'kept':>12} {'ratio':>6} {'MACs(M)':>10} {'kept(M)':>10}"
    lines.append(header)
    for b in stats["blocks"]:
        pb, pa, mb, ma = b["params_before"], b["params_after"], b["macs_before"], b["macs_after"]
        lines.append(f"{b['index']:>6} {pb:>12,} {pa:>12,} {pa / max(pb, 1):>6.2f} {mb / 1e6:>10.2f} {ma / 1e6:>10.2f}")
    t = stats["total"]
    lines.append(
        f"total: params {t['params_before']:,} -> {t['params_after']:,} "
        f"({100 * (1 - t['params_after'] / t['params_before']):.1f}% removed); "
        f"MACs {t['macs_before'] / 1e9:.3f} G -> {t['macs_after'] / 1e9:.3f} G "
        f"({t['macs_before'] / max(t['macs_after'], 1):.2f}x fewer); "
        f"prunable params removed {100 * t.get('prunable_removed', 0):.1f}%")
    return "\n".join(lines)


def as_index(v: Optional[Sequence[int]]) -> Index:
    """Normalise an index set (tensor, numpy, range) to a sorted list of ints, keeping ``None``."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        v = v.flatten().tolist()
    return sorted(int(i) for i in v)
