"""sparsevit's kernels as PyTorch custom ops (``torch.ops.sparsevit.*``).

Each op has one schema, a fake (meta) implementation so it traces under ``torch.compile``, a
reference PyTorch implementation that is always there, and fast implementations (C++ CPU, CUDA,
Triton) picked by device. The documented Python wrappers below are the public entry points.

* ``bsr_linear(x, w, bias=None, activation=None)``: ``act(x @ W^T + b)`` with ``W`` a
  :class:`sparsevit.formats.BlockSparseWeight`.
* ``attention(q, k, v, attn_bias=None, scale=None)``: attention for pruned heads (q/k and v head
  dims may differ, any head count).
* ``layernorm_gather`` / ``residual_scatter_add``: the residual-subset gather and scatter of
  P3B-style plans, fused into the norm before and the projection epilogue after.
"""
import importlib

_WRAPPERS = {
    "bsr_linear": "sparsevit.ops.bsr",
    "layernorm_gather": "sparsevit.ops.residual",
    "residual_scatter_add": "sparsevit.ops.residual",
    "attention": "sparsevit.ops.attention",
    "attention_unsupported_reasons": "sparsevit.ops.attention",
}
__all__ = list(_WRAPPERS)


def __getattr__(name):
    # Loaded on first use: each op module registers its custom op (and, for bsr_linear, the CUDA
    # kernels of sparsevit.ops.bsr_gpu) when imported, and `import sparsevit` must not need triton.
    if name in _WRAPPERS:
        module = importlib.import_module(_WRAPPERS[name])
        if name == "bsr_linear":
            try:
                importlib.import_module("sparsevit.ops.bsr_gpu")
            except ImportError:
                pass  # no GPU kernels in this install; the CPU and reference paths stay
        return getattr(module, name)
    raise AttributeError(f"module 'sparsevit.ops' has no attribute '{name}'")
