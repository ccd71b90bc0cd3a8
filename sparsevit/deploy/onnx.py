"""ONNX export of accelerated models whose layers are plain sliced dense layers.

Structured plans (kept heads, head dims, MLP channels, depth cuts, dropped branches, residual
read/write subsets) leave an accelerated model made of smaller ``nn.Linear``s, norms and
sparsevit's residual-subset ops; :func:`export_onnx` writes it as an ONNX graph with the smaller
shapes, runnable by ONNX Runtime, OpenVINO or TensorRT without sparsevit.

How: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript's torchlib) with a
``custom_translation_table`` that maps each sparsevit custom op to standard ONNX operators
(:mod:`sparsevit.deploy.onnx_ops`). The TorchScript exporter is not used: it cannot see through
``torch.library.custom_op`` ops without symbolic functions per op and is deprecated in torch 2.x.

Layers that still hold sparse weights (BSR / packed / 2:4) have no standard ONNX form. They are
refused with an error naming them, or, with ``densify=True``, exported as dense Linears (zeros
included), with one warning per layer in the returned report.
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Union

import torch
from torch import nn

from sparsevit._io import atomic_write
from sparsevit.deploy.sparse_layers import densified, sparse_layers
from sparsevit.errors import UnsupportedModelError

DEFAULT_OPSET = 18  # torch 2.14's dynamo exporter builds opset 18 graphs (torchlib's opset)


@dataclass
class OnnxExportReport:
    """What :func:`export_onnx` wrote.

    path:           the ``.onnx`` file
    opset:          ONNX opset of the graph
    params:         elements of the ONNX weights that are model parameters (matched by name)
    model_params:   ``sum(p.numel() for p in model.parameters())`` of the exported model
    constants:      elements of the other initializers (index buffers, Swin masks, shape constants)
    zeros_dropped:  elements of all-zero parameters (e.g. zero-initialised biases) the graph
                    optimizer removed with the additions that used them
    custom_ops:     sparsevit op -> number of nodes translated to standard ONNX
    densified:      layers exported as dense Linears (``densify=True``), with their zero fraction
    warnings:       one line per thing the user should know (densified layers first)
    """

    path: str
    opset: int
    params: int
    model_params: int
    constants: int
    zeros_dropped: int = 0
    custom_ops: Dict[str, int] = field(default_factory=dict)
    densified: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.custom_ops.items())) or "none"
        dropped = f", {self.zeros_dropped:,} all-zero ones optimised away" if self.zeros_dropped else ""
        lines = [f"wrote {self.path} (ONNX opset {self.opset})",
                 f"  parameters: {self.params:,} (model: {self.model_params:,}{dropped}); "
                 f"other constants: {self.constants:,}",
                 f"  sparsevit ops translated to standard ONNX: {ops}"]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _check_inputs(model: nn.Module, example_input: torch.Tensor, opset: int) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module (from sparsevit.accelerate), got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError("export_onnx needs an example input tensor of the shape you will run, e.g. "
                        "torch.randn(1, 3, 224, 224)")
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} is not supported: torch's ONNX exporter builds opset {DEFAULT_OPSET}+ "
                         f"graphs; pass opset={DEFAULT_OPSET} or newer.")
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if bad:
        raise TypeError(f"export_onnx takes a float32 model, this one has {', '.join(bad)} weights; export the "
                        f"float32 model and let the target lower precision (ONNX Runtime, trtexec --fp16).")


def _refuse_sparse(model: nn.Module) -> None:
    found = sparse_layers(model)
    if found:
        names = ", ".join(f"{n} ({c})" for n, c in found)
        raise UnsupportedModelError(
            f"{len(found)} layer(s) still hold sparse weights, which have no standard ONNX form: {names}. "
            f"Pass densify=True (CLI: --densify) to export them as dense Linears (correct, but their "
            f"sparsity gives no speed-up in ONNX), or accelerate with backend='dense'.")


def _densify(model: nn.Module, report_warnings: List[str]):
    dense, replaced = densified(model)
    for name, cls_name, zeros in replaced:
        msg = (f"{name}: {cls_name} exported as a dense Linear ({zeros:.0%} of its weights are zeros that "
               f"the ONNX runtime will multiply; sparsity gives no speed-up there)")
        report_warnings.append(msg)
        warnings.warn(msg, stacklevel=3)
    return dense, [n for n, _, _ in replaced]


# how the exporter names an op it has no translation for (not a file path like .../sparsevit/...)
_SPARSEVIT_OP = re.compile(r"sparsevit::\w+|sparsevit\.\w+\.default")


def _untranslated_op(exc: Exception):
    """The line of the exporter's error that names a sparsevit op, or None."""
    for line in str(exc).splitlines():
        if _SPARSEVIT_OP.search(line):
            return line.strip()[:300]
    return None


def _check_graph(program: torch.export.ExportedProgram, table: Dict) -> Dict[str, int]:
    """Count the sparsevit ops in the traced graph; refuse any the translation table lacks."""
    counts: Dict[str, int] = {}
    unknown = []
    for node in program.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith("sparsevit."):
            continue
        if node.target in table:
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
            continue
        stack = node.meta.get("nn_module_stack") or {}
        where = list(stack.values())[-1][0] if stack else "?"
        unknown.append(f"{node.target} (in {where})")
    if unknown:
        raise UnsupportedModelError(f"no ONNX translation for: {'; '.join(unknown)}. Sparse layers need "
                                    f"densify=True; other ops need an entry in sparsevit.deploy.onnx_ops.")
    return counts


def _optimize(model, param_names) -> None:
    """Constant folding and fusions as torch's ``optimize=True`` does, except that nodes reading a
    model parameter (weight transposes, the relative-position table gather, the class token's
    batch expand) are left to the runtime, which folds them when it loads the graph (ONNX Runtime,
    TensorRT): the file then holds every parameter once, under its name, in its pruned shape."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    def should_fold(node):
        reads_param = any(v is not None and v.name in param_names for v in node.inputs)
        return False if reads_param else None

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)
    onnxscript.rewriter.onnx_fusions.fuse(model)


def _count_initializers(model, params: Dict[str, torch.Tensor]):
    """(elements of the model's parameters found in the graph, elements of the other initializers,
    elements of all-zero parameters the optimizer removed together with the ops that used them).

    A parameter is found under its own name with its shape, or, when the optimizer merged
    identical tensors (e.g. LayerNorm weights that are all ones), as an initializer with the
    same shape and values."""
    inits = dict(model.graph.initializers)
    found = constants = zeros_dropped = 0
    used = set()
    for name, p in params.items():
        value = inits.get(name)
        if value is not None and tuple(value.shape) == tuple(p.shape):
            found += p.numel()
            used.add(name)
            continue
        for other, v in inits.items():
            if tuple(v.shape) == tuple(p.shape) and v.const_value is not None and \
                    torch.equal(torch.from_numpy(v.const_value.numpy()), p.detach().cpu()):
                found += p.numel()
                used.add(other)
                break
        else:
            if not bool(p.detach().any()):  # an all-zero bias the optimizer removed with its Add
                zeros_dropped += p.numel()
    for name, v in inits.items():
        if name not in used:
            constants += v.const_value.size if v.const_value is not None else 0
    return found, constants, zeros_dropped


def export_onnx(fast: nn.Module, example_input: torch.Tensor, path: Union[str, os.PathLike], *,
                densify: bool = False, opset: int = DEFAULT_OPSET) -> OnnxExportReport:
    """Write an accelerated model to ``path`` as an ONNX graph with the pruned (smaller) shapes.

    Args:
        fast: a float32 model from :func:`sparsevit.accelerate` (any timm ViT/DeiT/BeiT/Swin).
        example_input: an input of the image size you will run (e.g. ``torch.randn(2, 3, 224, 224)``).
        path: the ``.onnx`` file to write (atomically; weights are stored inside the file).
        densify: export layers that hold sparse weights as dense Linears with a warning each
            (default: refuse them with :class:`~sparsevit.errors.UnsupportedModelError`).
        opset: ONNX opset (18 or newer).

    Shapes are static: the graph takes exactly ``example_input``'s shape (export once per batch
    size). A dynamic batch dimension is not offered because torch 2.14's exporter fails to
    decompose attention with a symbolic batch for BeiT and Swin.

    Returns an :class:`OnnxExportReport` (parameter counts, translated ops, warnings).
    """
    _check_inputs(fast, example_input, opset)
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the onnx and onnxscript packages ({exc}); "
                          f"pip install onnx onnxscript") from None
    from sparsevit.deploy.onnx_ops import translation_table

    report_warnings: List[str] = []
    dense_names: List[str] = []
    if densify:
        fast, dense_names = _densify(fast, report_warnings)
    else:
        _refuse_sparse(fast)
        fast = copy.deepcopy(fast)
    # A private copy, so tracing leaves the user's model as it was. `.float()` re-applies the dtype,
    # which drops cached relative-position biases: the graph then computes them from the (small)
    # tables, as the parameter count expects. Without requires_grad the tracer keeps one attention
    # layout (a bias that requires grad makes BeiT/Swin attention fail to decompose in torch 2.14).
    fast = fast.float().eval().requires_grad_(False)
    table = translation_table()
    # Traced with grad mode on: the runtime updates the residual stream in place only under
    # no_grad, and ONNX has no in-place ops; the out-of-place residual ops are what is translated.
    # The module (not a torch.export program) goes to the exporter: its own export strategy keeps
    # attention whole, where torch.export + decompositions fails on BeiT/Swin attention reshapes.
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own chatter (deprecations, opset notes)
        try:
            onnx_program = torch.onnx.export(fast, (example_input,), dynamo=True, opset_version=opset,
                                             custom_translation_table=table, external_data=False,
                                             input_names=["pixels"], output_names=["logits"],
                                             verbose=False, optimize=False)
        except Exception as exc:
            line = _untranslated_op(exc)
            if line is None:
                raise
            raise UnsupportedModelError(f"ONNX export failed on a sparsevit op with no standard ONNX form "
                                        f"({line}); sparse layers need densify=True, other ops an entry in "
                                        f"sparsevit.deploy.onnx_ops.") from exc
    counts = _check_graph(onnx_program.exported_program, table)
    _optimize(onnx_program.model, {n for n, _ in fast.named_parameters()})
    atomic_write(os.fspath(path), lambda tmp: onnx_program.save(tmp), suffix=".onnx")
    params, constants, zeros = _count_initializers(onnx_program.model, dict(fast.named_parameters()))
    return OnnxExportReport(os.fspath(path), opset, params, sum(p.numel() for p in fast.parameters()),
                            constants, zeros, counts, dense_names, report_warnings)
