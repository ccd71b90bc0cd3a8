"""Shared test helpers: tiny timm configs (fast on 2 CPU cores) and random plans of every kind."""
import random

import timm
import torch
import torch.nn.functional as F

from sparsevit import BlockPlan, SparsityPlan, get_adapter
from sparsevit.ops.bsr import apply_activation

# Small configs of each supported family; image sizes kept tiny for CI.
MODEL_CONFIGS = {
    "vit_tiny": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3)),
    "deit_small": ("deit_small_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=120, num_heads=5)),
    "beit_base": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=96, num_heads=4,
                                                init_values=1.0)),
    "swin_tiny": ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, embed_dim=24,
                                                       depths=(2, 2, 1, 1), num_heads=(2, 3, 4, 4))),
}
IMG = {"vit_tiny": 32, "deit_small": 32, "beit_base": 32, "swin_tiny": 64}


def make_model(key: str, num_classes: int = 7, seed: int = 0):
    torch.manual_seed(seed)
    name, kw = MODEL_CONFIGS[key]
    m = timm.create_model(name, pretrained=False, num_classes=num_classes, **kw).eval()
    # timm zero-initialises biases; give them values so bias slicing is actually exercised
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or n.endswith("q_bias") or n.endswith("v_bias"):
                p.normal_(0, 0.05)
    return m


def random_subset(rng, n, frac_lo=0.3, frac_hi=0.9):
    k = max(1, int(n * rng.uniform(frac_lo, frac_hi)))
    return sorted(rng.sample(range(n), k))


def random_plan(model, seed: int, kinds=("heads", "qk", "v", "mlp", "io", "drop", "residual", "masks", "depth")):
    """A plan that exercises the requested kinds of removal at random places."""
    rng = random.Random(seed)
    ad = get_adapter(model)
    plan = SparsityPlan.dense(model)
    if "residual" in kinds:
        plan.residual_channels = [random_subset(rng, d, 0.6, 0.9) for d in ad.stage_dims]
    R = ad.residual_indices(plan)
    for i, b in enumerate(ad.blocks):
        bp = BlockPlan()
        r = R[b.stage].tolist()
        if "heads" in kinds and b.num_heads > 1 and rng.random() < 0.7:
            bp.heads = random_subset(rng, b.num_heads, 0.3, 0.8)
        nh = b.num_heads if bp.heads is None else len(bp.heads)
        if "qk" in kinds and rng.random() < 0.6:
            if rng.random() < 0.5:
                bp.qk_channels = random_subset(rng, b.head_dim)
            else:
                k = max(1, b.head_dim // 2 - 1)
                bp.qk_channels = [sorted(rng.sample(range(b.head_dim), k)) for _ in range(nh)]
        if "v" in kinds and rng.random() < 0.6:
            bp.v_channels = random_subset(rng, b.head_dim)
        if "mlp" in kinds and rng.random() < 0.8:
            bp.mlp_channels = random_subset(rng, b.hidden, 0.2, 0.7)
        if "io" in kinds and rng.random() < 0.6:
            bp.attn_in = sorted(rng.sample(r, max(1, len(r) // 2)))
            bp.attn_out = sorted(rng.sample(r, max(1, len(r) // 2)))
            bp.mlp_in = sorted(rng.sample(r, max(1, 2 * len(r) // 3)))
            bp.mlp_out = sorted(rng.sample(r, max(1, len(r) // 3)))
        if "drop" in kinds and rng.random() < 0.25:
            if rng.random() < 0.5:
                bp.drop_attn = True
            else:
                bp.mlp_channels = []  # keeps fc2's bias as a constant branch
        plan.blocks[i] = bp
    if "depth" in kinds and rng.random() < 0.5:
        plan.depth = len(ad.blocks) - 1
    if "masks" in kinds:
        g = torch.Generator().manual_seed(seed)
        for name, lin in list(ad.linear_modules().items())[::2]:
            plan.masks[name] = torch.rand(lin.weight.shape, generator=g) > 0.4
    return plan


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def assert_close_to_ref(y, x, ws, b, act, what):
    """A fast kernel's ``y`` against float64 ``act(x @ W^T + b)`` with ``W = ws.to_dense()``:
    |y - ref64| <= 2 * |dense_torch(dtype) - ref64| (max over elements), plus one ulp of slack."""
    wd = ws.to_dense()
    ref = apply_activation(F.linear(x.double(), wd.double(), None if b is None else b.double()), act)
    dense = apply_activation(F.linear(x, wd, b), act)
    err = (y.double() - ref).abs()
    err_dense = (dense.double() - ref).abs().max().item()
    tol = 2 * err_dense + torch.finfo(x.dtype).eps * ref.abs().max().item()
    worst = int(err.argmax())
    r, c = divmod(worst, y.shape[-1])
    assert err.max().item() <= tol, (
        f"{what}: max err {err.max().item():.3g} > 2x dense-torch err {err_dense:.3g} (+1ulp); worst at "
        f"[{r}, {c}]: got {y.reshape(-1, y.shape[-1])[r, c].item():.6g}, float64 ref {ref[r, c].item():.6g}")
