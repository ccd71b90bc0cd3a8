"""Exact parameter and MAC counts of what ``accelerate`` keeps under a plan, read off the coupling table."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn


def count(adapter, plan) -> Dict:
    """Exact parameter counts and MACs per image of what ``accelerate`` keeps under ``plan``.

    Structured removal is counted exactly (equal to the accelerated model's parameter count);
    weights under an unstructured mask count as their nonzeros (params) and nonzero multiply-adds
    (MACs), i.e. what a sparse kernel stores and computes, not the padding of its blocks.
    """
    residual = adapter.residual_indices(plan)
    dense = adapter.dense_plan()
    blocks = []
    tot_pb = tot_pa = tot_mb = tot_ma = 0
    for i, b in enumerate(adapter.blocks):
        r = adapter.resolve(plan, i, residual)
        _, mb = block_cost(b, adapter.resolve(dense, i), {})
        pb = sum(p.numel() for p in b.block.parameters())
        pa, ma = block_cost(b, r, plan.masks)
        blocks.append({"index": i, "fqn": b.fqn, "params_before": pb, "params_after": pa,
                       "macs_before": mb, "macs_after": ma, "heads": len(r.heads) if r.attn_mode == "full" else 0,
                       "mlp_channels": len(r.hidden) if r.mlp_mode == "full" else 0})
        tot_pb, tot_pa, tot_mb, tot_ma = tot_pb + pb, tot_pa + pa, tot_mb + mb, tot_ma + ma
    full = [torch.arange(d) for d in adapter.stage_dims]
    nb_before, nb_after = sum(nonblock_params(adapter, full).values()), sum(nonblock_params(adapter, residual).values())
    total = {
        "params_before": tot_pb + nb_before, "params_after": tot_pa + nb_after,
        "macs_before": tot_mb + adapter.nonblock_macs(full), "macs_after": tot_ma + adapter.nonblock_macs(residual),
        "prunable_before": tot_pb, "prunable_after": tot_pa,
        "prunable_removed": 1 - tot_pa / max(tot_pb, 1),
    }
    total["params_removed"] = 1 - total["params_after"] / total["params_before"]
    total["mac_ratio"] = total["macs_before"] / max(total["macs_after"], 1)
    return {"blocks": blocks, "total": total}


def nonblock_params(adapter, residual: List[torch.Tensor]) -> Dict[str, int]:
    """Parameter counts outside the blocks once every residual-coupled dim is sliced, by name."""
    kept: Dict[int, Dict[int, int]] = {}
    for s, R in enumerate(residual):
        for e in adapter.nonblock_coupling(s):
            n = len(e.positions(R))
            for t, d in e.tensors():
                kept.setdefault(id(t), {})[d % t.dim()] = n
    in_blocks = {id(p) for b in adapter.blocks for p in b.block.parameters()}
    out = {}
    for name, p in adapter.model.named_parameters():
        if id(p) in in_blocks:
            continue
        dims = kept.get(id(p), {})
        out[name] = math.prod(dims.get(i, size) for i, size in enumerate(p.shape))
    return out


def _unit_params(entries, units: torch.Tensor) -> int:
    """Parameters of ``entries`` (a kind's ``param`` entries) once sliced to ``units``."""
    total = 0
    for e in entries:
        n = len(e.positions(units))
        for t, d in e.tensors():
            total += t.numel() // t.shape[d] * n
    return total


def _norm_params(norm: nn.Module, n_channels: int) -> int:
    """Parameters of a residual-stream norm once sliced to ``n_channels``."""
    return sum(p.numel() // p.shape[-1] * n_channels for p in norm.parameters())


def block_cost(b, r, masks: Dict[str, torch.Tensor]):
    """(params, MACs per image) of a block as accelerate builds it: layer scale is folded into
    proj/fc2, separate q/v biases become one fused qkv bias, rel-pos tables keep the kept heads."""
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
        if b.has_qkv_bias():  # a zero k bias is materialised in the fused qkv bias
            params += len(r.qkv_rows)
        params += _unit_params(b.coupling["head"], r.heads)
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
