"""The plan file: one checksummed JSON file with embedded masks; every field type-checked."""
import json
import os
import stat

import pytest
import torch

from sparsevit import PlanError, SparsityPlan
from helpers import make_model, random_plan


@pytest.fixture(scope="module")
def plan():
    m = make_model("vit_tiny")
    p = random_plan(m, 3, kinds=("heads", "qk", "mlp", "io", "residual", "masks", "depth"))
    p.block, p.nm = [16, 8], [2, 4]
    return p


def test_round_trip_is_one_file_with_normal_mode(tmp_path, plan):
    path = tmp_path / "plan.json"
    old = os.umask(0o022)
    try:
        plan.save(path)
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    back = SparsityPlan.load(path)
    assert back.blocks == plan.blocks and back.depth == plan.depth and back.residual_channels == plan.residual_channels
    assert back.block == [16, 8] and back.nm == [2, 4]
    assert set(back.masks) == set(plan.masks)
    assert all(torch.equal(back.masks[k], plan.masks[k]) for k in plan.masks)


def test_every_byte_flip_is_detected(tmp_path, plan):
    path = tmp_path / "plan.json"
    plan.save(path)
    data = path.read_bytes()
    bad = tmp_path / "bad.json"
    step = max(1, len(data) // 400)
    for i in list(range(0, len(data), step)) + [len(data) - 1]:
        for flip in (0x01, 0xFF):
            corrupt = bytearray(data)
            corrupt[i] ^= flip
            bad.write_bytes(bytes(corrupt))
            with pytest.raises(PlanError):
                SparsityPlan.load(bad)


def _edited(plan, tmp_path, **fields):
    """A plan file whose JSON has ``fields`` replaced (checksum dropped: as a hand-edited v1 plan)."""
    d = plan.to_json_dict()
    d.update(format_version=1, mask_names=[])
    d.update(fields)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("fields,match", [
    (dict(format_version="1"), "format_version"),
    (dict(mask_names=5), "mask_names"),
    (dict(signature="x"), "signature"),
    (dict(meta=[1]), "meta"),
    (dict(depth=1.5), "depth"),
    (dict(depth=True), "depth"),
    (dict(family=3), "family"),
    (dict(blocks={"a": 1}), "blocks"),
    (dict(blocks=[5]), r"blocks\[0\]"),
    (dict(blocks=[{"heads": [True]}]), r"blocks\[0\]\.heads"),
    (dict(blocks=[{"heads": [-1]}]), r"blocks\[0\]\.heads"),
    (dict(blocks=[{"qk_channels": [[0, 1], "x"]}]), r"blocks\[0\]\.qk_channels"),
    (dict(blocks=[{"drop_mlp": 1}]), r"blocks\[0\]\.drop_mlp"),
    (dict(blocks=[{"hedas": [0]}]), r"blocks\[0\]\.hedas"),
    (dict(residual_channels=[[0.5]]), "residual_channels"),
    (dict(block=[0, 32]), "block"),
    (dict(block=32), "block"),
    (dict(nm=[4, 2]), "nm"),
])
def test_field_types_are_checked(tmp_path, plan, fields, match):
    with pytest.raises(PlanError, match=f"field '{match}"):
        SparsityPlan.load(_edited(plan, tmp_path, **fields))


def test_not_a_plan(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(PlanError, match="not a sparsevit plan"):
        SparsityPlan.load(tmp_path / "list.json")
    with pytest.raises(PlanError, match="directory"):
        SparsityPlan.load(tmp_path)


def test_float_masks_must_be_zero_or_one(tmp_path, plan):
    p = plan.copy()
    name = next(iter(p.masks))
    p.masks[name] = p.masks[name].float() * 0.5
    with pytest.raises(PlanError, match=f"mask '{name}'.*0.5"):
        p.save(tmp_path / "p.json")
    with pytest.raises(PlanError, match="0.5"):
        p.check_types()
    p.masks[name] = plan.masks[name].float()  # exact 0/1 floats are masks
    p.save(tmp_path / "p.json")
    assert SparsityPlan.load(tmp_path / "p.json").masks[name].dtype == torch.bool


def test_in_memory_field_types(plan):
    p = plan.copy()
    p.depth = 1.5
    with pytest.raises(PlanError, match="depth"):
        p.check_types()
    p = plan.copy()
    p.blocks[0].heads = [True]
    with pytest.raises(PlanError, match="heads"):
        p.check_types()


def test_version_1_two_file_plans_still_load(tmp_path, plan):
    from safetensors.torch import save_file

    d = plan.to_json_dict()
    d["format_version"] = 1
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    save_file({k: v.contiguous() for k, v in plan.masks.items()}, str(path) + ".masks.safetensors")
    back = SparsityPlan.load(path)
    assert back.blocks == plan.blocks and set(back.masks) == set(plan.masks)
    save_file({k: v.float() * 0.5 for k, v in plan.masks.items()}, str(path) + ".masks.safetensors")
    with pytest.raises(PlanError, match="0.5"):
        SparsityPlan.load(path)
