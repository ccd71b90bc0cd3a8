"""SLS: the cut rule, the planted cut on synthetic features (real t-SNE + silhouette), plans that
accelerate exactly and survive save/load, head-only retraining."""
import copy

import numpy as np
import pytest
import torch

import sparsevit
import sparsevit.prune.sls as S
from helpers import IMG, make_model, rel_err
from single_thread import one_torch_thread  # noqa: F401  (autouse fixture)


def test_choose_depth_walks_down_from_the_last_block():
    # T = 0.3 * 0.8 = 0.24; blocks 5..3 pass, block 2 fails: keep blocks 0..3
    assert S.choose_depth([0.0, 0.1, 0.2, 0.5, 0.9, 0.8]) == (4, pytest.approx(0.24))
    # a dip below T near the end stops the walk there, even if earlier blocks score high
    assert S.choose_depth([0.9, 0.9, 0.1, 0.8])[0] == 4
    assert S.choose_depth([0.9, 0.9, 0.8, 0.8])[0] == 1
    assert S.choose_depth([0.1, 0.2, -0.1], alpha=0.3)[0] == 3  # negative SC_last: no cut


def _planted_features(n_blocks=6, peak=3, per_class=30, dim=16, seed=0):
    """Class separation 0 before ``peak``, strongest at ``peak``, decaying but well above 0.3x after."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    centres = rng.normal(size=(3, dim)) * 4
    feats = []
    for i in range(n_blocks):
        sep = 0.0 if i < peak else 1.0 / (1 + 0.3 * (i - peak))
        feats.append(rng.normal(size=(len(labels), dim)) + sep * centres[labels])
    return feats, labels


def test_planted_cut_is_found_with_tsne_and_silhouette():
    from threadpoolctl import threadpool_limits

    feats, labels = _planted_features()
    with threadpool_limits(limits=1):  # 90 points: threads only add OpenMP spin-waits on a busy CI box
        scores = [S.silhouette_after_tsne(f, labels, seed=0) for f in feats]
    assert max(scores[:3]) < 0.1 and min(scores[3:]) > 0.4, scores
    assert int(np.argmax(scores)) == 3
    assert S.choose_depth(scores)[0] == 4


@pytest.mark.parametrize("key", ["vit_tiny", "swin_tiny"])
def test_sls_plan_accelerates_exactly_and_round_trips(key, monkeypatch, tmp_path):
    m = make_model(key, num_classes=3)
    n_blocks = len(sparsevit.get_adapter(m).blocks)
    planted = [0.0] + [0.5] * (n_blocks - 1)  # every block from 1 on separates: keep blocks 0..1
    calls = []

    def fake_silhouette(features, labels, seed=0):
        calls.append(features.shape)
        return planted[len(calls) - 1]

    monkeypatch.setattr(S, "silhouette_after_tsne", fake_silhouette)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 3, IMG[key], IMG[key], generator=g), torch.arange(6) % 3) for _ in range(2)]
    before = copy.deepcopy(m.state_dict())
    plan = sparsevit.prune(m, method="sls", data=data, progress=False)
    assert len(calls) == n_blocks and all(c[0] == 12 for c in calls)  # one feature row per image, per block
    assert plan.depth == 2 and plan.meta["sls_scores"] == planted
    assert plan.meta["sls_feature"] == ("mean" if key == "swin_tiny" else "cls")
    assert 0 < plan.meta["sparsity"] < 1
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    plan.save(tmp_path / "p.json")
    back = sparsevit.SparsityPlan.load(tmp_path / "p.json")
    assert back.depth == 2 and back.meta["sls_scores"] == planted
    fast = sparsevit.accelerate(m, back)
    x = torch.randn(2, 3, IMG[key], IMG[key])
    with torch.no_grad():
        ref, out, dense = sparsevit.masked_model(m, back)(x), fast(x), m(x)
    assert rel_err(out, ref) < 1e-5 and rel_err(ref, dense) > 1e-4


def test_block_features_are_the_class_token_of_each_block():
    m = make_model("vit_tiny", num_classes=3)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats, labels, kind = S.block_features(m, [(x, torch.arange(5) % 2)])
    with torch.no_grad():
        h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for i, blk in enumerate(m.blocks):
            h = blk(h)
            assert np.allclose(feats[i], h[:, 0].numpy(), atol=1e-5), i
    assert kind == "cls" and labels.tolist() == [0, 1, 0, 1, 0]


def test_retrain_head_changes_only_the_head():
    m = make_model("vit_tiny", num_classes=3)
    plan = sparsevit.SparsityPlan.dense(m)
    plan.depth = 1
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 3, 32, 32, generator=g), torch.arange(6) % 3) for _ in range(2)]
    before = copy.deepcopy(m.state_dict())
    new = S.sls_retrain_head(m, plan, data, epochs=2, lr=1e-2, progress=False)
    ref = sparsevit.masked_model(m, plan)
    for (name, p), q in zip(new.named_parameters(), ref.parameters()):
        assert torch.equal(p, q) != name.startswith("head."), name
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    fast = sparsevit.accelerate(new, plan)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fast(x), new(x)) < 1e-5
