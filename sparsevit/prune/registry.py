"""Pruning methods by name: ``sparsevit.prune(model, method=NAME, ...)`` looks them up here.

A method is a function ``fn(model, *, criterion, sparsity, data, num_batches, loss_fn, **options)
-> SparsityPlan`` registered with :func:`register_method`. It must not modify ``model``.

Built-in method modules are listed in :data:`METHOD_MODULES` and imported on the first lookup; each
registers its methods at import time. A new method module is added to that tuple; a listed module
that fails to import raises (no method silently disappears).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

#: the modules that define sparsevit's own methods, imported on the first lookup
METHOD_MODULES: Tuple[str, ...] = (
    "sparsevit.prune.grouped",
    "sparsevit.prune.unstructured",
    "sparsevit.prune.p3b",
    "sparsevit.prune.sls",
    "sparsevit.prune.dimap",
    "sparsevit.prune.art",
)


@dataclass
class MethodSpec:
    name: str
    fn: Callable
    criteria: Optional[Tuple[str, ...]]  # accepted criterion names (None: the method checks itself)
    needs_data: bool = False  # the method always needs data, whatever the criterion
    doc: str = ""


_METHODS: Dict[str, MethodSpec] = {}
_ALIASES: Dict[str, str] = {}
_loaded = False


def register_method(name: str, *, criteria: Optional[Sequence[str]] = None, aliases: Sequence[str] = (),
                    needs_data: bool = False):
    """Decorator: register ``fn`` as pruning method ``name`` (and ``aliases``).

    ``criteria`` lists the criterion names the method accepts; ``sparsevit.prune`` rejects others
    with an error that lists them. ``needs_data`` makes ``prune`` require ``data`` for every criterion.
    """
    def deco(fn: Callable) -> Callable:
        key = name.lower()
        spec = MethodSpec(key, fn, tuple(criteria) if criteria is not None else None, needs_data,
                          (fn.__doc__ or "").strip().split("\n")[0])
        _METHODS[key] = spec
        for a in aliases:
            _ALIASES[a.lower()] = key
        return fn

    return deco


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    for mod in METHOD_MODULES:
        importlib.import_module(mod)
    _loaded = True


def check_fraction(value, name: str) -> Optional[float]:
    """``value`` as a float in [0, 1) (a fraction removed), ``None`` kept; else a ValueError naming it."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= v < 1.0) or math.isnan(v):
        raise ValueError(f"{name}={value} is impossible: it is the fraction removed and must be in [0, 1) "
                         f"(e.g. {name}=0.5 removes half).")
    return v


def available_methods() -> Dict[str, str]:
    """Registered method names with the first line of their docstring."""
    _load_builtins()
    return {k: v.doc for k, v in sorted(_METHODS.items())}


def get_method(name: str) -> MethodSpec:
    _load_builtins()
    if not isinstance(name, str):
        raise ValueError(f"method must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _METHODS:
        raise ValueError(f"unknown pruning method '{name}'; available: {sorted(_METHODS)} "
                         f"(aliases: {sorted(_ALIASES)}). Register new ones with "
                         "@sparsevit.prune.registry.register_method(name).")
    return _METHODS[key]
