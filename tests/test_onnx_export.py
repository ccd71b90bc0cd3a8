"""export_onnx: the ONNX graph computes what the accelerated model computes (checked with ONNX
Runtime), holds exactly the accelerated model's (pruned) parameters, and refuses or densifies
layers that still hold sparse weights."""
import copy

import pytest
import torch

import sparsevit
from helpers import IMG, make_model, random_plan, rel_err

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from sparsevit.deploy import export_onnx  # noqa: E402

STRUCTURED = ("heads", "qk", "v", "mlp", "io", "residual", "depth")


def _structured_plan(model, seed):
    """Random heads / head dims / MLP channels / residual subsets, plus for sure one block that
    reads and writes residual subsets and one whose attention branch is dropped."""
    plan = random_plan(model, seed, kinds=STRUCTURED)
    ad = sparsevit.get_adapter(model)
    R = ad.residual_indices(plan)
    first = plan.blocks[0]
    r = R[ad.blocks[0].stage].tolist()
    first.attn_in, first.attn_out = r[::2], r[1::2]
    first.mlp_in, first.mlp_out = r[::3], r[1::2]
    plan.blocks[1].drop_attn = True
    plan.depth = None
    return plan


def _randomise_norms(model):
    # timm initialises every LayerNorm weight to ones; real ones differ, and the parameter check
    # below should not lean on the exporter merging identical tensors
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


def _run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"pixels": x.numpy()})[0])


@pytest.mark.parametrize("key", ["vit_tiny", "deit_small", "beit_base", "swin_tiny"])
def test_onnx_matches_accelerated_model(key, tmp_path):
    model = _randomise_norms(make_model(key))
    plan = _structured_plan(model, seed=1)
    fast = sparsevit.accelerate(model, plan)
    torch.manual_seed(0)
    x = torch.randn(2, 3, IMG[key], IMG[key])
    before = copy.deepcopy(fast.state_dict())
    report = export_onnx(fast, x, tmp_path / "m.onnx")
    with torch.no_grad():
        ref = fast(x)
        masked = sparsevit.masked_model(model, plan)(x)
    out = _run_onnx(tmp_path / "m.onnx", x)
    assert rel_err(out, ref) < 1e-4, f"onnxruntime vs torch: rel err {rel_err(out, ref):.2e}"
    assert rel_err(out, masked) < 1e-4, "the ONNX graph must also match the masked dense model"
    assert rel_err(ref, model(x).detach()) > 1e-3, "plan did not change the function"
    n_fast = sum(p.numel() for p in fast.parameters())
    n_dense = sum(p.numel() for p in model.parameters())
    assert report.params == report.model_params == n_fast < n_dense
    assert report.constants < 0.1 * n_fast, f"unexpected constants in the graph: {report.constants}"
    assert report.custom_ops.get("sparsevit.layernorm_gather.default", 0) >= 1
    assert report.custom_ops.get("sparsevit.residual_scatter_add.default", 0) >= 1
    for k, v in fast.state_dict().items():
        assert torch.equal(v, before[k]), f"export modified the model ({k})"
    with torch.no_grad():  # and the model still runs (no traced tensors left in its caches)
        assert rel_err(fast(x), ref) < 1e-6


def _unstructured_fast():
    model = make_model("vit_tiny")
    plan = random_plan(model, 0, kinds=("heads", "mlp", "masks"))
    return sparsevit.accelerate(model, plan, backend="reference"), plan, model


def test_sparse_layers_refused_by_default(tmp_path):
    fast, _, _ = _unstructured_fast()
    names = [n for n, _ in sparsevit.deploy.sparse_layers(fast)]
    assert names, "the plan's masks should have left sparse layers"
    with pytest.raises(sparsevit.UnsupportedModelError, match="densify=True") as info:
        export_onnx(fast, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    assert all(n in str(info.value) for n in names), "the error must name every sparse layer"
    assert not (tmp_path / "m.onnx").exists()


def test_densify_exports_sparse_layers_with_warnings(tmp_path):
    fast, plan, model = _unstructured_fast()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="dense Linear"):
        report = export_onnx(fast, x, tmp_path / "m.onnx", densify=True)
    names = [n for n, _ in sparsevit.deploy.sparse_layers(fast)]
    assert report.densified == names and len(report.warnings) == len(names)
    assert "WARNING" in str(report)
    with torch.no_grad():
        ref = sparsevit.masked_model(model, plan)(x)
    out = _run_onnx(tmp_path / "m.onnx", x)
    assert rel_err(out, ref) < 1e-4, f"densified ONNX vs masked model: rel err {rel_err(out, ref):.2e}"


def test_bad_inputs(tmp_path):
    fast = sparsevit.accelerate(make_model("vit_tiny"))
    with pytest.raises(TypeError, match="example input"):
        export_onnx(fast, [1, 3, 32, 32], tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="float32"):
        export_onnx(fast.to(torch.bfloat16), torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(fast.float(), torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", opset=13)
