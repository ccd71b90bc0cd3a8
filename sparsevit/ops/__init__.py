"""sparsevit's kernels as PyTorch custom ops (``torch.ops.sparsevit.*``).

Each op has one schema, a fake (meta) implementation so it traces under ``torch.compile``, a
reference PyTorch implementation that is always there, and fast implementations (C++ CPU, CUDA,
Triton) picked by device. The documented Python wrappers below are the public entry points.

* ``bsr_linear(x, w, bias=None, activation=None, kernel="auto")``: ``act(x @ W^T + b)`` with ``W`` a
  :class:`sparsevit.formats.BlockSparseWeight`; ``nm_linear`` the same for an N:M weight. Their
  implementations (C++, CUDA, Triton, torch 2:4, reference) are the classes of
  :mod:`sparsevit.ops.linear_kernels`. ``sparsevit.ops.fine_linear`` runs fine-grained
  (unstructured, 1x4, 1x8) weights.
* ``attention(q, k, v, attn_bias=None, scale=None)``: attention for pruned heads (q/k and v head
  dims may differ, any head count): Triton on CUDA, the fused C++ kernel on CPU, else SDPA.
* ``layernorm_gather`` / ``residual_scatter_add``: the residual-subset gather and scatter of
  P3B-style plans, fused into the norm before and the projection epilogue after.
"""
import importlib

_WRAPPERS = {
    "bsr_linear": "sparsevit.ops.bsr",
    "nm_linear": "sparsevit.ops.nm",
    "layernorm_gather": "sparsevit.ops.residual",
    "residual_scatter_add": "sparsevit.ops.residual",
    "attention": "sparsevit.ops.attention",
    "attention_unsupported_reasons": "sparsevit.ops.attention",
    "attention_kernel_name": "sparsevit.ops.attention",
}
__all__ = list(_WRAPPERS)


# ``attention`` is both a submodule and its public function: importing the submodule makes the
# package attribute the module (which ``__getattr__`` never sees), so bind the function eagerly.
from sparsevit.ops.attention import attention  # noqa: E402,F811


def __getattr__(name):
    # Loaded on first use: each op module registers its own custom op and all of that op's
    # implementations when imported.
    if name in _WRAPPERS:
        return getattr(importlib.import_module(_WRAPPERS[name]), name)
    raise AttributeError(f"module 'sparsevit.ops' has no attribute '{name}'")
