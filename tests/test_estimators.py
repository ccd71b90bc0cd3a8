"""Gradient estimators: group Taylor from per-batch gradients, per-sample Fisher, behaviour at convergence."""
import pytest
import timm
import torch
import torch.nn.functional as F

import sparsevit
import sparsevit.prune  # noqa: F401  (binds sparsevit.prune)
from sparsevit.prune import criteria as C
from sparsevit.prune import estimators as est
from sparsevit.prune.groups import coupled_slices


def tiny_vit(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=16, patch_size=8, depth=2, embed_dim=24, num_heads=3, mlp_ratio=2.0, num_classes=4)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


def data(n=3, bs=5, size=16, chans=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, chans, size, size, generator=g), torch.randint(0, 4, (bs,), generator=g))
            for _ in range(n)]


def per_batch_grads(model, batches, loss_fn=F.cross_entropy):
    """Gradients of each batch's mean loss, by hand."""
    out = []
    for x, y in batches:
        model.zero_grad()
        loss_fn(model(x), y).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return out


def slice_sum(params, grads, slices):
    """sum over a unit's coupled slices of w * g."""
    total = torch.zeros((), dtype=torch.float64)
    for name, dim, idx in slices:
        index = torch.tensor(idx)
        w = params[name].detach().double().index_select(dim, index)
        total = total + (w * grads[name].double().index_select(dim, index)).sum()
    return total


def test_group_taylor_equals_per_batch_computation():
    model, batches = tiny_vit(), data()
    ad = sparsevit.get_adapter(model)
    s = C.unit_scores(model, "taylor", batches, progress=False)
    assert s.meta == {"taylor": "group_sq", "batches": 3}
    params = dict(model.named_parameters())
    grads = per_batch_grads(model, batches)

    def ref(slices):
        return float(torch.stack([slice_sum(params, g, slices).square() for g in grads]).mean())

    for kind, layer, unit, got in [("mlp", 1, 7, s.blocks[1].mlp[7]), ("head", 0, 2, s.blocks[0].heads[2]),
                                   ("qk", 1, 3, s.blocks[1].qk_shared[3]), ("v", 0, 5, s.blocks[0].v_shared[5]),
                                   ("residual", 0, 11, s.residual[0][11])]:
        want = ref(coupled_slices(ad, kind, layer, unit))
        assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-12), (kind, float(got), want)
    names = {id(p): n for n, p in model.named_parameters()}
    branch = [(names[id(p)], 0, list(range(p.shape[0]))) for p in ad.blocks[1].branch_parameters("mlp")]
    assert s.blocks[1].mlp_branch == pytest.approx(ref(branch), rel=1e-4)


def test_taylor_variants_elementwise():
    model, batches = tiny_vit(), data()
    params = dict(model.named_parameters())
    grads = per_batch_grads(model, batches)
    name = "blocks.0.mlp.fc1.weight"
    w = params[name].detach()
    sq = C.weight_importance(model, "taylor", batches, progress=False)[name]
    torch.testing.assert_close(sq, torch.stack([(w * g[name]).square() for g in grads]).mean(0), rtol=1e-4, atol=1e-12)
    ab = C.weight_importance(model, "taylor", batches, taylor="abs", progress=False)[name]
    torch.testing.assert_close(ab, (w * torch.stack([g[name] for g in grads]).mean(0)).abs(), rtol=1e-4, atol=1e-9)
    # weight_sq units: sum of the per-weight squares over the unit's slices
    s = C.unit_scores(model, "taylor", batches, taylor="weight_sq", progress=False)
    imp = C.weight_importance(model, "taylor", batches, taylor="weight_sq", progress=False)
    slices = coupled_slices(sparsevit.get_adapter(model), "mlp", 0, 4)
    want = sum(float(imp[n].index_select(d, torch.tensor(i)).sum()) for n, d, i in slices)
    assert float(s.blocks[0].mlp[4]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("chunk", [None, 2])
def test_per_sample_fisher_equals_single_sample_loop(chunk):
    model, batches = tiny_vit(), data(n=2)
    fisher, info = est.fisher_diagonal(model, batches, chunk_size=chunk, progress=False)
    assert info["path"] == "vmap" and info["samples"] == 10
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in batches:
        for i in range(len(x)):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            for n, p in model.named_parameters():
                acc[n] += p.grad.square()
    for n in acc:
        torch.testing.assert_close(fisher[n], acc[n] / 10, rtol=1e-4, atol=1e-10, msg=n)


def test_vmap_failure_falls_back_to_exact_loop(monkeypatch):
    model, batches = tiny_vit(), data(n=1, bs=3)
    want, _ = est.fisher_diagonal(model, batches, progress=False)

    def broken(*a, **k):
        raise RuntimeError("no batching rule for this op")

    monkeypatch.setattr(est, "_vmap_gradients", broken)
    with pytest.warns(UserWarning, match="per-sample loop"):
        got, info = est.fisher_diagonal(model, batches, progress=False)
    assert info["path"] == "loop" and "no batching rule" in info["fallback"]
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-10)


def test_microbatch_fisher_is_mean_of_squared_chunk_gradients():
    model, batches = tiny_vit(), data(n=1, bs=6)
    fisher, info = est.fisher_diagonal(model, batches, mode="microbatch", micro_batches=3, progress=False)
    assert info["path"] == "microbatch" and info["samples"] == 3
    x, y = batches[0]
    chunks = per_batch_grads(model, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 6, 2)])
    name = "blocks.1.attn.qkv.weight"
    torch.testing.assert_close(fisher[name], torch.stack([g[name].square() for g in chunks]).mean(0), rtol=1e-4,
                               atol=1e-10)


# --------------------------------------------------------------------------- at convergence
def converged_model():
    """A tiny ViT with a planted MLP channel and head (outputs scaled by 1e-3 downstream), trained briefly,
    and scoring batches on which it sits exactly at a minimum of the loss: MSE regression onto its own
    outputs plus noise, each noise batch paired with its negation. The mean gradient over the batches is
    then zero while every batch's gradient is not (what a model trained to convergence looks like)."""
    model = tiny_vit(depth=1, in_chans=1, img_size=8, patch_size=4, embed_dim=16, num_heads=2)
    ad = sparsevit.get_adapter(model)
    params = dict(model.named_parameters())
    planted = coupled_slices(ad, "mlp", 0, 5) + coupled_slices(ad, "head", 0, 1)
    frozen = {}
    with torch.no_grad():
        for name, dim, idx in planted:
            index = torch.tensor(idx)
            if "fc2" in name or "proj" in name:  # the consumer of the unit's output
                params[name].index_copy_(dim, index, params[name].index_select(dim, index) * 1e-3)
            frozen.setdefault(name, torch.ones_like(params[name])).index_fill_(dim, index, 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(64, 4, generator=g)).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, keep in frozen.items():  # the planted unit stays planted
            params[name].grad.mul_(keep)
        opt.step()
    with torch.no_grad():
        out = model(x)
    batches = []
    for i in range(0, 128, 32):
        noise = torch.randn(32, 4, generator=g)
        batches += [(x[i:i + 32], out[i:i + 32] + noise), (x[i:i + 32], out[i:i + 32] - noise)]
    return model, batches


def test_planted_unit_ranked_last_at_convergence():
    model, batches = converged_model()
    grads = per_batch_grads(model, batches, F.mse_loss)
    flat = torch.stack([torch.cat([v.flatten() for v in g.values()]) for g in grads])
    assert float(flat.mean(0).norm()) < 1e-4 * float(flat.norm(dim=1).mean())  # converged: mean gradient ~ 0
    for crit, kw in [("taylor", {}), ("taylor", dict(taylor="weight_sq")), ("hessian", {}),
                     ("hessian", dict(fisher="microbatch"))]:
        s = C.unit_scores(model, crit, batches, progress=False, **kw)
        assert int(s.blocks[0].mlp.argmin()) == 5, (crit, kw, s.blocks[0].mlp)
        assert int(s.blocks[0].heads.argmin()) == 1, (crit, kw, s.blocks[0].heads)
    # Torch-Pruning's |w * mean g| sees only the vanishing mean gradient: it cannot tell units apart here
    ab = C.unit_scores(model, "taylor", batches, taylor="abs", progress=False).blocks[0].mlp
    sq = C.unit_scores(model, "taylor", batches, progress=False).blocks[0].mlp
    assert float(ab.max()) < 1e-3 * float(sq.sqrt().median())


def test_option_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="taylor="):
        C.unit_scores(model, "taylor", data(), taylor="mean")
    with pytest.raises(ValueError, match="fisher="):
        C.unit_scores(model, "hessian", data(), fisher="kfac")
    with pytest.raises(ValueError, match="elementwise"):
        C.unit_scores(model, "taylor", importance={})
