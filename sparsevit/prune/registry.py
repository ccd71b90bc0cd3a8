"""Pruning methods by name: ``sparsevit.prune(model, method=NAME, ...)`` looks them up here.

A method is a function ``fn(model, *, criterion, sparsity, data, num_batches, loss_fn, **options)
-> SparsityPlan`` registered with :func:`register_method`. It must not modify ``model``.

Built-in method modules are imported lazily on the first lookup; a module that does not exist (yet)
is skipped, so methods living in their own files (``p3b``, ``art``, ``sls``, ``dimap``) plug in by
registering themselves at import time.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

BUILTIN_MODULES = ("sparsevit.prune.grouped", "sparsevit.prune.p3b", "sparsevit.prune.art",
                   "sparsevit.prune.sls", "sparsevit.prune.dimap")


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
    _loaded = True
    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # a real missing dependency inside an existing module
                raise


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
