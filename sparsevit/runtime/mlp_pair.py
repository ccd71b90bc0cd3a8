"""The MLP pair choice: fc1 and fc2 together as one fused call (``sparsevit::fine_mlp`` or
``sparsevit::bsr_mlp``), or as chosen per layer.

:func:`~sparsevit.runtime.linear.choose_linear` times each Linear on its own. When both MLP layers
are fine-grained they run as one ``sparsevit::fine_mlp`` call (:mod:`sparsevit.ops.fine_mlp`),
which skips fc1's transpose back to ``[tokens, hidden]`` and fc2's repacking of it (1.09-1.14x over
two ``fine_linear`` calls at 70% sparsity). Timing the layers apart misses that, so at 60-80% sparsity
the fine kernel can lose each layer to dense and still win the pair. :func:`choose_mlp_pair`
times the fused pair against the two modules chosen per layer, on the same input, in interleaved
rounds (:func:`~sparsevit.runtime.linear.kernel_choice_ms`), keeps the faster, and says so in both
layers' report entries.

When both layers are chosen block-sparse on the C++ kernel, :func:`choose_mlp_pair` likewise times
``sparsevit::bsr_mlp`` (:mod:`sparsevit.ops.bsr_mlp`: fc1's hidden output stays in L2 per group of
token tiles instead of going through memory) against the two ``bsr_linear`` calls, and marks fc1
(``fc1.fuse_bsr_mlp = True``, read by :class:`~sparsevit.runtime.modules.SparseMlp`) when it wins.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import nn

from sparsevit.ops import bsr_mlp as bsr_pair
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
    when the fused fine pair is measured faster than the modules ``factory`` chose per layer, else the
    modules as given; when those are both block-sparse on the C++ kernel, fc1 is marked to run the pair
    as one ``sparsevit::bsr_mlp`` call if that is measured faster. Both layers' report entries say
    what was compared and what won.

    Args:
        factory: the :class:`~sparsevit.runtime.linear.LinearFactory` that built ``fc1`` / ``fc2``
            (its ``specs`` and ``decisions`` hold what it knew and decided).
        names: the two layers' names in the original model (the report's keys).
        fc1, fc2: the per-layer choices; fc1 applies the activation.
        norm: the MLP's norm between the layers, if any (the fused op has none: never fused then).
    """
    if not _already_fused(fc1, fc2):
        fc1, fc2 = _choose_fine_pair(factory, names, fc1, fc2, norm)
    if _cpp_bsr(fc1) and _cpp_bsr(fc2):
        _choose_bsr_pair(factory, names, fc1, fc2, norm)
    return fc1, fc2


def _choose_fine_pair(factory: LinearFactory, names: Tuple[str, str], fc1: nn.Module, fc2: nn.Module,
                      norm: Optional[nn.Module]) -> Tuple[nn.Module, nn.Module]:
    """The fused ``fine_mlp`` pair or the modules as given (see :func:`choose_mlp_pair`)."""
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


# ------------------------------------------------------------------------- the block-sparse pair
def _cpp_bsr(m: nn.Module) -> bool:
    """A BSR SparseLinear that runs the C++ kernel directly on its device and dtype."""
    return isinstance(m, SparseLinear) and m.kind == "bsr" and bool(m.direct_args())


def _why_not_bsr(factory: LinearFactory, names, fc2: SparseLinear, norm: Optional[nn.Module]) -> Optional[str]:
    """Why the block-sparse pair is left per layer without timing the fused op (None: time it)."""
    if not isinstance(factory, LinearFactory) or any(n not in factory.specs for n in names):
        return "built without a LinearFactory"
    if factory.backend not in ("auto", "sparse") or os.environ.get("SPARSEVIT_CHOOSE", "measure") == "model":
        return "not timed (backend or SPARSEVIT_CHOOSE=model)"
    # Formats given (a saved model being rebuilt) do not stop it: fusing keeps both layers' formats
    # and their output bit for bit, so a loaded model times its pairs again like the build did.
    if norm is not None:
        return "an MLP norm sits between fc1 and fc2"
    if fc2.activation is not None:
        return "fc2 applies an activation"
    return None


def _choose_bsr_pair(factory: LinearFactory, names: Tuple[str, str], fc1: SparseLinear, fc2: SparseLinear,
                     norm: Optional[nn.Module]) -> None:
    """Marks ``fc1`` (``bsr_pair.FUSED_FLAG``) when one ``bsr_mlp`` call is measured faster than the
    two ``bsr_linear`` calls; notes the comparison in both layers' report entries."""
    fc1.__dict__.pop(bsr_pair.FUSED_FLAG, None)
    have = all(n in factory.decisions for n in names) if isinstance(factory, LinearFactory) else False
    why_not = _why_not_bsr(factory, names, fc2, norm)
    if why_not is not None:
        if have:
            _note(*(factory.decisions[n] for n in names), f"fused bsr_mlp pair not timed: {why_not}")
        return
    s1 = factory.specs[names[0]]
    d1, d2 = (factory.decisions[n] for n in names)
    x = torch.randn(s1.tokens, fc1.in_features, device=s1.device, dtype=fc1.values.dtype)
    reasons = bsr_pair.not_fusable_reasons(x, fc1.weight, fc2.weight)
    if reasons:
        _note(d1, d2, f"fused bsr_mlp pair not possible: {'; '.join(reasons)}")
        return
    direct1, direct2 = fc1.direct_args(), fc2.direct_args()
    with torch.inference_mode():
        ref = fc2(fc1(x))
        fused = bsr_pair.run_direct_pair(fc1, direct1, fc2, direct2, x)
        if not torch.equal(fused, ref):  # same kernels, same order: anything else is a defect
            _note(d1, d2, "fused bsr_mlp pair rejected: its output differs from the per-layer pair")
            return
        key = ("bsr_mlp_pair", tuple(fc1.weight.shape), tuple(fc2.weight.shape), fc1.weight.block,
               fc2.weight.block, fc1.values.dtype, fc1.activation, s1.tokens, torch.get_num_threads(),
               fc1.values.shape[0], fc2.values.shape[0])
        k_pair, k_fused = key + ("per-layer",), key + ("fused",)
        if k_pair not in _TIMING_CACHE or k_fused not in _TIMING_CACHE:
            _TIMING_CACHE.update(kernel_choice_ms({
                k_pair: lambda: fc2.run_direct(fc1.run_direct(x, direct1), direct2),
                k_fused: lambda: bsr_pair.run_direct_pair(fc1, direct1, fc2, direct2, x)}, s1.device))
    t_pair, t_fused = _TIMING_CACHE[k_pair], _TIMING_CACHE[k_fused]
    for d in (d1, d2):
        d.est_ms.update({"mlp pair per-layer bsr_linear": t_pair, "mlp pair fused bsr_mlp": t_fused})
    where = f"measured at {s1.tokens} tokens"
    if t_fused < t_pair:
        fc1.__dict__[bsr_pair.FUSED_FLAG] = True
        _note(d1, d2, f"fc1+fc2 fused as sparsevit::bsr_mlp, {t_pair / t_fused:.2f}x faster than two bsr_linear "
                      f"calls ({t_fused:.2f} ms vs {t_pair:.2f} ms, {where})")
    else:
        _note(d1, d2, f"fused bsr_mlp pair {t_fused:.2f} ms vs {t_pair:.2f} ms per layer ({where}): kept per layer")
