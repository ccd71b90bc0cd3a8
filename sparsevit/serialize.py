"""Save and load accelerated models as data: a file that cannot run code.

A ``.sparsevit`` file is a safetensors file. Its tensors are the fast model's ``state_dict``
(``model/<key>``) and the plan's masks (``mask/<name>``); its metadata holds one JSON document
(``sparsevit``: format name and version, the architecture spec of the original timm model, the plan,
the packed Linears and their kernels, the accelerate options, the sparsevit/timm/torch versions) and
``sha256``, a SHA-256 over that JSON and every tensor (name, dtype, shape, bytes).

Loading never unpickles. It verifies the checksum, rebuilds the timm model from the spec (random
init, no download), runs ``accelerate(model, plan, backend="dense")`` (deterministic: the module
tree depends on the plan only), swaps in the packed Linears the file lists (built from its tensors,
indices validated), checks that every index buffer equals what the plan implies, and loads the
weights with ``strict=True``. Saves are atomic, and a save loads its own file back and compares
outputs on a random probe, so a model the spec cannot rebuild is refused at save time.
Old torch-pickle files are refused unless ``trust_pickle=True``.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Optional, Union

import torch
from torch import nn

from sparsevit._io import atomic_write, check_readable_file, first_bytes, is_torch_pickle, sha256_hex
from sparsevit.errors import CheckpointError, SparseVitError
from sparsevit.runtime.linear import SparseLinear

FORMAT = "sparsevit-model"
FORMAT_VERSION = 2  # 2: safetensors + JSON; 1: torch pickle (read only with trust_pickle=True)
_MODEL, _MASK = "model/", "mask/"


# ----------------------------------------------------------------------------------- save
def save(model: nn.Module, path: Union[str, os.PathLike], *, architecture: Optional[str] = None,
         model_kwargs: Optional[dict] = None) -> None:
    """Write an accelerated model (from :func:`sparsevit.accelerate`) to ``path`` atomically.

    The timm architecture is recorded by ``accelerate``; pass ``architecture`` (a timm model name)
    and ``model_kwargs`` (``timm.create_model`` keyword arguments) when it cannot be derived. The
    file is loaded back and checked against ``model`` on a random input before it replaces ``path``;
    a mismatch raises :class:`CheckpointError` naming what differs.
    """
    if not getattr(model, "_sparsevit_accelerated", False):
        raise CheckpointError("sparsevit.save expects a model returned by sparsevit.accelerate; save a plain "
                              "model with torch.save, or accelerate it first.")
    spec = _spec_for_save(model, architecture, model_kwargs)
    tensors, doc = _payload(model, spec)
    path = os.fspath(path)

    def write(tmp):
        _write_file(tmp, tensors, doc)
        _check_saved(model, tmp, spec)
    atomic_write(path, write, suffix=".sparsevit")


def _spec_for_save(model, architecture, model_kwargs) -> dict:
    from sparsevit.models.spec import build_from_spec, spec_differences

    source = dict(getattr(model, "sparsevit_source", None) or {})
    if architecture is not None or model_kwargs is not None:
        if not isinstance(architecture, str) or not isinstance(model_kwargs or {}, dict):
            raise CheckpointError("pass architecture='<timm model name>' and model_kwargs={...} (a dict) together.")
        source.update(architecture=architecture, kwargs=dict(model_kwargs or {}))
        source.pop("error", None)
    hint = ("pass sparsevit.save(fast, path, architecture='<timm model name>', model_kwargs={...}) with the "
            "arguments you gave timm.create_model.")
    if source.get("error") or not source.get("architecture"):
        raise CheckpointError(f"cannot record how to rebuild this model: "
                              f"{source.get('error', 'accelerate recorded no architecture')}; {hint}")
    try:
        rebuilt = build_from_spec(source)
    except ValueError as exc:
        raise CheckpointError(f"cannot rebuild the model from its architecture spec ({exc}); {hint}") from None
    diffs = spec_differences(source, rebuilt)
    if diffs:
        raise CheckpointError(f"the model rebuilt from the spec ({source['architecture']}) differs from yours: "
                              f"{'; '.join(diffs)}; {hint}")
    return {k: source[k] for k in ("architecture", "kwargs", "state") if k in source}


def _payload(model: nn.Module, spec: dict):
    from sparsevit import __version__
    from sparsevit.models.spec import timm_version

    plan = model.sparsevit_plan
    tensors = {_MODEL + k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tensors.update({_MASK + k: v.detach().cpu().to(torch.bool).contiguous() for k, v in plan.masks.items()})
    packed = [_linear_record(name, m) for name, m in model.named_modules() if isinstance(m, SparseLinear)]
    options = dict(getattr(model, "sparsevit_options", None) or {})
    options["dtype"] = str(_model_dtype(model)).replace("torch.", "")  # what the weights are now
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "versions": {"sparsevit": __version__, "timm": timm_version(), "torch": torch.__version__},
        "architecture": spec, "plan": plan.to_json_dict(), "packed": packed, "accelerate": options,
        "report": [d.as_dict() for d in getattr(model, "sparsevit_report", [])],
    }
    return tensors, doc


def _linear_record(name: str, m: nn.Module) -> dict:
    """How a packed Linear is rebuilt: its format (forced through ``accelerate(formats=...)``) and kernel."""
    return {"module": name, "fmt": m.fmt, "kernel": m.kernel}


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _write_file(path: str, tensors: Dict[str, torch.Tensor], doc: dict) -> None:
    from safetensors.torch import save_file

    text = json.dumps(doc, sort_keys=True, ensure_ascii=True)
    save_file(tensors, path, metadata={"sparsevit": text, "sha256": sha256_hex(text.encode("ascii"), tensors)})


def _check_saved(model: nn.Module, path: str, spec: dict) -> None:
    """Load the file just written and compare its output with ``model``'s on a random probe."""
    from sparsevit.models.spec import probe_input

    hint = ("pass sparsevit.save(fast, path, architecture='<timm model name>', model_kwargs={...}) with the "
            "arguments you gave timm.create_model.")
    try:
        back = load(path)
    except CheckpointError as exc:
        raise CheckpointError(f"the saved file does not load back ({exc}); {hint}") from None
    p = next(model.parameters())
    x = probe_input(spec).to(device=p.device, dtype=_model_dtype(model))
    with torch.no_grad():
        want = model(x)
        got = back.to(p.device)(x)
    tol = 1e-6 if want.dtype in (torch.float32, torch.float64) else 1e-2
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    if not err <= tol * max(scale, 1e-12):
        raise CheckpointError(f"the model rebuilt from the saved file computes something else (max abs difference "
                              f"{err:.3g} on a random input, output scale {scale:.3g}); {hint}")


# ----------------------------------------------------------------------------------- load
def load(path: Union[str, os.PathLike], map_location=None, *, trust_pickle: bool = False) -> nn.Module:
    """Read a model written by :func:`save`; it comes back in eval mode with its report and plan.

    Nothing in the file is executed. Files written by sparsevit < 0.2 (torch pickles) raise
    :class:`CheckpointError` unless ``trust_pickle=True`` (only for files you trust: unpickling runs
    code). ``map_location``: device to move the model to.
    """
    path = os.fspath(path)
    check_readable_file(path, CheckpointError, "sparsevit model")
    if is_torch_pickle(first_bytes(path)):
        if not trust_pickle:
            raise CheckpointError(f"{path} was written by an older sparsevit (a torch pickle, which can run code "
                                  "when loaded); re-save it with this version, or pass trust_pickle=True if you "
                                  "trust the file.")
        return _load_pickle(path, map_location)
    tensors, doc = _read_file(path)
    try:
        model = _rebuild(doc, tensors, path)
    except CheckpointError:
        raise
    except (SparseVitError, ValueError, TypeError, RuntimeError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: the model cannot be rebuilt ({type(exc).__name__}: {exc}); "
                              "re-save it with sparsevit.save.") from None
    return model if map_location is None else model.to(map_location)


def _read_file(path: str):
    """Tensors and the JSON document of a sparsevit safetensors file, checksum verified."""
    from safetensors.torch import load as load_bytes

    with open(path, "rb") as f:
        data = f.read()
    corrupt = f"{path} is corrupt or not a sparsevit model"
    try:
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n].decode("utf-8"))
        tensors = load_bytes(data)
    except Exception as exc:
        raise CheckpointError(f"{corrupt} ({type(exc).__name__}: {exc}); re-save it with sparsevit.save.") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or "sparsevit" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a sparsevit model; load it with safetensors.")
    text = meta["sparsevit"]
    if sha256_hex(text.encode("utf-8"), tensors) != meta.get("sha256"):
        raise CheckpointError(f"{path} is corrupt (checksum mismatch: its contents changed after it was saved); "
                              "re-save it or restore it from a copy.")
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sparsevit model file.")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by sparsevit {doc.get('versions', {}).get('sparsevit')} (format "
                              f"{version}); upgrade sparsevit to load it.")
    return tensors, doc


def _rebuild(doc: dict, tensors: Dict[str, torch.Tensor], path: str) -> nn.Module:
    import sparsevit
    from sparsevit.models.spec import build_from_spec, spec_differences
    from sparsevit.plan import SparsityPlan
    from sparsevit.runtime.report import LayerDecision, Report

    masks = {k[len(_MASK):]: v for k, v in tensors.items() if k.startswith(_MASK)}
    try:
        plan = SparsityPlan.from_json_dict(doc["plan"], masks, where=f"{path} (plan)")
    except SparseVitError as exc:
        raise CheckpointError(f"the plan inside {path} is invalid: {exc}") from None
    spec = doc["architecture"]
    model = build_from_spec(spec)
    diffs = spec_differences({"state": spec.get("state")}, model)
    if diffs:
        raise CheckpointError(f"{path}: timm builds '{spec['architecture']}' differently from the saved model "
                              f"({'; '.join(diffs)}); load it with the timm version it was saved with "
                              f"({doc.get('versions', {}).get('timm')}).")
    dtype = getattr(torch, str(doc.get("accelerate", {}).get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{path}: unknown dtype {doc['accelerate'].get('dtype')!r}")
    records = doc.get("packed", [])
    try:
        formats = {r["module"]: r["fmt"] for r in records}
        formats.update({name: "dense" for name in plan.masks if name not in formats})
        fast = sparsevit.accelerate(model, plan, dtype=dtype, formats=formats, verify=False)  # checksummed
        for r in records:
            fast.get_submodule(r["module"]).kernel = str(r.get("kernel", "auto"))
        from sparsevit.runtime.patch_embed import restore_patch_embed

        restore_patch_embed(fast, doc.get("report", []))  # the saved choice, not a new timing
    except (KeyError, TypeError, AttributeError, SparseVitError, ValueError) as exc:
        raise CheckpointError(f"{path}: its packed layers cannot be rebuilt ({type(exc).__name__}: {exc}); "
                              "the file is corrupt, re-save it.") from None
    state = {k[len(_MODEL):]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    packed_prefixes = [r["module"] + "." for r in records]
    _check_index_buffers(fast, state, packed_prefixes, path)
    try:  # SparseLinear validates every index tensor it is given
        fast.load_state_dict(state, strict=True)
    except (RuntimeError, SparseVitError, ValueError) as exc:
        raise CheckpointError(f"{path}: its tensors do not fit the model they describe ({exc}); "
                              "the file is corrupt, re-save it.") from None
    fast.eval()
    fast.sparsevit_report = Report(LayerDecision(**_tuples(d)) for d in doc.get("report", []))
    fast.sparsevit_plan = plan
    fast.sparsevit_source = spec
    fast.sparsevit_options = dict(doc.get("accelerate", {}))
    return fast


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _check_index_buffers(fast: nn.Module, state: Dict[str, torch.Tensor], packed_prefixes, path: str) -> None:
    """Every integer buffer outside the packed Linears follows from the plan: the file must agree."""
    for k, v in fast.state_dict().items():
        if v.is_floating_point() or v.is_complex() or any(k.startswith(p) for p in packed_prefixes):
            continue
        if k not in state or state[k].dtype != v.dtype or not torch.equal(state[k], v.cpu()):
            raise CheckpointError(f"{path}: index tensor '{k}' does not match what the plan implies; "
                                  "the file is corrupt or inconsistent, re-save it.")


def _load_pickle(path: str, map_location) -> nn.Module:
    """Format 1 (torch pickle), for files the caller trusts."""
    from sparsevit.plan import SparsityPlan

    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt or not a sparsevit model ({type(exc).__name__}: {exc}).") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("module"),
                                                                                          nn.Module):
        raise CheckpointError(f"{path} is a torch file but not a sparsevit model; use torch.load for it.")
    model = payload["module"].eval()
    if payload.get("plan"):
        model.sparsevit_plan = SparsityPlan.from_json_dict(json.loads(payload["plan"]), where=path)
    return model


# ----------------------------------------------------------------------------------- export
def export(model: nn.Module, example_input: torch.Tensor, path: Union[str, os.PathLike], *, format: str = "pt2",
           densify: bool = False):
    """Export an accelerated model for ``example_input``'s shape.

    ``format="pt2"``: ``torch.export`` with every sparsevit op kept as a single custom-op node; load it
    with ``torch.export.load(path).module()`` in a process that has imported ``sparsevit``. Returns the
    ExportedProgram. ``format="onnx"``: :func:`sparsevit.deploy.export_onnx` (structured plans; sparse
    layers are refused unless ``densify=True``), returns its report. ``format="aoti"``:
    :func:`sparsevit.deploy.export_aoti` (an AOTInductor package runnable from C++), returns the path.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TypeError("export needs an example input tensor of the shape you will run, e.g. "
                        "torch.randn(1, 3, 224, 224)")
    if format not in ("pt2", "onnx", "aoti"):
        raise ValueError(f"format must be 'pt2', 'onnx' or 'aoti', got {format!r}")
    if densify and format != "onnx":
        raise ValueError("densify applies to format='onnx' only")
    if format == "onnx":
        from sparsevit.deploy import export_onnx

        return export_onnx(model, example_input, path, densify=densify)
    if format == "aoti":
        from sparsevit.deploy import export_aoti

        return export_aoti(model, example_input, path)
    model.eval()
    program = torch.export.export(model, (example_input,))
    atomic_write(os.fspath(path), lambda tmp: torch.export.save(program, tmp), suffix=".pt2")
    return program
