"""DIMAP: per-module LAMP thresholds meet the target, never touch non-module layers, tile/N:M shapes,
plans survive save/load and accelerate exactly."""
import copy

import pytest
import torch

import sparsevit
import sparsevit.prune.dimap as D
from helpers import IMG, make_model, rel_err
from sparsevit.prune import tiles
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module", params=["vit_tiny", "swin_tiny"])
def model(request):
    m = make_model(request.param)
    m._key = request.param
    return m


def _lamp(model, name):
    return tiles.lamp_of_tiles(dict(model.named_parameters())[name + ".weight"].detach().square())


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("block", [None, (16, 16)])
def test_per_module_thresholds_reach_target(model, sparsity, block):
    plan = D.dimap(model, sparsity=sparsity, block=block)
    total = plan.summary(model, as_dict=True)["total"]["prunable_removed"]
    assert abs(total - sparsity) < 0.005, f"prunable removed {total:.4f} vs target {sparsity}"
    modules = D.module_layers(sparsevit.get_adapter(model))
    n_weights = sum(lin.weight.numel() for layers in modules.values() for lin in layers.values())
    prunable = sparsevit.SparsityPlan.dense(model).summary(model, as_dict=True)["total"]["prunable_before"]
    expected = sparsity * prunable / n_weights  # the Linear weights also carry the biases' and norms' share
    for name, frac in plan.meta["modules"].items():  # every module loses the same fraction of its weights
        assert abs(frac - expected) < 0.005 + (0.02 if block else 0), (name, frac, expected)
    assert set(plan.masks) <= {n for layers in modules.values() for n in layers}


def test_one_threshold_per_module(model):
    plan = D.dimap(model, sparsity=0.6)
    for module, layers in D.module_layers(sparsevit.get_adapter(model)).items():
        kept = torch.cat([_lamp(model, n)[plan.masks[n]] for n in layers])
        removed = torch.cat([_lamp(model, n)[~plan.masks[n]] for n in layers])
        assert float(removed.max()) <= float(kept.min()), module
    # whole model as one module: one threshold over every layer, and module fractions then differ
    whole = D.dimap(model, sparsity=0.6, scope="model")
    names = list(whole.masks)
    kept = torch.cat([_lamp(model, n)[whole.masks[n]] for n in names])
    removed = torch.cat([_lamp(model, n)[~whole.masks[n]] for n in names])
    assert float(removed.max()) <= float(kept.min())
    fr = list(whole.meta["modules"].values())
    assert max(fr) - min(fr) > 0.01


def test_model_untouched_and_data_free(model):
    before = copy.deepcopy(model.state_dict())
    plan = sparsevit.prune(model, method="dimap", sparsity=0.5)
    assert plan.meta["method"] == "dimap"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("shape", [dict(block=(16, 16)), dict(block=(1, 8)), dict(block=(32, 32)), dict(nm=(2, 4))])
def test_shaped_masks_survive_save_load_and_accelerate(model, shape, tmp_path):
    plan = D.dimap(model, sparsity=0.5, **shape)
    for name, m in plan.masks.items():
        if "nm" in shape:
            assert bool((m.view(m.shape[0], -1, 4).sum(-1) == 2).all()), name
        else:
            assert tiles.is_tile_aligned(m, shape["block"]), name
    plan.save(tmp_path / "p.json")
    back = sparsevit.SparsityPlan.load(tmp_path / "p.json")
    assert back.block == plan.block and back.nm == plan.nm
    assert set(back.masks) == set(plan.masks) and all(torch.equal(back.masks[k], plan.masks[k]) for k in plan.masks)
    _check_accelerates(model, back)


def test_unstructured_accelerates_exactly(model):
    _check_accelerates(model, D.dimap(model, sparsity=0.7))


def _check_accelerates(model, plan):
    fast = sparsevit.accelerate(model, plan)
    x = torch.randn(2, 3, IMG[model._key], IMG[model._key], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out, dense = sparsevit.masked_model(model, plan)(x), fast(x), model(x)
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    assert rel_err(ref, dense) > 1e-4, "the plan changed nothing"


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="scope"):
        D.dimap(model, sparsity=0.5, scope="layer")
    with pytest.raises(sparsevit.PlanError, match="maskable"):
        D.dimap(model, sparsity=0.999)
