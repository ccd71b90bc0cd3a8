"""HyperSparse loss against its explicit formula and closed-form gradient; the ART schedule
(stop rule, cap, resume) and its plans accelerating exactly."""
import copy
import math
import warnings

import pytest
import timm
import torch

import sparsevit
import sparsevit.prune.art as A
from helpers import IMG, make_model, rel_err
from sparsevit.errors import CheckpointError
from sparsevit.prune import tiles
from sparsevit.prune.hypersparse import HyperSparseLoss
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)


def _weights(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(13, 7, generator=g, dtype=dtype).requires_grad_(),
            (0.1 * torch.randn(29, generator=g, dtype=dtype)).requires_grad_()]


@pytest.mark.parametrize("kappa", [0.3, 0.8, 0.97])
def test_hypersparse_value_and_gradient(kappa):
    ws = _weights()
    hs = HyperSparseLoss(kappa)
    value = hs(ws)
    value.backward()
    got = [w.grad.clone() for w in ws]
    # explicit formula, written out independently: s from the floor(kappa*N)-th smallest |w|
    flat = torch.cat([w.detach().abs().flatten() for w in ws])
    k = int(math.floor(kappa * flat.numel()))
    s = 0.6585 / flat.sort().values[k - 1]
    assert abs(float(hs.scale(ws)) - float(s)) < 1e-5 * float(s)
    ws2 = _weights()
    l1 = sum(w.abs().sum() for w in ws2)
    T = sum(torch.tanh(s * w.abs()).sum() for w in ws2)
    (l1 * T / T.detach() - l1).backward()
    closed = [torch.sign(w) * s / torch.cosh(s * w.abs()) ** 2 * l1.detach() / T.detach() for w in ws2]
    assert abs(float(value.detach())) < 1e-12  # T / sg(T) = 1: the loss only shapes gradients
    for g, a, c in zip(got, (w.grad for w in ws2), closed):
        assert torch.allclose(g, a, rtol=1e-5, atol=1e-12), (g - a).abs().max()
        assert torch.allclose(g, c, rtol=1e-5, atol=1e-12), (g - c).abs().max()
    # small weights are pulled harder than large ones (sech^2 fades)
    w0, g0 = ws[0].detach().abs().flatten(), got[0].abs().flatten()
    assert float(g0[w0.argmin()]) > float(g0[w0.argmax()])


def test_hypersparse_on_a_model_uses_the_prunable_linears():
    m = make_model("vit_tiny")
    hs = HyperSparseLoss(0.5)
    hs(m).backward()
    lin = sparsevit.get_adapter(m).linear_modules()
    assert all(l.weight.grad is not None and float(l.weight.grad.abs().sum()) > 0 for l in lin.values())
    assert m.head.weight.grad is None and m.patch_embed.proj.weight.grad is None
    with pytest.raises(ValueError, match="kappa"):
        HyperSparseLoss(1.0)


def _data(key, classes=3, batches=2, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = IMG[key]
    return [(torch.randn(batch, 3, s, s, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(batches)]


@pytest.mark.parametrize("key,shape", [("vit_tiny", {}), ("vit_tiny", {"block": (16, 16)}),
                                       ("swin_tiny", {"nm": (2, 4)})])
def test_art_two_epochs_accelerates_exactly(key, shape, tmp_path):
    m = make_model(key, num_classes=3)
    before = copy.deepcopy(m.state_dict())
    with warnings.catch_warnings():  # two epochs are too few for the stop rule; the cap's warning is expected
        warnings.simplefilter("ignore", UserWarning)
        plan, trained = A.art(m, sparsity=0.5, data=_data(key, batches=1), warmup=1, max_epochs=1,
                              finetune_epochs=1, return_model=True, progress=False, **shape)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"art modified the user's model ({k})"
    info = plan.meta["art"]
    assert info["art_epochs"] == 1 and len(info["pruned_train_acc"]) == 1
    if "nm" in shape:
        assert plan.nm == [2, 4] and plan.block is None
        assert all(bool((mk.view(mk.shape[0], -1, 4).sum(-1) == 2).all()) for mk in plan.masks.values())
    else:
        assert abs(plan.meta["sparsity"] - 0.5) < 0.005 + (0.01 if shape else 0)
        blk = shape.get("block", (1, 1))
        assert plan.block == list(blk) and all(tiles.is_tile_aligned(mk, blk) for mk in plan.masks.values())
    for name, mk in plan.masks.items():  # the trained weights respect the mask
        w = dict(trained.named_parameters())[name + ".weight"]
        assert bool((w[~mk] == 0).all()), name
    plan.save(tmp_path / "p.json")
    back = sparsevit.SparsityPlan.load(tmp_path / "p.json")
    fast = sparsevit.accelerate(trained, back)
    x = torch.randn(2, 3, IMG[key], IMG[key])
    with torch.no_grad():
        ref, out = sparsevit.masked_model(trained, back)(x), fast(x)
    assert rel_err(out, ref) < 1e-5


def _small_vit():
    """A narrower ViT than helpers' vit_tiny: the schedule tests run several regularised epochs."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                             depth=2, embed_dim=48, num_heads=2).eval()


def _scripted_accuracy(monkeypatch, values):
    """Replace the training-accuracy measurement: per ART epoch the dense model's, then the pruned copy's."""
    values = iter(values)
    monkeypatch.setattr(A, "evaluate", lambda model, data, num_batches=None: next(values))


def test_stop_rule_averages_three_epochs(monkeypatch):
    m = _small_vit()
    # per epoch (dense, pruned): pruned 0.3, 0.7, 0.7 -> means 0.30, 0.50, 0.567 stay below the dense 0.6;
    # then 0.75 -> mean(0.7, 0.7, 0.75) = 0.717 > 0.6 stops after 4 epochs
    _scripted_accuracy(monkeypatch, [0.6, 0.3, 0.6, 0.7, 0.6, 0.7, 0.6, 0.75, 0.6, 0.9])
    plan = A.art(m, sparsity=0.5, data=_data("vit_tiny", batches=1), warmup=0, max_epochs=10, progress=False)
    info = plan.meta["art"]
    assert info["stopped"] == "rule" and info["art_epochs"] == 4
    assert info["best_mean_pruned_train_acc"] == pytest.approx((0.7 + 0.7 + 0.75) / 3)
    assert info["dense_train_acc"] == [0.6] * 4


def test_cap_warns_and_resume_continues(monkeypatch, tmp_path):
    m = _small_vit()
    ck = str(tmp_path / "art.pt")
    _scripted_accuracy(monkeypatch, [0.9, 0.2])
    with pytest.warns(UserWarning, match="stop rule never fired"):
        first = A.art(m, sparsity=0.5, data=_data("vit_tiny", batches=1), warmup=1, max_epochs=1,
                      progress=False, checkpoint=ck)
    assert first.meta["art"]["stopped"] == "max_epochs"
    _scripted_accuracy(monkeypatch, [0.9, 0.95])
    with pytest.warns(UserWarning, match="after 2 ART epochs"):  # mean(0.2, 0.95) < 0.9
        second = A.art(m, sparsity=0.5, data=_data("vit_tiny", batches=1), warmup=1, max_epochs=2,
                       progress=False, resume=ck)
    info = second.meta["art"]
    assert info["pruned_train_acc"] == [0.2, 0.95] and info["art_epochs"] == 2
    assert info["dense_train_acc"] == [0.9, 0.9]


def test_resume_refuses_a_foreign_file(tmp_path):
    ck = str(tmp_path / "ok.pt")
    m = _small_vit()
    with pytest.warns(UserWarning, match="after 0 ART epochs"):
        A.art(m, sparsity=0.5, data=_data("vit_tiny", batches=1), warmup=1, max_epochs=0, progress=False,
              checkpoint=ck)
    with pytest.raises(CheckpointError, match="kappa"):
        A.art(m, sparsity=0.7, data=_data("vit_tiny", batches=1), resume=ck, progress=False)
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not an ART checkpoint"):
        A.art(_small_vit(), sparsity=0.5, data=_data("vit_tiny", batches=1),
              resume=str(bad), progress=False)


def test_prune_front_door_returns_plan_and_model():
    """sparsevit.prune(method="art", return_model=True) hands back (plan, trained masked model)."""
    model = _small_vit()
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,)))]
    plan, trained = sparsevit.prune(model, method="art", sparsity=0.5, data=data, warmup=0, max_epochs=1,
                                    finetune_epochs=1, progress=False, return_model=True)
    assert isinstance(plan, sparsevit.SparsityPlan) and plan.meta["method"] == "art"
    for name, mask in plan.masks.items():
        assert not bool(trained.get_submodule(name).weight[~mask].any()), f"{name}: removed weights not zero"
