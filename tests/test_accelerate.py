"""accelerate(model, plan) must compute what the masked dense model computes, for every family and
every kind of structured removal, and leave the user's model alone."""
import copy

import pytest
import torch

import sparsevit
from helpers import IMG, MODEL_CONFIGS, make_model, random_plan, rel_err

STRUCTURED = ("heads", "qk", "v", "mlp", "io", "drop", "residual", "depth")


def _outputs(model, fast, plan, batch, seed=0):
    torch.manual_seed(seed)
    size = IMG[model._key]
    x = torch.randn(batch, 3, size, size)
    masked = sparsevit.masked_model(model, plan)
    with torch.no_grad():
        return masked(x), fast(x), model(x)


@pytest.fixture(params=list(MODEL_CONFIGS))
def model(request):
    m = make_model(request.param)
    m._key = request.param
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_structured_plan_matches_masked_model(model, seed, batch):
    plan = random_plan(model, seed, kinds=STRUCTURED)
    before = copy.deepcopy(model.state_dict())
    fast = sparsevit.accelerate(model, plan)
    ref, out, dense = _outputs(model, fast, plan, batch, seed)
    assert rel_err(out, ref) < 1e-5, f"accelerated vs masked: rel err {rel_err(out, ref):.2e}"
    assert rel_err(ref, dense) > 1e-4, "plan did not change the function; the test would not catch a no-op"
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), f"accelerate modified the input model ({k})"


@pytest.mark.parametrize("seed", [0, 1])
def test_param_count_matches_accelerated_model(model, seed):
    plan = random_plan(model, seed, kinds=STRUCTURED)
    fast = sparsevit.accelerate(model, plan)
    stats = plan.summary(model, as_dict=True)["total"]
    n_fast = sum(p.numel() for p in fast.parameters())
    assert stats["params_after"] == n_fast
    dense = sparsevit.SparsityPlan.dense(model).summary(model, as_dict=True)["total"]
    assert dense["params_after"] == sum(p.numel() for p in sparsevit.accelerate(model).parameters())


def test_macs_match_flop_counter(model):
    from torch.utils.flop_counter import FlopCounterMode

    plan = random_plan(model, 5, kinds=("heads", "qk", "v", "mlp", "io", "drop"))
    fast = sparsevit.accelerate(model, plan)
    stats = plan.summary(model, as_dict=True)["total"]
    x = torch.randn(1, 3, IMG[model._key], IMG[model._key])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for m, key in ((model, "macs_before"), (fast, "macs_after")):
        # the math backend decomposes attention into matmuls the counter always sees
        with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            m(x)
        measured = fc.get_total_flops() / 2
        assert abs(measured - stats[key]) / measured < 0.02, (key, measured, stats[key])


def test_plan_read_from_zeros(model):
    plan = random_plan(model, 3, kinds=STRUCTURED)
    masked = sparsevit.masked_model(model, plan)
    fast = sparsevit.accelerate(masked)  # plan=None: read from the zeros
    x = torch.randn(2, 3, IMG[model._key], IMG[model._key])
    with torch.no_grad():
        assert rel_err(fast(x), masked(x)) < 1e-5
    inferred = fast.sparsevit_plan
    ref = plan.summary(model, as_dict=True)["total"]["params_after"]
    assert inferred.summary(masked, as_dict=True)["total"]["params_after"] <= ref


def test_inference_mode_and_compile(model):
    plan = random_plan(model, 4, kinds=STRUCTURED)
    fast = sparsevit.accelerate(model, plan)
    x = torch.randn(2, 3, IMG[model._key], IMG[model._key])
    with torch.inference_mode():
        y = fast(x)
    ref = sparsevit.masked_model(model, plan)(x).detach()
    assert rel_err(y, ref) < 1e-5
    if model._key == "vit_tiny":  # one family under torch.compile keeps CI time bounded
        compiled = torch.compile(fast)
        with torch.no_grad():
            assert rel_err(compiled(x), ref) < 1e-5


def test_vit_keyword_arguments_survive():
    m = make_model("vit_tiny")
    m._key = "vit_tiny"
    plan = random_plan(m, 1, kinds=("heads", "qk", "v", "mlp"))
    fast = sparsevit.accelerate(m, plan)
    masked = sparsevit.masked_model(m, plan)
    x = torch.randn(2, 17, m.embed_dim)
    mask = torch.rand(17, 17) > 0.3
    mask |= torch.eye(17, dtype=torch.bool)
    with torch.no_grad():
        for i in range(len(m.blocks)):
            for kw in ({"attn_mask": mask}, {"is_causal": True}):
                assert rel_err(fast.blocks[i](x, **kw), masked.blocks[i](x, **kw)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_conversion(dtype):
    m = make_model("vit_tiny")
    m._key = "vit_tiny"
    plan = random_plan(m, 2, kinds=STRUCTURED)
    fast = sparsevit.accelerate(m, plan, dtype=dtype)
    assert next(fast.parameters()).dtype == dtype
    assert next(m.parameters()).dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    ref = sparsevit.masked_model(m, plan).double()(x.double()).detach()
    out = fast(x.to(dtype)).detach()
    tol = 1e-10 if dtype == torch.float64 else 0.1
    assert rel_err(out, ref) < tol


def test_inplace_replaces_modules():
    m = make_model("vit_tiny")
    plan = random_plan(m, 0, kinds=("heads", "mlp"))
    fast = sparsevit.accelerate(m, plan, inplace=True)
    assert fast is m
    assert type(m.blocks[0]).__name__ == "SparseBlock"


def test_report_lists_every_linear():
    m = make_model("vit_tiny")
    plan = random_plan(m, 0, kinds=("heads", "mlp"))
    fast = sparsevit.accelerate(m, plan)
    names = {d.name for d in fast.sparsevit_report}
    for i in range(3):
        for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert f"blocks.{i}.{lin}" in names or any(n.startswith(f"blocks.{i}.") and "dropped" for n in names)
    assert "reason" in fast.sparsevit_report[0].as_dict()
    assert "dense" in fast.sparsevit_report.table()


@pytest.mark.parametrize("backend", ["auto", "cpp", "reference"])
def test_full_plan_with_unstructured_masks(model, backend):
    """Every kind of removal at once, including unstructured masks packed into block-sparse kernels."""
    from sparsevit import _ext

    if backend == "cpp" and not _ext.has_op("bsr_linear"):
        pytest.skip("compiled extension not built")
    plan = random_plan(model, 7)
    assert plan.masks
    fast = sparsevit.accelerate(model, plan, backend=backend)
    ref, out, _ = _outputs(model, fast, plan, 3)
    assert rel_err(out, ref) < 1e-5
    packed = [d for d in fast.sparsevit_report if d.action == "packed"]
    if backend != "auto":
        assert packed, "forced sparse backend packed nothing"


def test_beit_shared_relative_position_bias():
    """BeiT with one rel-pos table shared by all blocks: each block slices it to its kept heads."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=96, num_heads=4,
                          num_classes=5, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=1.0).eval()
    with torch.no_grad():
        m.rel_pos_bias.relative_position_bias_table.normal_(0, 0.5)
    plan = random_plan(m, 3, kinds=("heads", "qk", "v", "mlp", "io"))
    fast = sparsevit.accelerate(m, plan)
    masked = sparsevit.masked_model(m, plan)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fast(x), masked(x)) < 1e-5
        assert rel_err(masked(x), m(x)) > 1e-4


def test_relative_position_cache_follows_loaded_weights():
    m = make_model("swin_tiny")
    fast = sparsevit.accelerate(m, random_plan(m, 0, kinds=("heads", "mlp")))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = fast(x)  # builds the cached [1, H, N, N] bias
        state = {k: (v * 50 if k.endswith("relative_position_bias_table") else v) for k, v in fast.state_dict().items()}
        fast.load_state_dict(state)
        fresh = copy.deepcopy(fast)
        for mod in fresh.modules():
            if hasattr(mod, "_rel_cache"):
                mod._rel_cache = None
        after = fast(x)
    assert rel_err(after, fresh(x)) < 1e-6
    assert rel_err(after, before) > 1e-4


def test_result_is_entirely_in_eval_mode():
    m = make_model("swin_tiny").train()
    fast = sparsevit.accelerate(m, random_plan(m, 0, kinds=("heads", "mlp")))
    assert not any(mod.training for mod in fast.modules())
    assert m.training  # the user's model keeps its mode


def test_coupling_table_knows_beit_layout():
    """A BeiT head couples its q/k/v rows, its q_bias and v_bias entries (k has no bias), its proj
    columns and its rel-pos table column: the layout the adapter writes once."""
    from sparsevit.prune.groups import coupled_slices

    m = make_model("beit_base")
    ad = sparsevit.get_adapter(m)
    b = ad.blocks[0]
    got = {}
    for n, d, idx in coupled_slices(ad, "head", 0, 1):  # q, k and v each list their qkv rows
        got[(n, d)] = got.get((n, d), []) + idx
    hd, HD = b.head_dim, b.num_heads * b.head_dim
    ch = list(range(hd, 2 * hd))
    assert got[("blocks.0.attn.qkv.weight", 0)] == ch + [HD + c for c in ch] + [2 * HD + c for c in ch]
    assert got[("blocks.0.attn.q_bias", 0)] == ch and got[("blocks.0.attn.v_bias", 0)] == ch
    assert got[("blocks.0.attn.proj.weight", 1)] == ch
    assert got[("blocks.0.attn.relative_position_bias_table", 1)] == [1]
    bias = b.qkv_bias()
    assert torch.equal(bias[HD:2 * HD], torch.zeros(HD)) and torch.equal(bias[:HD], b.attn.q_bias)


def test_window_partition_matches_timm():
    from timm.models.swin_transformer import window_partition as timm_partition

    from sparsevit.runtime.modules import window_partition, window_reverse

    x = torch.randn(2, 8, 12, 5)
    ours = window_partition(x, (4, 3))
    assert torch.equal(ours, timm_partition(x, (4, 3)).view(-1, 12, 5))
    assert torch.equal(window_reverse(ours, (4, 3), 8, 12), x)


def test_swin_dynamic_mask_is_refused():
    m = make_model("swin_tiny")
    for stage in m.layers:
        for blk in stage.blocks:
            blk.dynamic_mask = True
    with pytest.raises(sparsevit.UnsupportedModelError, match="dynamic_mask"):
        sparsevit.accelerate(m)


def test_export_leaves_the_relative_position_cache_real(tmp_path):
    """Tracing (torch.export) must not leave a fake tensor in the cached rel-pos bias of the eager model."""
    model = make_model("beit_base")
    fast = sparsevit.accelerate(model, random_plan(model, 1, kinds=("heads", "mlp")))
    x = torch.randn(2, 3, IMG["beit_base"], IMG["beit_base"])
    for m in fast.modules():
        if hasattr(m, "_rel_cache"):
            m._rel_cache = None  # as after loading: the first forward happens under tracing
    sparsevit.export(fast, x, str(tmp_path / "beit.pt2"))
    with torch.no_grad():
        out = fast(x)
        ref = sparsevit.masked_model(model, fast.sparsevit_plan)(x)
    assert rel_err(out, ref) < 1e-5
