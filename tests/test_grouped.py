"""Grouped structural pruning: coupled slices go together, accelerate == masked, counts are exact."""
import pytest
import timm
import torch

import sparsevit
import sparsevit.prune  # noqa: F401  (binds sparsevit.prune)
from sparsevit.errors import PlanError
from sparsevit.prune import criteria as C

TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)),
    "deit": ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)),
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=24,
                                                  depths=(2, 2), num_heads=(2, 4))),
}
_CACHE = {}


def tiny(family):
    if family not in _CACHE:
        torch.manual_seed(0)
        name, kw = TINY[family]
        m = timm.create_model(name, pretrained=False, num_classes=5, **kw).eval()
        with torch.no_grad():  # non-trivial biases / layer scales so that dropping them would show
            for n, p in m.named_parameters():
                if n.endswith("bias") or "gamma" in n or ".ls" in n:
                    p.normal_(0, 0.5)
        _CACHE[family] = m
    return _CACHE[family]


def data(n=2, bs=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, 5, (bs,), generator=g)) for _ in range(n)]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def check_plan(model, plan):
    fast = sparsevit.accelerate(model, plan)
    masked = sparsevit.masked_model(model, plan).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = masked(x), fast(x)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1e-5, rel
    stats = plan.meta["stats"]["total"]
    assert abs(n_params(fast) - stats["params_after"]) <= 0.005 * stats["params_after"]
    return fast


@pytest.mark.parametrize("family", ["vit", "deit", "beit", "swin"])
@pytest.mark.parametrize("opts", [dict(), dict(prune_residual=True, prune_head_dims=True)],
                         ids=["heads+mlp", "residual+headdims"])
def test_accelerate_matches_masked(family, opts):
    if family in ("deit", "beit") and opts:
        opts = dict(prune_head_dims=True)
    model = tiny(family)
    plan = sparsevit.prune(model, criterion="taylor", sparsity=0.5, data=data(), progress=False, **opts)
    assert plan.meta["stats"]["total"]["prunable_removed"] >= 0.5
    assert plan.meta["method"] == "grouped" and plan.meta["criterion"] == "taylor"
    if opts.get("prune_residual"):
        assert plan.residual_channels is not None
    check_plan(model, plan)
    text = plan.summary()
    assert "removed" in text and "MACs" in text


@pytest.mark.parametrize("target", [0.5, 0.75, 0.95])
def test_sparsity_targets(target):
    model = tiny("vit")
    plan = sparsevit.prune(model, criterion="l2", sparsity=target, prune_residual=target > 0.9,
                           prune_head_dims=target > 0.9)
    got = plan.meta["stats"]["total"]["prunable_removed"]
    assert target <= got < target + 0.05
    for bp in plan.blocks:  # never every head of a layer
        assert bp.heads is None or len(bp.heads) >= 1
        assert not bp.drop_attn and not bp.drop_mlp
    check_plan(model, plan)


def test_mac_target_and_round_to():
    model = tiny("vit")
    plan = sparsevit.prune(model, criterion="l1", sparsity=None, macs=0.4, round_to=8, prune_residual=True)
    t = plan.meta["stats"]["total"]
    assert 1 - t["macs_after"] / t["macs_before"] >= 0.4
    for bp in plan.blocks:
        assert bp.mlp_channels is None or len(bp.mlp_channels) % 8 == 0
    assert all(r is None or len(r) % 8 == 0 for r in plan.residual_channels or [])
    check_plan(model, plan)


def test_swin_residual_with_rounding():
    model = tiny("swin")
    plan = sparsevit.prune(model, criterion="l2", sparsity=0.6, prune_residual=True, round_to=4)
    assert plan.residual_channels is not None
    check_plan(model, plan)


def test_prune_does_not_touch_model_and_roundtrips(tmp_path):
    model = tiny("beit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = sparsevit.prune(model, criterion="hessian", sparsity=0.5, data=data(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    plan.save(tmp_path / "p.json")
    again = sparsevit.SparsityPlan.load(tmp_path / "p.json")
    assert again.blocks == plan.blocks and again.meta["criterion"] == "hessian"


def test_scores_are_reusable_and_ranking_is_global():
    model = tiny("vit")
    scores = C.unit_scores(model, "l2")
    a = sparsevit.prune(model, criterion="l2", sparsity=0.5, scores=scores)
    b = sparsevit.prune(model, criterion="l2", sparsity=0.75, scores=scores)
    assert b.meta["stats"]["total"]["params_after"] < a.meta["stats"]["total"]["params_after"]
    assert set(a.meta["channel_ratios"]) == {"head", "mlp"}


def test_unstructured_masks():
    model = tiny("vit")
    plan = sparsevit.prune(model, method="magnitude_unstructured", criterion="lamp", sparsity=0.5)
    assert plan.masks and abs(plan.meta["stats"]["total"]["prunable_removed"] - 0.5) < 0.01
    blk = sparsevit.prune(model, method="magnitude_unstructured", criterion="l1", sparsity=0.4, block=(8, 8))
    for name, m in blk.masks.items():
        tiles = m.view(m.shape[0] // 8, 8, m.shape[1] // 8, 8)
        assert bool((tiles.all(dim=(1, 3)) | ~tiles.any(dim=(1, 3))).all()), name  # whole tiles only
    assert blk.meta["stats"]["total"]["prunable_removed"] >= 0.4
    masked = sparsevit.masked_model(model, plan)
    assert sparsevit.SparsityPlan.from_masked_model(masked).masks.keys() == plan.masks.keys()


def test_errors_name_the_fix():
    model = tiny("vit")
    with pytest.raises(ValueError, match="unknown pruning method"):
        sparsevit.prune(model, method="magic", criterion="l1")
    with pytest.raises(ValueError, match="unknown criterion"):
        sparsevit.prune(model, criterion="snip")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparsevit.prune(model, criterion="l1", sparsity=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparsevit.prune(model, criterion="l1", sparsity=-0.1)
    with pytest.raises(ValueError, match="data="):
        sparsevit.prune(model, criterion="taylor", sparsity=0.5)
    with pytest.raises(PlanError, match="cannot be met"):
        sparsevit.prune(model, criterion="l1", sparsity=0.9, prune_heads=False)
    with pytest.raises(ValueError, match="unknown criterion"):
        sparsevit.prune(model, criterion="lamp")
