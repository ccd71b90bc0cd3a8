"""P3B: keep-ratio solver, soft masks, reactivation, clean gate removal, exact acceleration."""
import math

import pytest
import torch

import sparsevit
from sparsevit.prune.p3b import P3BPruner, _Schedule, build_plan, p3b_prune
from sparsevit.prune.p3b_alloc import (KeepRatioAllocator, soft_mask, solve_keep_ratios, transform_benefit,
                                       unit_ranks)
from sparsevit.prune.p3b_gates import Gates, read_sites

from helpers import IMG, make_model, rel_err


@pytest.mark.parametrize("seed", range(20))
def test_solver_meets_target_and_clamps(seed):
    g = torch.Generator().manual_seed(seed)
    n = 4 + seed % 20
    imp = torch.rand(n, generator=g, dtype=torch.float64) ** 3 * 10  # skewed: several blocks saturate at 1
    W = torch.randint(1_000, 500_000, (n,), generator=g).double()
    frac = 0.1 + 0.8 * float(torch.rand(1, generator=g))
    target = frac * float(W.sum())
    kr = solve_keep_ratios(imp, W, target)
    assert float(kr.min()) >= 0.0 and float(kr.max()) <= 1.0
    assert abs(float((kr * W).sum()) - target) <= 0.005 * target
    free = (kr > 0) & (kr < 1)
    if int(free.sum()) >= 2:  # unclamped blocks share one scale s: kr = s * imp
        s = kr[free] / imp[free]
        assert torch.allclose(s, s[0].expand_as(s), rtol=1e-9)
        # every block clamped at 1 would have exceeded 1 at that scale
        assert bool((imp[kr >= 1] * s[0] >= 1 - 1e-9).all())


def test_solver_edges():
    W = torch.tensor([10.0, 20.0, 30.0])
    assert torch.equal(solve_keep_ratios(torch.ones(3), W, 60.0), torch.ones(3, dtype=torch.float64))
    assert torch.equal(solve_keep_ratios(torch.ones(3), W, 0.0), torch.zeros(3, dtype=torch.float64))
    kr = solve_keep_ratios(torch.tensor([100.0, 1.0, 1.0]), W, 30.0)
    assert kr[0] == 1.0 and abs(float((kr * W).sum()) - 30.0) < 1e-9


def test_transform_benefit_formula():
    b = torch.tensor([0.5, 0.1, -0.2, 0.05], dtype=torch.float64)
    rem = torch.tensor([100.0, 200.0, 100.0, 50.0], dtype=torch.float64)
    x = 10 * b / 0.5
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    f = torch.tensor([sp(1.4 * v) - sp(1.4 * v - 10) for v in x.tolist()], dtype=torch.float64) / (rem + 1e-6)
    assert torch.allclose(transform_benefit(b, rem), f / f.mean(), rtol=1e-9)


def test_soft_mask_formula():
    N = 37
    pos = torch.randperm(N) + 1
    t, tau = 11, 0.07
    want = torch.tensor([1 / (1 + math.exp(-math.log(9) * (r - t) / (N * tau))) for r in pos.tolist()])
    assert torch.allclose(soft_mask(pos, t, tau), want.float(), atol=1e-6)
    # 0.9 exactly N * tau ranks above the threshold; tau = 0 is the hard mask
    twenty = torch.arange(1, 21)  # N = 20, tau = 0.1: N * tau = 2 ranks
    assert abs(float(soft_mask(twenty, 5, 0.1)[6]) - 0.9) < 1e-6 and float(soft_mask(twenty, 5, 0.1)[4]) == 0.5
    assert torch.equal(soft_mask(pos, t, 0.0), (pos > t).float())


def test_unit_ranks_normalise_per_gate_with_factors():
    # gate 0 has huge scores, gate 1 tiny ones: rank normalisation makes them comparable
    s0, s1 = torch.tensor([1e6, 3e6, 2e6]), torch.tensor([1e-6, 3e-6, 2e-6])
    pos = unit_ranks([s0, s1], [1.0, 1.5])
    r = {i: int(p) for i, p in enumerate(pos)}
    assert sorted(r.values()) == list(range(1, 7))
    assert r[0] < r[3] and r[1] > r[0]  # lowest of gate 1 (1.5/3) beats lowest of gate 0 (1/3)
    assert r[4] == 6  # top of the factor-1.5 gate ranks highest


def _tiny_pruner(sparsity=0.5):
    model = make_model("vit_tiny")
    sites = read_sites(model)
    gates = Gates(sites)
    return model, gates, P3BPruner(sites, gates, sparsity)


def test_disabled_block_is_reactivated():
    model, gates, pruner = _tiny_pruner(0.5)
    n = len(pruner.branches)
    g = torch.Generator().manual_seed(0)
    pruner.scores = [torch.rand(s.numel(), generator=g).double() for s in pruner.scores]

    def step(victim_benefit):
        b = torch.full((n,), 0.3, dtype=torch.float64)
        b[2] = victim_benefit
        pruner.accumulate_benefits(b, b)
        pruner.score_steps = 1
        pruner.scores = [torch.rand(s.numel(), generator=g).double() for s in pruner.scores]
        return pruner.update(1.0, 0.0)

    first = step(-2.0)  # block 2 (attn of layer 1) hurts: it is switched off entirely
    assert 2 in first["disabled"] and first["keep_ratio"][2] < 1e-3
    assert all(float(m.detach().abs().sum()) == 0 for m in pruner.masks(2))
    assert build_plan(model, pruner).blocks[1].drop_attn
    for _ in range(3):
        last = step(5.0)  # ... until its benefit rises above the others
    assert 2 not in last["disabled"] and last["keep_ratio"][2] > 0.5
    assert all(bool((m > 0.5).any()) for m in pruner.masks(2))
    assert not build_plan(model, pruner).blocks[1].drop_attn
    gates.remove()


def test_allocator_ema():
    W = torch.tensor([100.0, 100.0], dtype=torch.float64)
    a = KeepRatioAllocator(W, 100.0, gamma=0.2)
    a.update(torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5]), W)
    first = a.last_cls.clone()
    a.update(torch.tensor([0.5, 1.0]), torch.tensor([0.5, 1.0]), W)
    new = transform_benefit(torch.tensor([0.5, 1.0]), W)
    assert torch.allclose(a.last_cls, 0.2 * new + 0.8 * first)


def test_schedule_pruning_then_finetune_phase():
    s = _Schedule.make(10, 15, warmup=0.2, ramp_end=0.5, sharpen_end=1.0, updates_per_epoch=3, finetune_fraction=0.5)
    assert (s.total, s.prune, s.start, s.final, s.interval) == (150, 75, 15, 75, 5)
    updates = [t for t in range(1, s.total + 1) if s.is_update(t)]
    assert updates[0] == 20 and updates[-1] == 75 and len(updates) == 12  # none in the fine-tune phase
    lr = [s.lr_factor(t, 0.002, 0.1) for t in range(s.total)]
    assert lr[0] == 1.0 and lr[74] < 0.01  # the pruning run's cosine ends near the floor ...
    assert lr[75] < 0.2 and max(lr[75:]) == 1.0 and abs(lr[-1] - 0.002) < 0.01  # ... then a fresh one
    assert all(b >= a for a, b in zip(lr[75:82], lr[76:83]))  # linear warm-up of 8 steps
    whole = _Schedule.make(10, 15, 0.2, 0.5, 0.8, 3)  # finetune_fraction=0: one run, one cosine
    assert whole.prune == whole.total == 150 and whole.final == 120
    with pytest.raises(ValueError, match="finetune_fraction"):
        _Schedule.make(10, 15, 0.2, 0.5, 1.0, 3, finetune_fraction=1.0)


def test_finetune_phase_keeps_masks_fixed():
    model = make_model("vit_tiny", num_classes=5)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(4)]
    res = p3b_prune(model, 0.5, data, epochs=2, finetune_fraction=0.5, progress=False)
    assert res.plan.meta["pruning_steps"] == 4 and res.plan.meta["finetune_steps"] == 4
    assert res.history[-1]["step"] == 4 and res.history[-1]["tau"] == 0.0  # hard at the end of pruning
    assert all(h["step"] <= 4 for h in res.history)
    changed = [k for k, v in res.model.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert changed  # the weights were trained (the input model is untouched)


@pytest.mark.parametrize("key", ["vit_tiny", "swin_tiny"])
def test_gates_removed_cleanly(key):
    model = make_model(key)
    x = torch.randn(2, 3, IMG[key], IMG[key])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
    gates = Gates(read_sites(model))
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-6)  # all-ones gates change nothing
        for m in gates.all_masks():
            m.mul_(0.5)
        assert not torch.allclose(model(x), ref, atol=1e-3)  # ... and the gates are really on the path
    gates.remove()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("key", ["vit_tiny", "deit_small", "swin_tiny"])
def test_p3b_plan_accelerates_exactly(key, tmp_path):
    model = make_model(key, num_classes=5)
    S = IMG[key]
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 3, S, S, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = p3b_prune(model, 0.6, data, epochs=2, progress=False, resume=str(tmp_path / "ck.pt"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # user's model untouched
    plan = res.plan
    plan.validate(model)
    removed = plan.meta["stats"]["total"]["prunable_removed"]
    assert abs(removed - 0.6) < 0.05, removed
    assert any(b.attn_in is not None or b.mlp_channels is not None or b.drop_attn or b.drop_mlp for b in plan.blocks)
    assert all(not isinstance(v, torch.Tensor) for v in plan.meta.values())
    x = torch.randn(3, 3, S, S)
    fast = sparsevit.accelerate(res.model, plan)
    with torch.no_grad():
        ref = sparsevit.masked_model(res.model, plan)(x)
        assert rel_err(fast(x), ref) < 1e-5
        assert rel_err(res.model(x), ref) < 1e-6  # the returned model already is the masked model


def test_p3b_resume_and_registry(tmp_path):
    model = make_model("vit_tiny", num_classes=5)
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(3)]
    ck = str(tmp_path / "ck.pt")
    full = p3b_prune(model, 0.5, data, epochs=2, progress=False, resume=ck)  # writes ck after each epoch
    state = torch.load(ck, weights_only=True)
    assert state["epoch"] == 2
    resumed = p3b_prune(model, 0.5, data, epochs=2, progress=False, resume=ck)  # nothing left to train
    assert resumed.plan.blocks == full.plan.blocks
    with pytest.raises(sparsevit.CheckpointError, match="another run"):
        p3b_prune(model, 0.7, data, epochs=2, progress=False, resume=ck)
    assert "p3b" in sparsevit.prune.available_methods()
    plan = sparsevit.prune(model, method="p3b", sparsity=0.5, data=data, epochs=2, progress=False)
    assert plan.meta["method"] == "p3b" and plan.blocks == full.plan.blocks  # same seed, same run
    with pytest.raises(sparsevit.UnsupportedModelError, match="BeiT"):
        p3b_prune(make_model("beit_base"), 0.5, data, epochs=1, progress=False)
