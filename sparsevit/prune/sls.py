"""SLS: Straightforward Layer-wise Pruning (2024; code RuiZiHan/SLS): cut whole trailing blocks.

``method="sls"`` needs a labelled loader (``data``). For every block ``i`` (flat in forward order;
Swin: across stages) it collects the block's output feature of each image: the class token for
ViT/DeiT/BeiT, the mean over all tokens for Swin (which has no class token; it is what Swin's head
pools) and for ViTs built without a class token. Then, per block: 2-D t-SNE (scikit-learn, PCA
init, fixed seed), min-max normalisation of the embedding, silhouette score ``SC_i`` against the
labels.

Cut (the authors' rule, as their code applies it): ``T = alpha * SC_last`` (alpha 0.3). Walk down
from the last block while ``SC_i >= T``; the lowest block reached, ``i*``, is the last one kept
(its output already separates the classes well enough), so ``depth = i* + 1`` and blocks
``i* + 1 ...`` are dropped. When the last block itself is below ``T`` (only possible for a negative
``SC_last``) nothing is cut.

Features are the raw block outputs (before the final norm), as in the authors' code.

The plan records ``depth`` (later blocks become identity; Swin keeps its patch-merging layers, so
the head still receives the width it was trained on; the authors' code instead skips whole later
stages, merging included, which a plan cannot express without changing the head's input width) and ``meta["sls_scores"]`` (one SC per block),
``meta["sls_threshold"]``, ``meta["sls_feature"]``. Afterwards only the head is retrained, backbone
frozen (:func:`sls_retrain_head`).

``sparsity``: SLS finds its own cut and ignores a sparsity target; ``plan.meta["sparsity"]`` is the
fraction of the prunable (block) parameters the cut removes (``meta["stats"]`` has the exact
parameter and MAC counts). Features are collected from ``num_batches`` batches (``None``: all) and at
most ``max_samples`` images, since t-SNE's cost grows with the sample count.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from sparsevit.models import get_adapter, masked_model
from sparsevit.plan import BlockPlan, SparsityPlan
from sparsevit.prune.batches import iter_batches, model_device
from sparsevit.prune.registry import register_method


def _pool(out: torch.Tensor, use_cls: bool) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if use_cls:
        return out[:, 0]
    return out.reshape(out.shape[0], -1, out.shape[-1]).mean(dim=1)  # Swin: [B, H, W, C]; ViT: [B, N, C]


@torch.no_grad()
def block_features(model: nn.Module, data: Iterable, *, num_batches: Optional[int] = None,
                   max_samples: Optional[int] = 2000) -> Tuple[List[np.ndarray], np.ndarray, str]:
    """Per block, the ``[n, dim]`` features of ``n`` images (class token or token mean), their labels,
    and which feature was used (``"cls"`` or ``"mean"``). Runs on a copy in eval mode."""
    work = copy.deepcopy(model).eval()
    adapter = get_adapter(work)
    use_cls = adapter.family != "swin" and getattr(work, "cls_token", None) is not None
    feats: List[List[torch.Tensor]] = [[] for _ in adapter.blocks]
    hooks = [b.block.register_forward_hook(lambda mod, inp, out, i=i: feats[i].append(_pool(out, use_cls).float().cpu()))
             for i, b in enumerate(adapter.blocks)]
    labels, seen = [], 0
    dev = model_device(work)
    try:
        for x, y in iter_batches(data, num_batches):
            if max_samples is not None and seen >= max_samples:
                break
            work(x.to(dev))
            labels.append(torch.as_tensor(y).cpu())
            seen += len(y)
    finally:
        for h in hooks:
            h.remove()
    if not labels:
        raise ValueError("data yielded no batches; SLS needs labelled (images, labels) batches.")
    n = seen if max_samples is None else min(seen, max_samples)
    y = torch.cat(labels)[:n].numpy()
    return [torch.cat(f)[:n].numpy() for f in feats], y, "cls" if use_cls else "mean"


def silhouette_after_tsne(features: np.ndarray, labels: np.ndarray, *, seed: int = 0,
                          perplexity: float = 30.0) -> float:
    """2-D t-SNE (PCA init, ``seed``), min-max normalised, then the silhouette score with ``labels``."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    n = len(features)
    if len(np.unique(labels)) < 2 or n < 4:
        raise ValueError("SLS needs at least two classes and four samples to score class separation.")
    emb = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(perplexity, (n - 1) / 3)
               ).fit_transform(np.asarray(features, dtype=np.float64))
    lo, hi = emb.min(0), emb.max(0)
    emb = (emb - lo) / np.where(hi > lo, hi - lo, 1.0)
    return float(silhouette_score(emb, labels))


def choose_depth(scores: Sequence[float], alpha: float = 0.3) -> Tuple[int, float]:
    """``(depth, T)``: walk down from the last block while ``SC_i >= T = alpha * SC_last``; keep the
    blocks up to and including the lowest one reached (see the module docstring)."""
    if len(scores) == 0:
        raise ValueError("no block scores")
    T = alpha * scores[-1]
    lowest = None
    for i in range(len(scores) - 1, -1, -1):
        if scores[i] < T:
            break
        lowest = i
    return (len(scores) if lowest is None else lowest + 1), float(T)


@register_method("sls", criteria=None, aliases=("layerwise",), needs_data=True)
def sls(model, *, criterion: Optional[str] = None, sparsity: Optional[float] = None, data=None,
        num_batches: Optional[int] = None, alpha: float = 0.3, max_samples: Optional[int] = 2000,
        seed: int = 0, progress: bool = True, **_ignored) -> SparsityPlan:
    """SLS: cut trailing blocks where the class separation of the features (t-SNE + silhouette) has
    already reached ``alpha`` times its final value. ``sparsity`` is ignored (the cut decides it)."""
    from tqdm.auto import tqdm

    if data is None:
        raise ValueError("sls needs data=<iterable of labelled (images, labels) batches>.")
    adapter = get_adapter(model)
    feats, labels, kind = block_features(model, data, num_batches=num_batches, max_samples=max_samples)
    scores = [silhouette_after_tsne(f, labels, seed=seed)
              for f in tqdm(feats, desc="sls t-SNE", disable=None if progress else True, leave=False)]
    depth, T = choose_depth(scores, alpha)
    plan = SparsityPlan(family=adapter.family, blocks=[BlockPlan() for _ in adapter.blocks],
                        depth=depth if depth < len(adapter.blocks) else None, signature=adapter.signature())
    stats = adapter.count(plan)
    plan.meta = {"method": "sls", "criterion": "silhouette", "sparsity": round(stats["total"]["prunable_removed"], 6),
                 "target": {"alpha": alpha}, "sls_scores": [round(s, 6) for s in scores],
                 "sls_threshold": round(T, 6), "sls_feature": kind, "sls_depth": depth,
                 "sls_samples": int(len(labels)), "stats": stats}
    return plan


def sls_retrain_head(model: nn.Module, plan: SparsityPlan, data: Iterable, *, epochs: int = 1,
                     lr: float = 1e-3, weight_decay: float = 1e-4, loss_fn: Optional[Callable] = None,
                     progress: bool = True) -> nn.Module:
    """Retrain only the classifier after the SLS cut; returns a new model (``model`` is untouched).

    The returned model is ``masked_model(model, plan)`` (blocks past the cut are identity) with a
    retrained head, in eval mode; ``sparsevit.accelerate(returned, plan)`` gives the fast one. The
    backbone is frozen and kept in eval mode (deterministic features); AdamW on the head only.
    """
    from tqdm.auto import tqdm

    work = masked_model(model, plan)
    head = work.get_classifier()
    if not isinstance(head, nn.Module) or not list(head.parameters()):
        raise ValueError(f"{type(model).__name__} has no trainable classifier (get_classifier() is {head!r}).")
    for p in work.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    work.eval()
    dev = model_device(work)
    for _ in tqdm(range(int(epochs)), desc="sls head", disable=None if progress else True, leave=False):
        for x, y in iter_batches(data, None):
            out = work(x.to(dev))
            loss = loss_fn(out[0] if isinstance(out, (tuple, list)) else out, y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in work.parameters():
        p.requires_grad_(True)
    return work
