"""Importance criteria: every criterion ranks a planted unimportant unit last."""
import pytest
import timm
import torch

import sparsevit
import sparsevit.prune  # noqa: F401  (binds sparsevit.prune)
from sparsevit.prune import criteria as C
from sparsevit.prune.groups import coupled_slices

STRUCTURED = ["l1", "l2", "taylor", "hessian"]


def tiny_vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=5)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


def tiny_swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2,
                             window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=5).eval()


def data(n=3, bs=8, classes=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, classes, (bs,), generator=g))
            for _ in range(n)]


@torch.no_grad()
def scale_slices(model, slices, factor):
    params = dict(model.named_parameters())
    for name, dim, idx in slices:
        p = params[name]
        index = torch.tensor(idx)
        p.index_copy_(dim, index, p.index_select(dim, index) * factor)


@pytest.mark.parametrize("crit", STRUCTURED)
def test_planted_head_ranked_last(crit):
    model = tiny_vit()
    ad = sparsevit.get_adapter(model)
    scale_slices(model, coupled_slices(ad, "head", 1, 2), 1e-3)
    s = C.unit_scores(model, crit, data(), progress=False)
    assert int(s.blocks[1].heads.argmin()) == 2, s.blocks[1].heads


@pytest.mark.parametrize("crit", STRUCTURED)
def test_planted_swin_head_ranked_last(crit):
    model = tiny_swin()
    ad = sparsevit.get_adapter(model)
    scale_slices(model, coupled_slices(ad, "head", 2, 1), 1e-3)
    names = [n for n, _, _ in coupled_slices(ad, "head", 2, 1)]
    assert any("relative_position_bias_table" in n for n in names)
    s = C.unit_scores(model, crit, data(), progress=False)
    assert int(s.blocks[2].heads.argmin()) == 1


@pytest.mark.parametrize("crit", ["taylor", "hessian"])
def test_zero_gradient_mlp_channel_ranked_last(crit):
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[:, 17] = 0  # channel 17 cannot reach the loss: zero gradient
    s = C.unit_scores(model, crit, data(), progress=False)
    mlp = s.blocks[0].mlp
    assert int(mlp.argmin()) == 17 and float(mlp[17]) == 0.0


@pytest.mark.parametrize("crit", ["l1", "l2"])
def test_planted_mlp_channel_magnitude(crit):
    model = tiny_vit()
    ad = sparsevit.get_adapter(model)
    scale_slices(model, coupled_slices(ad, "mlp", 1, 5), 1e-3)
    assert int(C.unit_scores(model, crit).blocks[1].mlp.argmin()) == 5


@pytest.mark.parametrize("crit", STRUCTURED)
def test_planted_head_dim_channels(crit):
    model = tiny_vit()
    ad = sparsevit.get_adapter(model)
    scale_slices(model, coupled_slices(ad, "qk", 0, 3), 1e-3)
    scale_slices(model, coupled_slices(ad, "v", 0, 7), 1e-3)
    s = C.unit_scores(model, crit, data(), progress=False)
    assert int(s.blocks[0].qk_shared.argmin()) == 3
    assert int(s.blocks[0].v_shared.argmin()) == 7


@pytest.mark.parametrize("crit", STRUCTURED)
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_planted_residual_channel(crit, family):
    model = tiny_vit() if family == "vit" else tiny_swin()
    ad = sparsevit.get_adapter(model)
    stage = 0
    scale_slices(model, coupled_slices(ad, "residual", stage, 11), 1e-3)
    s = C.unit_scores(model, crit, data(), progress=False)
    assert int(s.residual[stage].argmin()) == 11


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_residual_group_is_what_masking_removes(family):
    """The coupled slices of a residual channel are exactly the block/non-block weights masking zeroes."""
    model = tiny_vit(class_token=True) if family == "vit" else tiny_swin()
    ad = sparsevit.get_adapter(model)
    plan = sparsevit.SparsityPlan.dense(model)
    keep = [c for c in range(ad.stage_dims[0]) if c != 11]
    plan.residual_channels = [keep] + [None] * (len(ad.stage_dims) - 1)
    from sparsevit.prune.finetune import plan_masks

    masks = plan_masks(model, plan)
    params = dict(model.named_parameters())
    expected = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    for name, dim, idx in coupled_slices(ad, "residual", 0, 11):
        expected[name].index_fill_(dim, torch.tensor(idx), False)
    for n in params:
        if "norm" in n:  # norms are masked by MaskedLayerNorm (keep index), not by zeros
            continue
        got = masks.get(n, torch.ones_like(params[n], dtype=torch.bool))
        assert torch.equal(got, expected[n]), n


def test_lamp_formula():
    w = torch.tensor([[0.5, -2.0], [1.0, 0.1]])
    s = C.lamp_scores(w)
    sq = sorted(w.flatten().square().tolist(), reverse=True)
    ref = {v: v / sum(sq[: i + 1]) for i, v in enumerate(sq)}
    for x, y in zip(w.flatten().square().tolist(), s.flatten().tolist()):
        assert abs(ref[x] - y) < 1e-6
    assert float(s.max()) == pytest.approx(1.0)
    assert int(s.argmin()) == 3


def test_random_is_seeded():
    model = tiny_vit()
    a, b, c = (C.unit_scores(model, "random", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.blocks[0].heads, b.blocks[0].heads)
    assert not torch.equal(a.blocks[0].mlp, c.blocks[0].mlp)


def test_gradient_criteria_leave_model_untouched():
    model = tiny_vit().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    C.unit_scores(model, "taylor", data(), progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_criterion_errors():
    with pytest.raises(ValueError, match="unknown criterion"):
        C.canonical("snip")
    with pytest.raises(ValueError, match="needs gradients"):
        C.unit_scores(tiny_vit(), "hessian")
    with pytest.raises(ValueError, match="unstructured"):
        C.unit_scores(tiny_vit(), "lamp")
