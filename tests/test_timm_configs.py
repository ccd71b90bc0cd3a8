"""Property test over the timm options users have: every configuration sparsevit accepts computes
what the masked dense model computes; every one it cannot handle raises UnsupportedModelError.

Never a third outcome (a model that runs and computes something else): that is the worst bug this
project can have, so the configurations are drawn at random (hypothesis) rather than listed.
"""
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsevit
from helpers import random_plan, rel_err
from sparsevit.errors import PlanError, UnsupportedModelError

ACTS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu")
KINDS = ("heads", "qk", "v", "mlp", "io", "drop", "residual", "masks", "depth")


@st.composite
def vit_config(draw):
    distilled = draw(st.booleans())
    kw = dict(img_size=16, patch_size=8, depth=draw(st.integers(1, 2)), num_classes=5,
              embed_dim=draw(st.sampled_from((24, 36))), num_heads=draw(st.sampled_from((2, 3))),
              mlp_ratio=draw(st.sampled_from((2.0, 3.0))))
    kw["qkv_bias"] = draw(st.booleans())
    if draw(st.booleans()):
        kw["init_values"] = 0.5
    kw.update(qk_norm=draw(st.booleans()), scale_attn_norm=draw(st.booleans()),
              scale_mlp_norm=draw(st.booleans()), act_layer=draw(st.sampled_from(ACTS)))
    if not distilled:  # DeiT distilled has exactly a class and a dist token, token pooling
        kw["reg_tokens"] = draw(st.sampled_from((0, 2)))
        pool = draw(st.sampled_from(("token", "avg", "max")))
        kw["global_pool"] = pool
        if pool == "token":
            kw["class_token"] = True
        else:
            kw["class_token"] = draw(st.booleans())
            kw["fc_norm"] = draw(st.booleans())
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    return name, kw


@st.composite
def beit_config(draw):
    kw = dict(img_size=16, patch_size=8, depth=draw(st.integers(1, 2)), num_classes=5, embed_dim=24,
              num_heads=draw(st.sampled_from((2, 3))), init_values=draw(st.sampled_from((None, 0.5))),
              use_rel_pos_bias=draw(st.booleans()), use_abs_pos_emb=draw(st.booleans()))
    if not kw["use_rel_pos_bias"]:
        kw["use_shared_rel_pos_bias"] = draw(st.booleans())
    return "beit_base_patch16_224", kw


@st.composite
def swin_config(draw):
    kw = dict(img_size=32, patch_size=4, window_size=4, embed_dim=12, depths=(2, 1), num_heads=(2, 3),
              num_classes=5, qkv_bias=draw(st.booleans()), mlp_ratio=draw(st.sampled_from((2.0, 4.0))))
    return "swin_tiny_patch4_window7_224", kw


def _build(name, kw, seed):
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():  # non-zero biases, norms and layer scales so slicing them is exercised
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _check(name, kw, plan_seed, kinds):
    model = _build(name, kw, plan_seed)
    try:
        plan = random_plan(model, plan_seed, kinds=kinds)
    except UnsupportedModelError:
        return  # refused up front: fail closed is a correct answer
    try:
        ref_model = sparsevit.masked_model(model, plan)
    except (UnsupportedModelError, PlanError) as exc:
        # the reference refuses: accelerate must refuse too, never build something
        try:
            sparsevit.accelerate(model, plan)
        except (UnsupportedModelError, PlanError):
            return
        raise AssertionError(f"masked_model refused ({exc}) but accelerate built a model")
    try:
        fast = sparsevit.accelerate(model, plan)
    except UnsupportedModelError:
        return
    size = kw["img_size"]
    x = torch.randn(2, kw.get("in_chans", 3), size, size)
    with torch.no_grad():
        ref, out = ref_model(x), fast(x)
    err = rel_err(out, ref)
    assert err < 1e-4, f"{name} {kw} plan seed {plan_seed}: accelerated != masked (rel err {err:.2e})"


SETTINGS = dict(max_examples=int(__import__("os").environ.get("SPARSEVIT_HYPOTHESIS_EXAMPLES", "20")),
                deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@settings(**SETTINGS)
@given(cfg=vit_config(), plan_seed=st.integers(0, 10_000), kinds=st.sets(st.sampled_from(KINDS), min_size=1))
def test_vit_family_configs(cfg, plan_seed, kinds):
    _check(*cfg, plan_seed, tuple(sorted(kinds)))


@settings(**SETTINGS)
@given(cfg=beit_config(), plan_seed=st.integers(0, 10_000), kinds=st.sets(st.sampled_from(KINDS), min_size=1))
def test_beit_configs(cfg, plan_seed, kinds):
    _check(*cfg, plan_seed, tuple(sorted(kinds)))


@settings(**{**SETTINGS, "max_examples": max(5, SETTINGS["max_examples"] // 2)})
@given(cfg=swin_config(), plan_seed=st.integers(0, 10_000), kinds=st.sets(st.sampled_from(KINDS), min_size=1))
def test_swin_configs(cfg, plan_seed, kinds):
    _check(*cfg, plan_seed, tuple(sorted(kinds)))


def test_unknown_submodule_is_refused():
    """A module inside a block that sparsevit does not know (here a gate) must raise, naming it."""
    model = _build("vit_tiny_patch16_224", dict(img_size=16, patch_size=8, depth=1, num_classes=5), 0)
    model.blocks[0].attn.gate = torch.nn.Linear(model.embed_dim, model.embed_dim)
    try:
        sparsevit.accelerate(model)
    except UnsupportedModelError as exc:
        assert "gate" in str(exc)
    else:
        raise AssertionError("a block with an unknown submodule was accelerated")
