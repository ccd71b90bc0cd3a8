"""Gradient estimators shared by every gradient criterion (grouped, unstructured, P3B's gate scores).

One place computes each of the statistics the criteria of :mod:`sparsevit.prune.criteria` are built
from; the criteria only combine them with the weights and the coupling table.

- :func:`batch_gradients`: the mini-batch gradient ``g_b = dL_b/dw`` of every parameter, one batch at a
  time (``L_b`` the batch's mean loss). First-order Taylor scores are formed *per batch* from these and
  only then averaged: averaging the gradient first (``mean_b g_b``) gives a near-zero, noise-dominated
  estimate on a model trained to convergence, where the full-data gradient vanishes.
- :func:`taylor_contribution` / :func:`squared_taylor`: ``w * g`` (the first-order estimate of the loss
  change when ``w`` is zeroed, up to sign) and its square, the quantity Molchanov et al. (CVPR 2019)
  average over mini-batches. P3B's gate scores ``(m * dL/dm)^2`` use :func:`squared_taylor` too.
- :func:`fisher_diagonal`: the diagonal of the empirical Fisher, ``F = E_i[g_i^2]`` over samples i,
  the Hessian estimate of OBD (LeCun et al., NeurIPS 1989) as used by Torch-Pruning's
  ``GroupHessianImportance`` (per-sample gradients of a per-sample loss).

  ``mode="per_sample"`` (default) computes each sample's gradient with ``torch.func``:
  ``vmap(grad(loss))`` over the batch with ``functional_call``, in chunks of ``chunk_size`` samples to
  bound memory (``chunk_size * n_params`` floats), with scaled-dot-product attention on its math kernel
  (fused kernels have no batching rule). If ``vmap`` fails on a model, an exact per-sample loop (one
  backward per sample) takes over with a ``UserWarning`` naming the error, and the returned info says
  ``path="loop"``.

  ``mode="microbatch"`` squares the gradient of micro-batches of m samples instead (cheap, m times
  fewer backward passes than the loop). It is biased: with per-sample gradients of mean ``mu`` and
  variance ``var``, ``E[g_m^2] = mu^2 + var/m`` while ``F = mu^2 + var``, so the variance part (the
  part that matters at convergence, where ``mu ~ 0``) is shrunk by ``m`` relative to the squared mean
  gradient, and weights whose gradients are consistent but small are over-weighted.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

from sparsevit.prune.batches import default_loss, iter_batches, model_device

FISHER_MODES = ("per_sample", "microbatch")
#: per-sample gradients held at once are bounded by this many floats when ``chunk_size`` is None
PER_SAMPLE_BUDGET = 2 ** 26


def _progress(data, num_batches: Optional[int], desc: str, progress: bool):
    from tqdm.auto import tqdm

    total = num_batches
    if total is None:
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iter_batches(data, num_batches), total=total, desc=desc, disable=None if progress else True,
                leave=False)


def _no_batches() -> ValueError:
    return ValueError("data yielded no batches; pass an iterable of (images, labels) batches.")


def batch_gradients(model: nn.Module, data: Iterable, *, num_batches: Optional[int] = 8,
                    loss_fn: Optional[Callable] = None, progress: bool = True) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield, batch by batch, ``{name: dL_b/dw}`` (``L_b`` = ``loss_fn`` on the batch, a mean loss).

    Runs on ``model`` as given (callers pass a copy in eval mode); the yielded tensors are the
    parameters' ``.grad`` fields and are overwritten by the next batch, so use them before asking for
    the next one. Raises ``ValueError`` when ``data`` yields nothing.
    """
    loss_fn = loss_fn or default_loss
    dev = model_device(model)
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    steps = 0
    for x, y in _progress(data, num_batches, "gradients", progress):
        model.zero_grad(set_to_none=False)
        loss_fn(model(x.to(dev)), y.to(dev)).backward()
        steps += 1
        yield {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    if steps == 0:
        raise _no_batches()


def taylor_contribution(value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``value * grad`` in float32: minus the first-order loss change when ``value`` is set to zero.

    Summed over a group's weights it is the group's first-order contribution (Molchanov et al., CVPR
    2019, eq. 4, before squaring).
    """
    return value.detach().float() * grad.detach().float()


def squared_taylor(value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``(value * grad)^2`` in float64 on the CPU: one mini-batch's Taylor score of single elements
    (a weight, or a P3B gate whose gradient already sums its coupled weights' contributions)."""
    return taylor_contribution(value, grad).double().square().cpu()


# ------------------------------------------------------------------------------------ Fisher
def fisher_diagonal(model: nn.Module, data: Iterable, *, mode: str = "per_sample", num_batches: Optional[int] = 8,
                    loss_fn: Optional[Callable] = None, chunk_size: Optional[int] = None, micro_batches: int = 4,
                    progress: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Diagonal empirical Fisher ``E[g^2]`` per parameter (float32) and an info dict.

    ``mode``: ``per_sample`` (exact, see the module docstring) or ``microbatch`` (each batch split into
    ``micro_batches`` chunks; biased towards the squared mean gradient). Runs on ``model`` as given
    (callers pass a copy in eval mode). Info: ``fisher`` (mode), ``path`` (``vmap`` | ``loop`` |
    ``microbatch``), ``samples`` (gradients averaged), and ``fallback`` (the vmap error) if any.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"unknown fisher='{mode}'; choose one of {FISHER_MODES}.")
    loss_fn = loss_fn or default_loss
    params = {n: p for n, p in model.named_parameters()}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    info: Dict = {"fisher": mode, "path": "microbatch" if mode == "microbatch" else "vmap", "samples": 0}
    dev = model_device(model)
    for x, y in _progress(data, num_batches, "fisher", progress):
        x, y = x.to(dev), y.to(dev)
        if mode == "microbatch":
            chunks = max(1, min(int(micro_batches), len(x)))
            for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
                _add_squares(acc, _loop_gradients(model, xc, yc, loss_fn))
                info["samples"] += 1
            continue
        size = chunk_size or max(1, PER_SAMPLE_BUDGET // max(1, sum(p.numel() for p in params.values())))
        for start in range(0, len(x), size):
            xc, yc = x[start:start + size], y[start:start + size]
            _add_squares(acc, _per_sample_gradients(model, xc, yc, loss_fn, info), summed=True)
            info["samples"] += len(xc)
    model.zero_grad(set_to_none=True)
    if info["samples"] == 0:
        raise _no_batches()
    return {n: a / info["samples"] for n, a in acc.items()}, info


def _add_squares(acc: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor], summed: bool = False) -> None:
    """Add ``g^2`` (``grads`` [*shape]) or ``sum_i g_i^2`` (``summed``: grads [n, *shape]) to ``acc``."""
    with torch.no_grad():
        for n, g in grads.items():
            sq = g.float().square()
            acc[n].add_(sq.sum(0) if summed else sq)


def _loop_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> Dict[str, torch.Tensor]:
    """Gradient of ``loss_fn(model(x), y)`` by ordinary backward."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss_fn(model(x), y).backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _math_attention():
    """Scaled-dot-product attention on its math kernel (the fused kernels have no vmap batching rule)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable,
                          info: Dict) -> Dict[str, torch.Tensor]:
    """``{name: [n, *shape]}`` gradients of each sample's own loss; vmap first, an exact loop after
    a vmap failure (remembered in ``info`` so later chunks go straight to the loop)."""
    if info["path"] == "vmap":
        try:
            return _vmap_gradients(model, x, y, loss_fn)
        except Exception as err:  # any failure of the functional transform: the loop is exact
            info["path"], info["fallback"] = "loop", f"{type(err).__name__}: {err}"[:300]
            warnings.warn(f"per-sample gradients with torch.func.vmap failed on this model ({info['fallback']}); "
                          "using an exact per-sample loop instead (one backward per sample, slower).",
                          stacklevel=3)
    per = [_loop_gradients(model, x[i:i + 1], y[i:i + 1], loss_fn) for i in range(len(x))]
    return {n: torch.stack([g[n].detach().clone() for g in per]) for n in per[0]}


def _vmap_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> Dict[str, torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(p, xi, yi):
        return loss_fn(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    with _math_attention(), torch.enable_grad():
        return vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="same")(params, x, y)
