"""``accelerate(..., verify=True)``: check the fast model against the masked dense reference.

One random probe (batch 1, the model's input size, a fixed seed, the model's device) runs through
the masked reference (the user's model with the plan applied as zeros, see ``models/masking.py``;
run in float32 at least) and through the fast model. Every block's output is compared (forward hooks
on both; the fast model's residual stream may be narrower, so the reference is compared on the kept
residual channels), then the final output. Tolerances (relative to the largest reference value):
1e-4 in float32; in bf16/fp16 3e-2, or twice what the reference itself loses in that dtype when that
is more (deep models accumulate rounding that is no sparsevit error). The first block beyond a
dtype-aware tolerance is named in a :class:`~sparsevit.errors.VerificationError`: a model that
computes something else is never returned.
"""
from __future__ import annotations

import time
from typing import Dict, List, Tuple

import torch
from torch import nn

from sparsevit.errors import VerificationError
from sparsevit.runtime.report import Report

#: relative tolerance (max |fast - ref| / max |ref|) per dtype of the fast model
TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
PROBE_SEED = 20240531


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def _outputs(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o)]
    return []


def _rel_err(fast: torch.Tensor, ref: torch.Tensor) -> float:
    if fast.shape != ref.shape:
        return float("inf")
    f, r = fast.detach().double(), ref.detach().double()
    finite = torch.isfinite(r)
    if not torch.equal(torch.isfinite(f), finite):  # a NaN/inf where the reference has none, or vice versa
        return float("inf")
    f, r = f[finite], r[finite]
    return float((f - r).abs().max() / r.abs().max().clamp_min(1e-12)) if r.numel() else 0.0


def _compare(got: torch.Tensor, ref: torch.Tensor, base, keep, dtype) -> Tuple[float, float]:
    """(relative error of ``got`` against ``ref``, its tolerance). ``keep``: the kept residual channels
    when the fast model's stream is narrower; ``base``: the reference run in the fast model's low
    precision, whose own error (times 2) widens the tolerance on deep models."""
    if keep is not None and ref.shape[-1] != got.shape[-1]:
        ref = ref.index_select(-1, keep.to(ref.device))
        base = None if base is None else base.index_select(-1, keep.to(base.device))
    tol = TOLERANCE.get(dtype, 3e-2)
    if base is not None:
        tol = max(tol, 2 * _rel_err(base, ref))
    return _rel_err(got, ref), tol


def _run(model: nn.Module, x: torch.Tensor, fqns: List[str], what: str) -> Tuple[Dict[str, torch.Tensor], list]:
    """Forward ``x``, recording each block's output by fqn."""
    seen: Dict[str, torch.Tensor] = {}
    handles = []
    for fqn in fqns:
        def hook(_m, _inp, out, fqn=fqn):
            seen.setdefault(fqn, out.detach() if isinstance(out, torch.Tensor) else out)
        handles.append(model.get_submodule(fqn).register_forward_hook(hook))
    try:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            out = model(x)
    except Exception as exc:
        raise VerificationError(f"verification probe failed on the {what} ({type(exc).__name__}: {exc}); "
                                "pass verify=False to skip the check.") from exc
    finally:
        for h in handles:
            h.remove()
    return seen, _outputs(out)


def verify(reference: nn.Module, fast: nn.Module, input_shape: Tuple[int, ...], blocks: List[Tuple[str, int]],
           residual: List[torch.Tensor], report: Report, build_seconds: float = 0.0) -> float:
    """Compare ``fast`` with ``reference`` on one probe; raise naming the first block that diverges.

    ``blocks``: ``(fqn, stage)`` of each block, in order; ``residual``: kept residual channels per
    stage (positions in the reference's full-width stream). ``build_seconds``: what building the
    reference cost (the reported cost includes it). Returns the seconds the whole check took.
    """
    started = time.perf_counter() - build_seconds
    p = next(fast.parameters())
    dtype = _dtype_of(fast)
    g = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.randn(1, *input_shape, generator=g).to(p.device)
    fqns = [f for f, _ in blocks]
    reference.eval()
    if _dtype_of(reference) not in (torch.float32, torch.float64):
        reference.float()  # the truth is computed in float32 at least
    ref_blocks, ref_out = _run(reference, x.to(_dtype_of(reference)), fqns, "masked reference")
    base_blocks, base_out = {}, []
    if dtype in (torch.bfloat16, torch.float16):  # what plain PyTorch loses in this dtype, per block
        base_blocks, base_out = _run(reference.to(dtype), x.to(dtype), fqns, "masked reference")
    fast_blocks, fast_out = _run(fast, x.to(dtype), fqns, "accelerated model")
    worst = 0.0
    for fqn, stage in blocks:
        ref, got = ref_blocks.get(fqn), fast_blocks.get(fqn)
        if not isinstance(ref, torch.Tensor) or not isinstance(got, torch.Tensor):
            continue  # a block that did not run in one of them shows in the final output
        err, tol = _compare(got, ref, base_blocks.get(fqn), residual[stage], dtype)
        worst = max(worst, err)
        if not err <= tol:
            raise VerificationError(f"accelerated model diverges from the masked dense model at {fqn} (first block "
                                    f"that differs): relative error {err:.2e} > {tol:.1e} for {dtype} on a random "
                                    "probe. This is a sparsevit bug or a model feature it does not handle; please "
                                    "report it. verify=False skips the check (not recommended).")
    if len(ref_out) != len(fast_out):
        raise VerificationError(f"accelerated model returns {len(fast_out)} tensors, the masked model {len(ref_out)}.")
    for i, (got, ref) in enumerate(zip(fast_out, ref_out)):
        err, tol = _compare(got, ref, base_out[i] if base_out else None, None, dtype)
        worst = max(worst, err)
        if not err <= tol:
            raise VerificationError(f"accelerated model output {i} (after the blocks: final norm, pooling, head) "
                                    f"diverges from the masked dense model: relative error {err:.2e} > {tol:.1e} "
                                    f"for {dtype}. Please report it; verify=False skips the check.")
    seconds = time.perf_counter() - started
    report.verify_seconds = seconds  # not a row: a loaded model's report must equal the saved one's
    report.verify_max_error = worst
    return seconds


def probe_reference(model: nn.Module, plan) -> nn.Module:
    """The masked dense reference of ``model`` under ``plan`` (a copy; ``model`` is not touched)."""
    from sparsevit.models import masked_model

    return masked_model(model, plan).eval()

