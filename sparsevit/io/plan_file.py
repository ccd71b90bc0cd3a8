"""The plan file: one JSON document, masks embedded as bit-packed base64, checksummed.

Layout (``format_version`` 2)::

    {"format": "sparsevit-plan", "format_version": 2, "family": ..., "blocks": [...], ...,
     "mask_names": [...], "masks": {name: {"shape": [out, in], "bits": base64(packbits(mask))}},
     "sha256": hex}

``sha256`` is taken over the canonical JSON (sorted keys, no whitespace) of everything else, so any
changed value is detected; the file is plain ASCII, so a flipped byte in its layout breaks the
JSON. Version-1 plans (JSON + ``<path>.masks.safetensors``) are still read, with the same checks.

:func:`check_plan_dict` type-checks every field of a plan's JSON form and raises
:class:`~sparsevit.errors.PlanError` naming the field and the fix.
"""
from __future__ import annotations

import base64
import json
from typing import Dict, Optional

import numpy as np
import torch

from sparsevit._io import sha256_hex
from sparsevit.errors import PlanError

FORMAT = "sparsevit-plan"
BLOCK_INDEX_FIELDS = ("heads", "mlp_channels", "attn_in", "attn_out", "mlp_in", "mlp_out")
BLOCK_HEAD_FIELDS = ("qk_channels", "v_channels")
BLOCK_BOOL_FIELDS = ("drop_attn", "drop_mlp")


# ----------------------------------------------------------------------------------- masks
def check_mask(name: str, mask, where: str = "plan") -> torch.Tensor:
    """A 2-D 0/1 mask as a bool tensor; anything else raises PlanError naming ``name``."""
    if not isinstance(mask, torch.Tensor):
        raise PlanError(f"{where}: mask '{name}' is a {type(mask).__name__}, not a tensor; masks are "
                        "boolean tensors of the Linear weight's shape.")
    if mask.dim() != 2:
        raise PlanError(f"{where}: mask '{name}' has shape {tuple(mask.shape)}; masks are 2-D [out, in].")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            bad = mask[(mask != 0) & (mask != 1)].flatten()[:1].tolist()
            raise PlanError(f"{where}: mask '{name}' ({mask.dtype}) holds {bad[0] if bad else 'a value'} besides "
                            "0 and 1; a mask keeps or removes a weight. Threshold it first, e.g. mask > 0.5.")
        mask = mask != 0
    return mask


def encode_mask(mask: torch.Tensor) -> Dict:
    bits = np.packbits(mask.detach().cpu().numpy().astype(np.uint8).reshape(-1))
    return {"shape": [int(s) for s in mask.shape], "bits": base64.b64encode(bits.tobytes()).decode("ascii")}


def decode_mask(name: str, entry, where: str) -> torch.Tensor:
    if not isinstance(entry, dict) or not _is_index(entry.get("shape")) or len(entry["shape"]) != 2 \
            or not isinstance(entry.get("bits"), str):
        raise PlanError(f"{where}: masks['{name}'] must be {{'shape': [out, in], 'bits': base64}}; re-save the plan.")
    try:
        raw = base64.b64decode(entry["bits"].encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise PlanError(f"{where}: masks['{name}'] bits are not valid base64; re-save the plan.") from None
    n = entry["shape"][0] * entry["shape"][1]
    if len(raw) != (n + 7) // 8:
        raise PlanError(f"{where}: masks['{name}'] holds {len(raw)} bytes, shape {entry['shape']} needs "
                        f"{(n + 7) // 8}; re-save the plan.")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:n].astype(bool)
    return torch.from_numpy(bits.copy()).reshape(entry["shape"])


# ----------------------------------------------------------------------------------- type checks
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_index(v) -> bool:
    return isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)


def _fail(where: str, field: str, value, want: str):
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise PlanError(f"{where}: field '{field}' must be {want}, got {shown}. Fix the plan (or re-create it "
                    "with sparsevit.prune / SparsityPlan.dense) and save it again.")


def _check_block(where: str, i: int, b) -> None:
    from sparsevit.plan import BlockPlan

    if not isinstance(b, dict):
        _fail(where, f"blocks[{i}]", b, "an object of block fields")
    known = set(BlockPlan.__dataclass_fields__)
    unknown = sorted(set(b) - known)
    if unknown:
        _fail(where, f"blocks[{i}].{unknown[0]}", b[unknown[0]], f"one of the known fields {sorted(known)}")
    for f in BLOCK_INDEX_FIELDS:
        if b.get(f) is not None and not _is_index(b[f]):
            _fail(where, f"blocks[{i}].{f}", b[f], "null or a list of non-negative integers")
    for f in BLOCK_HEAD_FIELDS:
        v = b.get(f)
        if v is None or _is_index(v):
            continue
        if not (isinstance(v, list) and all(_is_index(h) for h in v)):
            _fail(where, f"blocks[{i}].{f}", v, "null, a list of non-negative integers, or one such list per head")
    for f in BLOCK_BOOL_FIELDS:
        if f in b and not isinstance(b[f], bool):
            _fail(where, f"blocks[{i}].{f}", b[f], "true or false")


def _check_pair(where: str, field: str, v, nm: bool) -> None:
    if v is None:
        return
    if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)):
        _fail(where, field, v, "null or a list of two positive integers")
    if nm and v[0] > v[1]:
        _fail(where, field, v, "[n, m] with n <= m (n kept of every m weights)")


def check_plan_dict(d, where: str = "plan") -> None:
    """Type-check a plan's JSON form (:meth:`SparsityPlan.to_json_dict`); raise PlanError on the first bad field."""
    if not isinstance(d, dict):
        raise PlanError(f"{where} is not a sparsevit plan (a {type(d).__name__}, not a JSON object).")
    if "blocks" not in d or "family" not in d:
        raise PlanError(f"{where} is JSON but not a sparsevit plan (missing 'family'/'blocks').")
    if "format_version" in d and not _is_int(d["format_version"]):
        _fail(where, "format_version", d["format_version"], "an integer")
    if not isinstance(d["family"], str):
        _fail(where, "family", d["family"], "a string such as 'vit', 'beit' or 'swin'")
    if not isinstance(d["blocks"], list):
        _fail(where, "blocks", d["blocks"], "a list with one object per block")
    for i, b in enumerate(d["blocks"]):
        _check_block(where, i, b)
    rc = d.get("residual_channels")
    if rc is not None and not (isinstance(rc, list) and all(r is None or _is_index(r) for r in rc)):
        _fail(where, "residual_channels", rc, "null or a list (one per stage) of null or channel lists")
    depth = d.get("depth")
    if depth is not None and not (_is_int(depth) and depth >= 0):
        _fail(where, "depth", depth, "null or a non-negative integer (blocks kept)")
    _check_pair(where, "block", d.get("block"), nm=False)
    _check_pair(where, "nm", d.get("nm"), nm=True)
    for f in ("signature", "meta"):
        if d.get(f) is not None and not isinstance(d[f], dict):
            _fail(where, f, d[f], "an object")
    names = d.get("mask_names", [])
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        _fail(where, "mask_names", names, "a list of Linear names")


# ----------------------------------------------------------------------------------- file
def canonical(d: Dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def encode_plan(body: Dict, masks: Dict[str, torch.Tensor]) -> str:
    """The file text for a plan's JSON form ``body`` plus its masks (checked, bit-packed, checksummed)."""
    d = dict(body, format=FORMAT, masks={k: encode_mask(check_mask(k, v)) for k, v in sorted(masks.items())})
    d["sha256"] = sha256_hex(canonical(d))
    return json.dumps(d, indent=1, ensure_ascii=True)


def decode_plan(d: Dict, where: str) -> Optional[Dict[str, torch.Tensor]]:
    """Verify a version-2 plan's checksum and decode its masks; None for a version-1 (two-file) plan."""
    if d.get("format") != FORMAT and "sha256" not in d and "masks" not in d:
        return None  # version 1: masks live in the companion safetensors file
    want = d.get("sha256")
    body = {k: v for k, v in d.items() if k != "sha256"}
    if not isinstance(want, str) or sha256_hex(canonical(body)) != want:
        raise PlanError(f"{where} is corrupt (checksum mismatch: the file changed after it was saved); "
                        "re-create the plan or restore it from a copy.")
    masks = d.get("masks")
    if not isinstance(masks, dict):
        _fail(where, "masks", masks, "an object of encoded masks")
    return {k: decode_mask(k, v, where) for k, v in masks.items()}
