"""save/load of accelerated models: exact round trip, atomic writes, clear errors on bad files."""
import pytest
import torch

import sparsevit
from sparsevit import CheckpointError
from helpers import IMG, make_model, random_plan


@pytest.mark.parametrize("key", ["vit_tiny", "swin_tiny"])
def test_round_trip_without_original(tmp_path, key):
    m = make_model(key)
    plan = random_plan(m, 0, kinds=("heads", "qk", "v", "mlp", "io", "residual", "drop"))
    fast = sparsevit.accelerate(m, plan)
    path = tmp_path / "model.sparsevit"
    sparsevit.save(fast, path)
    del m
    back = sparsevit.load(path)
    x = torch.randn(2, 3, IMG[key], IMG[key])
    with torch.no_grad():
        assert torch.equal(back(x), fast(x))
    assert back.sparsevit_plan.blocks == plan.blocks
    assert not back.training
    assert [p.name for p in tmp_path.iterdir()] == ["model.sparsevit"]  # no temporary files left


def test_save_is_atomic(tmp_path, monkeypatch):
    m = make_model("vit_tiny")
    fast = sparsevit.accelerate(m)
    path = tmp_path / "model.sparsevit"
    sparsevit.save(fast, path)
    good = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        sparsevit.save(fast, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.sparsevit"]


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        sparsevit.load(tmp_path / "missing.sparsevit")
    junk = tmp_path / "junk.sparsevit"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        sparsevit.load(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a sparsevit model"):
        sparsevit.load(other)
    fast = sparsevit.accelerate(make_model("vit_tiny"))
    sparsevit.save(fast, tmp_path / "ok.sparsevit")
    truncated = tmp_path / "truncated.sparsevit"
    truncated.write_bytes((tmp_path / "ok.sparsevit").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        sparsevit.load(truncated)
    with pytest.raises(CheckpointError, match="expects a model returned by sparsevit.accelerate"):
        sparsevit.save(make_model("vit_tiny"), tmp_path / "x.sparsevit")


def test_export_round_trip(tmp_path):
    from sparsevit.benchmark import plan_structured_then_block_sparse

    m = make_model("vit_tiny")
    fast = sparsevit.accelerate(m, plan_structured_then_block_sparse(m, 0.5, 0.7))
    x = torch.randn(2, 3, 32, 32)
    sparsevit.export(fast, x, tmp_path / "m.pt2")
    program = torch.export.load(str(tmp_path / "m.pt2"))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), fast(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="example input"):
        sparsevit.export(fast, None, tmp_path / "n.pt2")
