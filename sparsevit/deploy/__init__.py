"""Deployment outside the sparsevit runtime: ONNX graphs and AOTInductor packages.

* :func:`export_onnx` -- structured plans as a standard ONNX graph with the pruned shapes
  (ONNX Runtime, OpenVINO, TensorRT); sparse layers are refused or, on request, densified.
* :func:`export_aoti` / :func:`load_aoti` -- the accelerated model compiled ahead of time by
  AOTInductor into a ``.pt2`` package, sparsevit's custom ops included.

See docs/deploy.md for the commands per target.
"""
from sparsevit.deploy.sparse_layers import densified, sparse_layers  # noqa: F401

__all__ = ["export_onnx", "OnnxExportReport", "export_aoti", "load_aoti", "sparse_layers", "densified"]


def __getattr__(name):
    # The exporters load on first use: onnx/onnxscript are optional dependencies.
    if name in ("export_onnx", "OnnxExportReport"):
        from sparsevit.deploy import onnx as _onnx

        return getattr(_onnx, name)
    if name in ("export_aoti", "load_aoti"):
        from sparsevit.deploy import aoti as _aoti

        return getattr(_aoti, name)
    raise AttributeError(f"module 'sparsevit.deploy' has no attribute '{name}'")
