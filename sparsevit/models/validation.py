"""Checking a plan against a model: every error names the block, the field and the fix."""
from __future__ import annotations

from sparsevit.errors import PlanError
from sparsevit.plan import BlockPlan, SparsityPlan


def validate_plan(adapter, plan: SparsityPlan) -> None:
    """Raise :class:`PlanError` when ``plan`` does not fit ``adapter.model``."""
    if not isinstance(plan, SparsityPlan):
        raise PlanError(f"expected a SparsityPlan, got {type(plan).__name__}")
    _check_model_facts(adapter, plan)
    residual = adapter.residual_indices(plan)
    for i, (b, bp) in enumerate(zip(adapter.blocks, plan.blocks)):
        _check_block(b, bp, set(residual[b.stage].tolist()), f"block {i} ({b.fqn})")
    linears = adapter.linear_modules()
    for name, mask in plan.masks.items():
        if name not in linears:
            raise PlanError(f"mask '{name}' names no Linear of this model; prunable Linears look like "
                            f"{next(iter(linears), '?')}.")
        if tuple(mask.shape) != tuple(linears[name].weight.shape):
            raise PlanError(f"mask '{name}' has shape {tuple(mask.shape)}, weight is "
                            f"{tuple(linears[name].weight.shape)}; masks use the original weight shape.")


def _check_model_facts(adapter, plan: SparsityPlan) -> None:
    """Family, depth, per-block signature, depth cut and the global residual channels."""
    if plan.family != adapter.family:
        raise PlanError(f"plan was made for a '{plan.family}' model but this model is '{adapter.family}' "
                        f"({type(adapter.model).__name__}); make the plan on this model.")
    n = len(adapter.blocks)
    if len(plan.blocks) != n:
        raise PlanError(f"plan has {len(plan.blocks)} blocks but the model has {n}; "
                        "the plan was made for another depth/variant.")
    sig = plan.signature.get("blocks")
    if sig is not None:
        for i, (b, s) in enumerate(zip(adapter.blocks, sig)):
            if list(s) != [b.dim, b.num_heads, b.head_dim, b.hidden]:
                raise PlanError(f"block {i}: plan was made for dim/heads/head_dim/hidden {list(s)}, "
                                f"model has {[b.dim, b.num_heads, b.head_dim, b.hidden]}.")
    if plan.depth is not None and not (0 <= plan.depth <= n):
        raise PlanError(f"depth={plan.depth} is outside [0, {n}] blocks.")
    rc = plan.residual_channels
    if rc is not None:
        if len(rc) != len(adapter.stage_dims):
            raise PlanError(f"residual_channels has {len(rc)} stages, model has {len(adapter.stage_dims)}.")
        for s, (r, d) in enumerate(zip(rc, adapter.stage_dims)):
            check_index(r, d, f"residual_channels[stage {s}]")
            if r is not None and len(r) == 0:
                raise PlanError(f"residual_channels[stage {s}] is empty: a model needs at least one channel.")
        adapter._check_residual_supported(plan)


def _check_block(b, bp: BlockPlan, residual: set, where: str) -> None:
    if not isinstance(bp, BlockPlan):
        raise PlanError(f"{where}: expected BlockPlan, got {type(bp).__name__}")
    check_index(bp.heads, b.num_heads, f"{where}.heads")
    check_index(bp.mlp_channels, b.hidden, f"{where}.mlp_channels")
    nh = b.num_heads if bp.heads is None else len(bp.heads)
    for field in ("qk_channels", "v_channels"):
        check_head_channels(getattr(bp, field), nh, b.head_dim, f"{where}.{field}")
    for field in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
        v = getattr(bp, field)
        check_index(v, b.dim, f"{where}.{field}")
        if v is not None and not set(v) <= residual:
            raise PlanError(f"{where}.{field} uses residual channels removed by residual_channels "
                            f"(e.g. {sorted(set(v) - residual)[:5]}); keep them or drop them from the field.")
    qk_len = channel_count(bp.qk_channels, b.head_dim)
    v_len = channel_count(bp.v_channels, b.head_dim)
    if qk_len == 0 and v_len > 0 and nh > 0 and not bp.drop_attn:
        raise PlanError(f"{where}: qk_channels is empty while v channels are kept; attention "
                        "would be uniform. Keep at least one q/k channel or drop the heads.")
    if not b.prunable("qk") and bp.qk_channels is not None:
        raise PlanError(f"{where}: qk_channels cannot be pruned with qk_norm (LayerNorm over the "
                        "head dim: zeroing a channel before the norm is not removing it); prune whole heads "
                        "or v_channels instead.")
    kept = b.hidden if bp.mlp_channels is None else len(bp.mlp_channels)
    if 0 < kept < b.hidden and not b.prunable("mlp"):
        from sparsevit.models.features import activation_facts

        raise PlanError(f"{where}: mlp_channels cannot be pruned: {b.fqn}.mlp.act needs to be elementwise with "
                        f"act(0) = 0, but {activation_facts(b.mlp.act).why}. Keep all MLP channels (None) "
                        "or drop the MLP branch.")


def check_index(v, n: int, where: str) -> None:
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


def check_head_channels(v, n_heads: int, head_dim: int, where: str) -> None:
    if v is None:
        return
    if len(v) > 0 and isinstance(v[0], (list, tuple)):
        if len(v) != n_heads:
            raise PlanError(f"{where} gives {len(v)} per-head lists but {n_heads} heads are kept")
        if len({len(c) for c in v}) > 1:
            raise PlanError(f"{where}: per-head lists must have equal lengths (one head dim per layer), "
                            f"got {sorted({len(c) for c in v})}")
        for h, c in enumerate(v):
            check_index(list(c), head_dim, f"{where}[{h}]")
    else:
        check_index(v, head_dim, where)


def channel_count(v, head_dim: int) -> int:
    if v is None:
        return head_dim
    if len(v) > 0 and isinstance(v[0], (list, tuple)):
        return len(v[0])
    return len(v)
