"""save/load of accelerated models: a data-only file (safetensors + JSON), exact round trips, atomic
writes with normal permissions, every corruption detected, pickles never run."""
import json
import os
import stat
import struct

import pytest
import torch

import sparsevit
from sparsevit import CheckpointError, serialize
from helpers import IMG, make_model, random_plan


def _save_load(tmp_path, key, plan, backend="auto"):
    m = make_model(key)
    fast = sparsevit.accelerate(m, plan(m) if callable(plan) else plan, backend=backend)
    path = tmp_path / "model.sparsevit"
    sparsevit.save(fast, path)
    return fast, path, sparsevit.load(path)


@pytest.mark.parametrize("key,kinds,backend", [
    ("vit_tiny", ("heads", "qk", "v", "mlp", "io", "residual", "drop"), "auto"),
    ("deit_small", ("heads", "mlp", "io", "masks"), "sparse"),  # unstructured masks packed as BSR
    ("beit_base", ("heads", "v", "mlp", "drop", "depth"), "auto"),
    ("swin_tiny", ("heads", "qk", "v", "mlp", "io", "residual", "drop"), "auto"),
])
def test_round_trip_without_original(tmp_path, key, kinds, backend):
    fast, path, back = _save_load(tmp_path, key, lambda m: random_plan(m, 0, kinds=kinds), backend)
    x = torch.randn(2, 3, IMG[key], IMG[key])
    with torch.no_grad():
        assert torch.equal(back(x), fast(x))
    assert back.sparsevit_plan.blocks == fast.sparsevit_plan.blocks
    assert set(back.sparsevit_plan.masks) == set(fast.sparsevit_plan.masks)
    assert [d.as_dict() for d in back.sparsevit_report] == [d.as_dict() for d in fast.sparsevit_report]
    packed = {n for n, m in fast.named_modules() if type(m).__name__ == "SparseLinear"}
    assert packed == {n for n, m in back.named_modules() if type(m).__name__ == "SparseLinear"}
    if backend == "sparse":
        assert packed  # the DeiT case really exercises the packed path
    assert not back.training
    assert [p.name for p in tmp_path.iterdir()] == ["model.sparsevit"]  # no temporary files left
    sparsevit.save(back, tmp_path / "again.sparsevit")  # a loaded model can be saved again


def test_file_is_safetensors_with_json(tmp_path):
    from safetensors import safe_open

    fast, path, _ = _save_load(tmp_path, "vit_tiny", None)
    with safe_open(str(path), "pt") as f:
        doc = json.loads(f.metadata()["sparsevit"])
    assert doc["format"] == "sparsevit-model" and doc["architecture"]["architecture"] == "vit_tiny_patch16_224"
    assert set(doc["versions"]) == {"sparsevit", "timm", "torch"} and doc["accelerate"]["dtype"] == "float32"


def test_save_is_atomic_and_keeps_normal_permissions(tmp_path, monkeypatch):
    fast = sparsevit.accelerate(make_model("vit_tiny"))
    path = tmp_path / "model.sparsevit"
    old = os.umask(0o022)
    try:
        sparsevit.save(fast, path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    good = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(serialize, "_write_file", boom)
    with pytest.raises(OSError, match="disk full"):
        sparsevit.save(fast, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.sparsevit"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.sparsevit"
    torch.save({"format": "sparsevit-model", "x": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="older sparsevit.*trust_pickle=True"):
        sparsevit.load(evil)
    legacy = tmp_path / "legacy.sparsevit"  # the same bytes as a pre-zip pickle
    import pickle

    legacy.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError, match="older sparsevit"):
        sparsevit.load(legacy)
    assert not marker.exists()


def test_trust_pickle_loads_old_files(tmp_path):
    fast = sparsevit.accelerate(make_model("vit_tiny"))
    old = tmp_path / "old.sparsevit"
    torch.save({"format": "sparsevit-model", "format_version": 1, "module": fast,
                "plan": json.dumps(fast.sparsevit_plan.to_json_dict())}, old)
    back = sparsevit.load(old, trust_pickle=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), fast(x))


def _regions(data):
    n = struct.unpack("<Q", data[:8])[0]
    return {"length": range(0, 8), "header": range(8, 8 + n), "tensors": range(8 + n, len(data))}


def test_every_byte_flip_is_detected(tmp_path):
    m = make_model("vit_tiny")
    plan = random_plan(m, 1, kinds=("heads", "mlp", "masks"))
    fast = sparsevit.accelerate(m, plan, backend="sparse")
    path = tmp_path / "m.sparsevit"
    sparsevit.save(fast, path)
    data = path.read_bytes()
    bad = tmp_path / "bad.sparsevit"
    for region, positions in _regions(data).items():
        step = max(1, len(positions) // 50)
        for i in list(positions)[::step] + [positions[-1]]:
            for flip in (0x01, 0xFF):
                corrupt = bytearray(data)
                corrupt[i] ^= flip
                bad.write_bytes(bytes(corrupt))
                with pytest.raises(CheckpointError):
                    sparsevit.load(bad)


def _rewrite(path, out, edit_tensors=None, edit_doc=None):
    """Re-write a saved file with edited contents and a *valid* checksum (a crafted file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        doc = json.loads(f.metadata()["sparsevit"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_doc:
        edit_doc(doc)
    serialize._write_file(str(out), tensors, doc)


def test_crafted_files_with_valid_checksums_are_refused(tmp_path):
    m = make_model("deit_small")
    fast = sparsevit.accelerate(m, random_plan(m, 2, kinds=("io", "masks")), backend="sparse")
    path = tmp_path / "m.sparsevit"
    sparsevit.save(fast, path)
    col = next(k for k in fast.state_dict() if k.endswith("col_indices"))
    read = next(k for k in fast.state_dict() if k.endswith(".head_index"))
    out = tmp_path / "crafted.sparsevit"

    def col_out_of_range(t):
        t["model/" + col][0] = 10_000

    def index_moved(t):
        t["model/" + read][0] = 10_000

    def plan_bad(d):
        d["plan"]["depth"] = 1.5

    for edit in (dict(edit_tensors=col_out_of_range), dict(edit_tensors=index_moved)):
        _rewrite(path, out, **edit)
        with pytest.raises(CheckpointError, match="out of range|does not match"):
            sparsevit.load(out)
    _rewrite(path, out, edit_doc=plan_bad)
    with pytest.raises(CheckpointError, match="plan inside.*depth"):
        sparsevit.load(out)


def test_spec_mismatch_is_named_and_explicit_architecture_fixes_it(tmp_path):
    fast = sparsevit.accelerate(make_model("vit_tiny"))
    good = dict(fast.sparsevit_source["kwargs"])
    fast.sparsevit_source = dict(fast.sparsevit_source, kwargs=dict(good, depth=2))
    with pytest.raises(CheckpointError, match=r"blocks\.2.*architecture="):
        sparsevit.save(fast, tmp_path / "m.sparsevit")
    fast.sparsevit_source = dict(fast.sparsevit_source, kwargs=dict(good, act_layer="gelu_tanh"))
    with pytest.raises(CheckpointError, match=r"mlp\.act.*GELUTanh"):
        sparsevit.save(fast, tmp_path / "m.sparsevit")
    fast.sparsevit_source = {"error": "no pretrained_cfg"}
    with pytest.raises(CheckpointError, match="no pretrained_cfg.*model_kwargs"):
        sparsevit.save(fast, tmp_path / "m.sparsevit")
    sparsevit.save(fast, tmp_path / "m.sparsevit", architecture="vit_tiny_patch16_224", model_kwargs=good)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(sparsevit.load(tmp_path / "m.sparsevit")(x), fast(x))


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        sparsevit.load(tmp_path / "missing.sparsevit")
    with pytest.raises(CheckpointError, match="is a directory"):
        sparsevit.load(tmp_path)
    junk = tmp_path / "junk.sparsevit"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        sparsevit.load(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
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
