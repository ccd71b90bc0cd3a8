"""SparsityPlan: round trips, validation errors that name the block and field, bad inputs."""
import json

import pytest
import torch
from torch import nn

import sparsevit
from sparsevit import BlockPlan, PlanError, SparsityPlan, UnsupportedModelError
from helpers import make_model, random_plan


def test_save_load_round_trip(tmp_path):
    m = make_model("swin_tiny")
    plan = random_plan(m, 0)
    plan.meta["method"] = "test"
    path = tmp_path / "plan.json"
    plan.save(path)
    back = SparsityPlan.load(path)
    assert back.blocks == plan.blocks
    assert back.residual_channels == plan.residual_channels
    assert back.depth == plan.depth
    assert set(back.masks) == set(plan.masks)
    for k in plan.masks:
        assert torch.equal(back.masks[k], plan.masks[k])
    back.validate(m)
    assert back.summary(m) == plan.summary(m)


def test_summary_reports_params_and_macs():
    m = make_model("vit_tiny")
    plan = random_plan(m, 1, kinds=("heads", "mlp"))
    text = plan.summary(m)
    assert "params" in text and "MACs" in text and "removed" in text
    with pytest.raises(PlanError, match="needs the model"):
        SparsityPlan(family="vit", blocks=[]).summary()
    fresh = plan.copy()
    fresh.meta.pop("stats", None)
    assert sparsevit.summary(m, fresh) == text  # the front door and the plan method agree
    assert fresh.summary() == text  # the counts are stored in the plan
    stats = sparsevit.summary(m, fresh, as_dict=True)
    assert stats["total"]["params_after"] < stats["total"]["params_before"]


@pytest.mark.parametrize("edit, match", [
    (lambda p: p.blocks[1].__setattr__("heads", [0, 9]), r"block 1 .*heads.*outside"),
    (lambda p: p.blocks[0].__setattr__("mlp_channels", [3, 3]), r"block 0 .*mlp_channels.*duplicate"),
    (lambda p: p.blocks[2].__setattr__("qk_channels", [[0, 1], [2], [3, 4]]), r"block 2 .*qk_channels.*equal lengths"),
    (lambda p: p.blocks.pop(), r"plan has 2 blocks but the model has 3"),
    (lambda p: p.__setattr__("depth", 7), r"depth=7"),
    (lambda p: p.masks.__setitem__("blocks.0.attn.qkv", torch.ones(3, 3, dtype=torch.bool)), r"mask 'blocks.0.attn.qkv'"),
    (lambda p: p.masks.__setitem__("blocks.0.nope", torch.ones(3, 3, dtype=torch.bool)), r"names no Linear"),
    (lambda p: p.__setattr__("family", "swin"), r"made for a 'swin' model"),
    (lambda p: p.blocks[0].__setattr__("qk_channels", []), r"qk_channels is empty"),
])
def test_validate_names_block_and_field(edit, match):
    m = make_model("vit_tiny")
    plan = SparsityPlan.dense(m)
    edit(plan)
    with pytest.raises(PlanError, match=match):
        plan.validate(m)
    with pytest.raises(PlanError, match=match):
        sparsevit.accelerate(m, plan)


def test_residual_subset_must_respect_global_residual():
    m = make_model("vit_tiny")
    plan = SparsityPlan.dense(m)
    plan.residual_channels = [list(range(0, 192, 2))]
    plan.blocks[0].attn_in = [1, 2, 3]
    with pytest.raises(PlanError, match="attn_in uses residual channels removed"):
        plan.validate(m)


def test_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="invalid JSON"):
        SparsityPlan.load(bad)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"hello": 1}))
    with pytest.raises(PlanError, match="not a sparsevit plan"):
        SparsityPlan.load(foreign)
    with pytest.raises(PlanError, match="not found"):
        SparsityPlan.load(tmp_path / "missing.json")
    m = make_model("vit_tiny")
    plan = random_plan(m, 0, kinds=("masks",))
    p = tmp_path / "p.json"
    plan.save(p)
    p.write_text(p.read_text().replace('"bits": "', '"bits": "AA', 1))  # masks live inside the plan file
    with pytest.raises(PlanError, match="corrupt"):
        SparsityPlan.load(p)


def test_unsupported_models_list_what_is_supported():
    with pytest.raises(UnsupportedModelError, match="Supported: timm VisionTransformer"):
        sparsevit.accelerate(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(UnsupportedModelError, match="expects an nn.Module"):
        sparsevit.accelerate("vit")
    m = make_model("vit_tiny")
    with pytest.raises(PlanError, match="SparsityPlan"):
        sparsevit.accelerate(m, {"heads": [0]})
    with pytest.raises(ValueError, match="unknown backend"):
        sparsevit.accelerate(m, backend="fastest")
    with pytest.raises(TypeError, match="dtype"):
        sparsevit.accelerate(m, dtype=torch.int8)
    fast = sparsevit.accelerate(m)
    with pytest.raises(UnsupportedModelError, match="already accelerated"):
        sparsevit.accelerate(fast)


def test_masked_model_plan_mismatch():
    m = make_model("vit_tiny")
    plan = SparsityPlan.dense(m)
    plan.residual_channels = [list(range(100))]
    masked = sparsevit.masked_model(m, plan)
    with pytest.raises(PlanError, match="masked norm keeps 100"):
        sparsevit.accelerate(masked, SparsityPlan.dense(m))


def test_block_plan_identity():
    assert BlockPlan().is_identity()
    assert not BlockPlan(heads=[0]).is_identity()
