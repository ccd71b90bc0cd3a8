"""Masked fine-tuning keeps removed weights at zero; digits data loads without downloads."""
import timm
import torch

import sparsevit
import sparsevit.prune  # noqa: F401  (binds sparsevit.prune / sparsevit.finetune)
from sparsevit.data import digits_loaders
from sparsevit.prune.finetune import evaluate, plan_masks


def tiny():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2,
                             embed_dim=48, num_heads=3, num_classes=3).eval()


def test_digits_loaders():
    tr, va = digits_loaders(classes=[5, 6, 7], img_size=16, batch_size=16, seed=0)
    x, y = next(iter(tr))
    assert x.shape == (16, 3, 16, 16) and x.dtype == torch.float32
    assert set(y.tolist()) <= {0, 1, 2}
    n_tr, n_va = len(tr.dataset), len(va.dataset)
    assert abs(n_va / (n_tr + n_va) - 0.25) < 0.02
    tr2, va2 = digits_loaders(classes=[5, 6, 7], img_size=16, batch_size=16, seed=0)
    assert torch.equal(va.dataset.images, va2.dataset.images)


def test_finetune_keeps_masks_and_accelerates():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr, va = digits_loaders(classes=[0, 1, 2], img_size=16, batch_size=32, seed=0)
    plan = sparsevit.prune(model, criterion="l2", sparsity=0.5, prune_residual=True)
    masks = plan_masks(model, plan)
    losses = []
    trained = sparsevit.finetune(model, plan, tr, epochs=3, lr=2e-3, progress=False,
                                 callback=lambda step, loss: losses.append(loss))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    params = dict(trained.named_parameters())
    for name, m in masks.items():
        if "norm" in name:
            continue
        assert bool((params[name][~m] == 0).all()), name
    # kept weights moved, loss went down
    assert not torch.equal(params["blocks.0.mlp.fc1.weight"], model.blocks[0].mlp.fc1.weight * masks.get(
        "blocks.0.mlp.fc1.weight", 1))
    assert sum(losses[-3:]) < sum(losses[:3])
    fast = sparsevit.accelerate(trained)
    x = next(iter(va))[0]
    with torch.no_grad():
        assert torch.allclose(fast(x), trained(x), atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in fast.parameters()) == plan.meta["stats"]["total"]["params_after"]
    assert evaluate(fast, va) > 0.5


def test_finetune_unstructured_and_inplace():
    model = tiny()
    plan = sparsevit.prune(model, method="magnitude_unstructured", criterion="l1", sparsity=0.5)
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))) for _ in range(2)]
    out = sparsevit.finetune(model, plan, data, epochs=1, lr=1e-3, inplace=True, progress=False)
    assert out is model
    for name, m in plan.masks.items():
        w = dict(model.named_parameters())[name + ".weight"]
        assert bool((w[~m] == 0).all())
