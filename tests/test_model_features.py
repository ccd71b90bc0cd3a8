"""timm features sparsevit supports instead of refusing (qk-norm, scale norms, activations, DeiT
distilled), the ones it refuses by name (fail closed), and accelerate's own verification."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import sparsevit
from helpers import random_plan, rel_err
from sparsevit import BlockPlan, SparsityPlan
from sparsevit.errors import PlanError, UnsupportedModelError, VerificationError
from sparsevit.models.coupling import NormValues
from sparsevit.models.features import activation_facts
from sparsevit.runtime.modules import ZeroPaddedLayerNorm

VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=4, num_classes=5)


def _vit(name="vit_small_patch16_224", seed=0, **kw):
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, **{**VIT, **kw}).eval()
    with torch.no_grad():  # non-zero biases, norm shifts and layer scales
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _x(seed=1, size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check(model, plan, tol=1e-5):
    ref = sparsevit.masked_model(model, plan)
    fast = sparsevit.accelerate(model, plan)
    with torch.no_grad():
        x = _x()
        err = rel_err(fast(x), ref(x))
    assert err < tol, err
    return ref, fast


# ------------------------------------------------------------------------------ norms inside branches
@pytest.mark.parametrize("feature", ["qk_norm", "scale_attn_norm", "scale_mlp_norm"])
def test_branch_norms_keep_everything_plan_equals_model(feature):
    """Issue 9 item 1: these norms were never applied by the swapped-in modules (0.2-0.5 off)."""
    m = _vit(**{feature: True})
    fast = sparsevit.accelerate(m, SparsityPlan.dense(m))
    with torch.no_grad():
        assert rel_err(fast(_x()), m(_x())) < 1e-5


@pytest.mark.parametrize("feature", ["qk_norm", "scale_attn_norm", "scale_mlp_norm"])
def test_branch_norms_with_heads_v_and_mlp_pruned(feature):
    m = _vit(**{feature: True}, init_values=0.5)
    plan = SparsityPlan.dense(m)
    plan.blocks[0] = BlockPlan(heads=[0, 3], v_channels=[1, 4, 5, 9], mlp_channels=list(range(0, 192, 3)))
    plan.blocks[1] = BlockPlan(v_channels=[[0, 2], [1, 3], [5, 6], [7, 11]], mlp_channels=[5, 17, 100])
    ref, fast = _check(m, plan)
    with torch.no_grad():
        assert rel_err(ref(_x()), m(_x())) > 1e-2  # the plan removes something that matters
    again = sparsevit.accelerate(ref)  # the same plan read back from the zeros
    with torch.no_grad():
        assert rel_err(again(_x()), ref(_x())) < 1e-5
    assert again.sparsevit_plan.blocks[0].heads == [0, 3]


def test_qk_channels_under_qk_norm_are_refused_by_both_paths():
    m = _vit(qk_norm=True)
    plan = SparsityPlan.dense(m)
    plan.blocks[0].qk_channels = [0, 1, 2]
    for build in (sparsevit.masked_model, sparsevit.accelerate):
        with pytest.raises(PlanError, match="qk_norm"):
            build(m, plan)


def test_zero_rows_under_qk_norm_stay_unstructured():
    """A masked model whose q rows are zero must not be read back as q/k-channel pruning."""
    m = _vit(qk_norm=True)
    plan = SparsityPlan.dense(m)
    mask = torch.ones_like(m.blocks[0].attn.qkv.weight, dtype=torch.bool)
    mask[3] = False  # q channel 3 of head 0
    plan.masks["blocks.0.attn.qkv"] = mask
    ref = sparsevit.masked_model(m, plan)
    fast = sparsevit.accelerate(ref)
    assert fast.sparsevit_plan.blocks[0].qk_channels is None
    with torch.no_grad():
        assert rel_err(fast(_x()), ref(_x())) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_zero_padded_layernorm_equals_layernorm_over_zeros(dtype):
    g = torch.Generator().manual_seed(0)
    width, keep = 13, torch.tensor([0, 2, 3, 7, 12])
    w, b = torch.randn(width, generator=g, dtype=torch.float64), torch.randn(width, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, len(keep), generator=g, dtype=torch.float64) * 3 + 1
    full = x.new_zeros(3, 5, width).index_copy(-1, keep, x)
    want = F.layer_norm(full, (width,), w, b, 1e-6)[..., keep]
    norm = ZeroPaddedLayerNorm(NormValues(w[keep], b[keep], 1e-6, width)).to(dtype)
    with torch.no_grad():
        got = norm(x.to(dtype))
    assert got.dtype == dtype
    assert rel_err(got, want) < {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]


# ------------------------------------------------------------------------------------------ activations
@pytest.mark.parametrize("act,fused", [("gelu", "gelu"), ("gelu_tanh", "gelu_tanh"), ("quick_gelu", None),
                                       ("silu", None), ("relu", None)])
def test_activations_with_zero_at_zero_are_pruned(act, fused):
    """Issue 9 item 7: timm's GELU / GELUTanh were refused with a false "needs act(0)=0"."""
    m = _vit(act_layer=act)
    assert activation_facts(m.blocks[0].mlp.act).fused == fused
    plan = SparsityPlan.dense(m)
    plan.blocks[0].mlp_channels = list(range(0, 192, 2))
    _, fast = _check(m, plan)
    assert (fast.blocks[0].mlp.act is None) == (fused is not None)  # fused into fc1, or run as a module


@pytest.mark.parametrize("act", [nn.Softplus(), nn.Sigmoid(), nn.Softmax(dim=-1), nn.PReLU()])
def test_activations_that_cannot_be_sliced_are_refused(act):
    m = _vit()
    for blk in m.blocks:
        blk.mlp.act = act
    assert not activation_facts(act).sliceable
    plan = SparsityPlan.dense(m)
    plan.blocks[1].mlp_channels = [1, 2, 3]
    for build in (sparsevit.masked_model, sparsevit.accelerate):
        with pytest.raises(PlanError, match="blocks.1.mlp.act"):
            build(m, plan)
    fast = sparsevit.accelerate(m, SparsityPlan.dense(m))  # not pruning the hidden channels is fine
    with torch.no_grad():
        assert rel_err(fast(_x()), m(_x())) < 1e-5


# ------------------------------------------------------------------------------------------ DeiT distilled
def test_deit_distilled_with_residual_channels():
    """Issue 9 item 10: the dist token and head_dist follow the residual channels."""
    m = _vit("deit_tiny_distilled_patch16_224", embed_dim=48, num_heads=3)
    plan = random_plan(m, 3, kinds=("heads", "mlp", "residual", "io"))
    assert plan.residual_channels is not None
    _, fast = _check(m, plan)
    kept = len(plan.residual_channels[0])
    assert fast.dist_token.shape[-1] == kept and fast.head_dist.in_features == kept
    assert sparsevit.summary(m, plan, as_dict=True)["total"]["params_after"] == \
        sum(p.numel() for p in fast.parameters())


# ------------------------------------------------------------------------------------------ fail closed
def _refused(model, *names):
    with pytest.raises(UnsupportedModelError) as info:
        sparsevit.accelerate(model)
    for n in names:
        assert n in str(info.value)


def test_unknown_parameter_in_attention_is_refused():
    m = _vit()
    m.blocks[1].attn.temperature = nn.Parameter(torch.ones(4))
    _refused(m, "blocks.1.attn.temperature")


def test_patched_forward_is_refused():
    m = _vit()
    m.blocks[0].mlp.forward = lambda x: x
    _refused(m, "blocks.0.mlp", "patched forward")


def test_subclassed_mlp_is_refused():
    from timm.layers import Mlp

    class MyMlp(Mlp):
        def forward(self, x):
            return super().forward(x) * 2

    m = _vit()
    old = m.blocks[0].mlp
    new = MyMlp(48, 192)
    new.load_state_dict(old.state_dict())
    m.blocks[0].mlp = new
    _refused(m, "blocks.0.mlp", "MyMlp")


def test_rms_qk_norm_is_refused():
    from timm.layers import RmsNorm

    m = _vit(qk_norm=True)
    m.blocks[0].attn.q_norm = RmsNorm(12)
    _refused(m, "blocks.0.attn.q_norm", "RmsNorm")


def test_unknown_top_level_module_is_refused():
    m = _vit()
    m.extra_head = nn.Linear(48, 5)
    _refused(m, "extra_head")


# ------------------------------------------------------------------------------------------ verification
def test_verify_reports_its_cost():
    m = _vit()
    fast = sparsevit.accelerate(m, random_plan(m, 0))
    assert fast.sparsevit_report.verify_seconds > 0
    assert 0 <= fast.sparsevit_report.verify_max_error < 1e-4
    assert not hasattr(sparsevit.accelerate(m, verify=False).sparsevit_report, "verify_seconds")


def test_verify_names_the_first_block_that_diverges(monkeypatch):
    """A wrong build (here: block 1's fc2 bias off by 1) is caught and named, never returned."""
    from sparsevit.models.base import ModelAdapter

    real = ModelAdapter.sliced_mlp

    def wrong(self, b, r):
        v = real(self, b, r)
        if b.index == 1:
            v.fc2_bias = v.fc2_bias + 1.0
        return v

    monkeypatch.setattr(ModelAdapter, "sliced_mlp", wrong)
    m = _vit(depth=3)
    with pytest.raises(VerificationError, match=r"at blocks\.1 "):
        sparsevit.accelerate(m, random_plan(m, 1, kinds=("heads",)))
    sparsevit.accelerate(m, verify=False)  # the check is what caught it


def test_verify_in_bfloat16_passes():
    m = _vit(depth=3, scale_attn_norm=True, scale_mlp_norm=True)
    fast = sparsevit.accelerate(m, random_plan(m, 2, kinds=("heads", "v", "mlp", "residual")), dtype=torch.bfloat16)
    assert next(fast.parameters()).dtype == torch.bfloat16
    assert fast.sparsevit_report.verify_seconds > 0
    assert next(m.parameters()).dtype == torch.float32  # the user's model is untouched


@pytest.mark.parametrize("name,kw", [
    ("vit_small_patch16_224", dict(qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True, act_layer="quick_gelu")),
    ("deit_tiny_distilled_patch16_224", dict(num_heads=3))])
def test_new_features_save_and_load(tmp_path, name, kw):
    m = _vit(name, **kw)
    fast = sparsevit.accelerate(m, random_plan(m, 5, kinds=("heads", "v", "mlp", "residual", "masks")))
    sparsevit.save(fast, tmp_path / "m.sparsevit")
    back = sparsevit.load(tmp_path / "m.sparsevit")
    with torch.no_grad():
        assert rel_err(back(_x()), fast(_x())) < 1e-6


def test_safetensors_header_length_starting_with_0x80_is_not_a_pickle(tmp_path):
    """A safetensors header of length 0x..80 starts with the pickle PROTO byte; it must still load
    (1 in 256 saved files hit this before)."""
    from sparsevit._io import first_bytes, is_torch_pickle

    path = tmp_path / "x.safetensors"
    header = b'{"__metadata__":{"k":"' + b"x" * (0x180 - 25) + b'"}}'
    assert len(header) == 0x180
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    assert first_bytes(str(path))[:1] == b"\x80"
    assert not is_torch_pickle(first_bytes(str(path)))
    pickled = tmp_path / "old.pt"
    torch.save({"a": 1}, pickled, _use_new_zipfile_serialization=False)
    assert is_torch_pickle(first_bytes(str(pickled)))
    torch.save({"a": 1}, pickled)
    assert is_torch_pickle(first_bytes(str(pickled)))
