"""Save and load accelerated models without the original checkpoint.

A ``.sparsevit`` file is a torch zip archive holding the whole accelerated module (its classes are
timm's and sparsevit's, so both must be importable when loading), the plan as JSON, the per-layer
report and version information. Saves are atomic: the archive is written to a temporary file in
the same folder and renamed over the target, so an interrupted save never leaves a broken file.
Loading checks the header and reports a corrupt, truncated or foreign file as
:class:`~sparsevit.errors.CheckpointError`.

Only load files you trust: like ``torch.load(weights_only=False)``, loading unpickles Python objects.
"""
from __future__ import annotations

import json
import os
from typing import Union

import torch
from torch import nn

from sparsevit._io import atomic_write
from sparsevit.errors import CheckpointError

FORMAT = "sparsevit-model"
FORMAT_VERSION = 1


def save(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write an accelerated model (from :func:`sparsevit.accelerate`) to ``path`` atomically."""
    if not getattr(model, "_sparsevit_accelerated", False):
        raise CheckpointError("sparsevit.save expects a model returned by sparsevit.accelerate; save a plain "
                              "model with torch.save, or accelerate it first.")
    from sparsevit import __version__

    plan = getattr(model, "sparsevit_plan", None)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sparsevit_version": __version__,
        "torch_version": torch.__version__,
        "plan": json.dumps(plan.to_json_dict()) if plan is not None else None,
        "report": [d.as_dict() for d in getattr(model, "sparsevit_report", [])],
        "module": model,
    }
    atomic_write(os.fspath(path), lambda tmp: torch.save(payload, tmp), suffix=".sparsevit")


def export(model: nn.Module, example_input: torch.Tensor, path: Union[str, os.PathLike]):
    """``torch.export`` an accelerated model for ``example_input``'s shape and save it (``.pt2``).

    Every sparsevit op is a registered custom op with a fake implementation, so the exported program
    keeps the sparse kernels as single nodes; load it with ``torch.export.load(path).module()`` in a
    process that has imported ``sparsevit`` (which registers those ops). Returns the ExportedProgram.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TypeError("export needs an example input tensor of the shape you will run, e.g. "
                        "torch.randn(1, 3, 224, 224)")
    model.eval()
    program = torch.export.export(model, (example_input,))
    atomic_write(os.fspath(path), lambda tmp: torch.export.save(program, tmp), suffix=".pt2")
    return program


def load(path: Union[str, os.PathLike], map_location=None) -> nn.Module:
    """Read a model written by :func:`save`; it comes back in eval mode with its report and plan."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no such file: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt or not a sparsevit model ({type(exc).__name__}: {exc}); "
                              "re-save it with sparsevit.save.") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a sparsevit model; use torch.load for it.")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by sparsevit {payload.get('sparsevit_version')} (format "
                              f"{payload['format_version']}); upgrade sparsevit to load it.")
    model = payload["module"]
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{path}: stored module is a {type(model).__name__}, not an nn.Module.")
    model.eval()
    if payload.get("plan"):
        from sparsevit.plan import SparsityPlan

        model.sparsevit_plan = SparsityPlan.from_json_dict(json.loads(payload["plan"]), where=path)
    return model
