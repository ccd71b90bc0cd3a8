"""The MLP pair choice: fc1 and fc2 together as one fused ``sparsevit::fine_mlp`` call, or as chosen per layer.

:func:`~sparsevit.runtime.linear.choose_linear` times each Linear on its own. When both MLP layers
are fine-grained they run as one ``sparsevit::fine_mlp`` call (:mod:`sparsevit.ops.fine_mlp`),
which skips fc1's transpose back to ``[tokens, hidden]`` and fc2's repacking of it (1.09-1.14x over
two ``fine_linear`` calls at 70% sparsity). Timing the layers apart misses that, so at 60-80% sparsity
the fine kernel can lose each layer to dense and still win the pair. :func:`choose_mlp_pair`
times the fused pair against the two modules chosen per layer, on the same input, in interleaved
rounds (:func:`~sparsevit.runtime.linear.kernel_choice_ms`), keeps the faster, and says so in both
layers' report entries.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import nn

from sparsevit.ops.fine_mlp import fused_mlp_forward, not_fusable_reasons
from sparsevit.ops.linear_kernels import get_kernel
from sparsevit.runtime.linear import (_MAX_FINE_DENSITY, _TIMING_CACHE, LayerSpec, LinearFactory, SparseLinear,
                                      _build, fine_stored_density, kernel_choice_ms)
from sparsevit.runtime.report import LayerDecision

__all__ = ["choose_mlp_pair"]

FUSED_FORMAT = "fine:1x1"  # the format both layers take when the fused pair wins


def _why_not_considered(factory: LinearFactory, names, norm: Optional[nn.Module]) -> Optional[str]:
    """Why the pair is left as chosen per layer without timing the fused op (None: time it)."""
    if not isinstance(factory, LinearFactory):
        return "built without a LinearFactory"
    if factory.backend != "auto" or os.environ.get("SPARSEVIT_CHOOSE", "measure") == "model":
        return "not timed (backend or SPARSEVIT_CHOOSE=model)"
    if any(n in factory.formats for n in names):
        return "formats given"
    if any(n not in factory.specs for n in names):
        return "a layer has no unstructured sparsity"
    if norm is not None:
        return "an MLP norm sits between fc1 and fc2"
    specs = [factory.specs[n] for n in names]
    if specs[0].device.type != "cpu":
        return "the fused op runs on CPU only"
    if any(fine_stored_density(s.keep, 1, s.dtype) > _MAX_FINE_DENSITY for s in specs):
        return (f"a layer's fine-grained format would store more than {_MAX_FINE_DENSITY} of its weights "
                "(too dense for the fine-grained kernel)")
    return None


def _fine_module(spec: LayerSpec, current: nn.Module) -> SparseLinear:
    if isinstance(current, SparseLinear) and current.is_fine and current.kernel != "reference":
        return current
    return _build(spec, get_kernel("cpp_fine"), FUSED_FORMAT, spec.as_linear())


def choose_mlp_pair(factory: LinearFactory, names: Tuple[str, str], fc1: nn.Module, fc2: nn.Module,
                    norm: Optional[nn.Module] = None) -> Tuple[nn.Module, nn.Module]:
    """``(fc1, fc2)``: both fine-grained (run fused by :class:`~sparsevit.runtime.modules.SparseMlp`)
    when the fused pair is measured faster than the modules ``factory`` chose per layer, else the
    modules as given. Both layers' report entries say what was compared and what won.

    Args:
        factory: the :class:`~sparsevit.runtime.linear.LinearFactory` that built ``fc1`` / ``fc2``
            (its ``specs`` and ``decisions`` hold what it knew and decided).
        names: the two layers' names in the original model (the report's keys).
        fc1, fc2: the per-layer choices; fc1 applies the activation.
        norm: the MLP's norm between the layers, if any (the fused op has none: never fused then).
    """
    if _already_fused(fc1, fc2):
        return fc1, fc2
    why_not = _why_not_considered(factory, names, norm)
    if why_not is not None:
        if all(n in factory.decisions for n in names):
            _note(*(factory.decisions[n] for n in names), f"fused fine_mlp pair not timed: {why_not}")
        return fc1, fc2
    s1, s2 = (factory.specs[n] for n in names)
    f1, f2 = _fine_module(s1, fc1), _fine_module(s2, fc2)
    x = torch.randn(s1.tokens, s1.weight.shape[1], device=s1.device, dtype=s1.dtype)
    reasons = not_fusable_reasons(x, f1.weight, f2.weight)
    d1, d2 = (factory.decisions[n] for n in names)
    if reasons:
        _note(d1, d2, f"fused fine_mlp pair not possible: {'; '.join(reasons)}")
        return fc1, fc2
    with torch.inference_mode():
        ref = fc2(fc1(x)).float()
        fused = fused_mlp_forward(f1, None, None, f2, x)
        err = (fused.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        if not err < 5e-2:
            _note(d1, d2, f"fused fine_mlp pair rejected: relative error {err:.2e} vs the per-layer pair")
            return fc1, fc2
        t_pair, t_fused = _pair_times(s1, s2, fc1, fc2, f1, f2, d1, d2, x)
    where = f"measured at {s1.tokens} tokens"
    for d in (d1, d2):
        d.est_ms.update({"mlp pair per-layer": t_pair, "mlp pair fused fine_mlp": t_fused})
    if t_fused <= t_pair:
        for d, mod, spec in ((d1, f1, s1), (d2, f2, s2)):
            _set_fused(d, mod, f"{FUSED_FORMAT} density {mod.weight.density:.2f}: fc1+fc2 fused as sparsevit::"
                       f"fine_mlp, {t_pair / t_fused:.2f}x faster than the per-layer pair ({t_fused:.2f} ms vs "
                       f"{t_pair:.2f} ms for {d1.fmt} {d1.kernel} + {d2.fmt} {d2.kernel}, {where}); "
                       f"per-layer choice was: {d.reason}")
        return f1, f2
    _note(d1, d2, f"fused fine_mlp pair {t_fused:.2f} ms vs {t_pair:.2f} ms per layer ({where}): kept per layer")
    return fc1, fc2


def _already_fused(fc1: nn.Module, fc2: nn.Module) -> bool:
    return all(isinstance(m, SparseLinear) and m.is_fine and m.kernel != "reference" for m in (fc1, fc2))


def _pair_times(s1, s2, fc1, fc2, f1, f2, d1, d2, x) -> Tuple[float, float]:
    """(per-layer pair ms, fused pair ms), cached like the per-layer timings (layers of the same
    shapes, densities and per-layer choices share them)."""
    key = ("mlp_pair", tuple(s1.weight.shape), tuple(s2.weight.shape), s1.dtype, s1.device.type, s1.activation,
           s1.tokens, torch.get_num_threads(), round(f1.weight.density, 2), round(f2.weight.density, 2),
           d1.fmt, d1.kernel, d2.fmt, d2.kernel)
    k_pair, k_fused = key + ("per-layer",), key + ("fused",)
    if k_pair not in _TIMING_CACHE or k_fused not in _TIMING_CACHE:
        _TIMING_CACHE.update(kernel_choice_ms({k_pair: lambda: fc2(fc1(x)),
                                               k_fused: lambda: fused_mlp_forward(f1, None, None, f2, x)}, s1.device))
    return _TIMING_CACHE[k_pair], _TIMING_CACHE[k_fused]


def _set_fused(d: LayerDecision, mod: SparseLinear, reason: str) -> None:
    d.action, d.fmt, d.kernel, d.reason, d.density = "packed", mod.fmt, get_kernel("cpp_fine").label(), reason, \
        mod.weight.density


def _note(d1: LayerDecision, d2: LayerDecision, text: str) -> None:
    for d in (d1, d2):
        d.reason += f"; {text}"
