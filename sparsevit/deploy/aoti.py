"""AOTInductor packages of accelerated models: compiled ahead of time, loadable without Python.

:func:`export_aoti` traces the accelerated model with ``torch.export``, points each sparsevit op at
its compiled C++ kernel and compiles the result with ``torch._inductor.aoti_compile_and_package``
into one ``.pt2`` file (generated C++ and a shared library inside).

Why the rewrite: sparsevit's public ops (``torch.ops.sparsevit.*``) are ``torch.library.custom_op``
ops defined in Python; their CPU kernels call the C++ operators of the compiled extension
(``torch.ops.sparsevit_C.*``, registered with ``TORCH_LIBRARY`` in csrc/). A package that calls
the Python ops needs a Python process that imported sparsevit; one that calls the ``sparsevit_C``
ops needs only libtorch plus the extension library loaded into the process. So every node whose
Python op would have run the C++ kernel anyway (CPU, float32/bfloat16, extension built, BSR
layout matching) is rewritten to the ``sparsevit_C`` op with the same arguments; any other
sparsevit node is kept and named in a warning (that package then needs ``import sparsevit``).

Run time needs:
* from Python: ``torch._inductor.aoti_load_package(path)`` after ``import sparsevit`` (which loads
  the extension and registers the ops);
* from C++: libtorch of the same version and ``torch::inductor::AOTIModelPackageLoader``, after
  ``dlopen``-ing sparsevit's extension library (``sparsevit/_C*.so``) with ``RTLD_LAZY |
  RTLD_GLOBAL`` so its ``TORCH_LIBRARY`` registrations run (see docs/deploy.md).
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import List, Union

import torch
from torch import nn

from sparsevit import _ext
from sparsevit._io import atomic_write

_CPP_DTYPES = (torch.float32, torch.bfloat16)


def _register_cpp_fakes() -> None:
    """Shape functions for the extension's C++ ops, so Inductor can compile calls to them."""
    def bsr_linear(x, packed, col_indices, crow_indices, bias, out_features, in_features, bh, bw, act, isa=-1):
        return x.new_empty(x.shape[0], out_features)

    def layernorm_gather(x, weight, bias, index, eps):
        return x.new_empty((*x.shape[:-1], index.shape[0]))

    def residual_scatter_add(x, index, y):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def fine_linear(x, values, col_indices, seg_ptr, bias, out_features, in_features, unit, act, isa=-1):
        return x.new_empty(x.shape[0], out_features)

    for name, fn in (("bsr_linear", bsr_linear), ("layernorm_gather", layernorm_gather),
                     ("residual_scatter_add", residual_scatter_add), ("fine_linear", fine_linear)):
        if not _ext.has_op(name):
            continue
        try:
            torch.library.register_fake(f"sparsevit_C::{name}")(fn)
        except RuntimeError as exc:  # registered before (this function ran already): keep it
            if "already" not in str(exc):
                raise


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def _cpp_target(node):
    """``(C++ op, its arguments)`` for a sparsevit node the C++ kernel can run, else ``None``."""
    from sparsevit.formats.bsr import packed_block_rows
    from sparsevit.ops.fine_linear import cpp_kernel_takes
    from sparsevit.ops.linear_kernels import ACT_CODE

    ops, cpp = torch.ops.sparsevit, torch.ops.sparsevit_C
    x = _val(node.args[0])
    if x is None or x.device.type != "cpu" or x.dtype not in _CPP_DTYPES:
        return None
    if node.target == ops.layernorm_gather.default and _ext.has_op("layernorm_gather"):
        return cpp.layernorm_gather.default, node.args
    if node.target == ops.residual_scatter_add.default and _ext.has_op("residual_scatter_add"):
        return cpp.residual_scatter_add.default, node.args
    if node.target == ops.bsr_linear.default and _ext.has_op("bsr_linear") and cpp.bsr_linear_isa(-1):
        x_node, values, col, crow, packed, out_f, in_f, bh, bw, bias, act, kernel = node.args
        p = _val(packed)
        if kernel in ("auto", "cpp_bsr") and p.dim() == 4 and p.dtype == x.dtype and \
                p.shape[2] == packed_block_rows(bh):
            return cpp.bsr_linear.default, (x_node, packed, col, crow, bias, out_f, in_f, bh, bw, ACT_CODE[act], -1)
    if node.target == ops.fine_linear.default and cpp_kernel_takes(x, _val(node.args[1])):
        x_node, values, col, _row_ptr, seg_ptr, out_f, in_f, bias, act = node.args
        return cpp.fine_linear.default, (x_node, values, col, seg_ptr, bias, out_f, in_f, _val(values).shape[1],
                                         ACT_CODE[act], -1)
    return None



def _use_cpp_ops(program: torch.export.ExportedProgram) -> List[str]:
    """Rewrite sparsevit nodes to the extension's C++ ops in place; return the nodes left as they were."""
    graph = program.graph_module.graph
    kept = []
    for node in list(graph.nodes):
        if node.op != "call_function" or not str(node.target).startswith("sparsevit."):
            continue
        target = _cpp_target(node)
        if target is None:
            stack = node.meta.get("nn_module_stack") or {}
            kept.append(f"{node.target} (in {list(stack.values())[-1][0] if stack else '?'})")
            continue
        with graph.inserting_before(node):
            new = graph.call_function(target[0], tuple(target[1]))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()
    return kept


def export_aoti(fast: nn.Module, example_input: torch.Tensor, path: Union[str, os.PathLike]) -> str:
    """Compile an accelerated model with AOTInductor into a ``.pt2`` package at ``path``.

    Args:
        fast: a model from :func:`sparsevit.accelerate` (sparse layers included: their C++ kernels
            are called from the compiled code).
        example_input: an input of the exact shape the package will run (shapes are static).
        path: the package to write (atomically); its name must end in ``.pt2``.

    Returns ``path``. Load it with :func:`load_aoti` (Python) or ``AOTIModelPackageLoader`` (C++);
    see the module docstring for what each needs at run time. Compiling takes a C++ compiler and
    tens of seconds.
    """
    if not isinstance(fast, nn.Module):
        raise TypeError(f"export_aoti expects an nn.Module (from sparsevit.accelerate), got {type(fast).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError("export_aoti needs an example input tensor of the shape you will run, e.g. "
                        "torch.randn(1, 3, 224, 224)")
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"AOTInductor packages must be named *.pt2 (got {path!r}); e.g. model.pt2")
    _register_cpp_fakes()
    # Trace a private copy (tracing may fill the model's caches) with grad mode on, so the runtime
    # takes its out-of-place residual ops (the in-place one exists only in Python).
    model = copy.deepcopy(fast).eval().requires_grad_(False)
    with torch.enable_grad():
        program = torch.export.export(model, (example_input,))
    kept = _use_cpp_ops(program)
    if kept:
        warnings.warn(f"{len(kept)} sparsevit op(s) stay Python custom ops, so this package needs a Python "
                      f"process that imported sparsevit: {'; '.join(kept)}", stacklevel=2)
    atomic_write(path, lambda tmp: torch._inductor.aoti_compile_and_package(program, package_path=tmp),
                 suffix=".pt2")
    return path


def load_aoti(path: Union[str, os.PathLike]):
    """Load a package written by :func:`export_aoti`; returns a callable ``runner(x) -> logits``.

    Imports sparsevit's extension first (``import sparsevit`` did), so its C++ ops are registered.
    """
    if not _ext.HAS_EXTENSION:
        warnings.warn(f"sparsevit's compiled extension is not loaded ({_ext.LOAD_ERROR}); a package that "
                      f"calls its C++ ops will fail to load.", RuntimeWarning, stacklevel=2)
    return torch._inductor.aoti_load_package(os.fspath(path))
