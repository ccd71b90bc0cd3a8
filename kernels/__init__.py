"""Triton kernels of sparsevit, shipped as the package ``sparsevit.kernels``.

Importing this package never fails: when Triton is missing (or broken) ``HAS_TRITON`` is False and
``TRITON_UNAVAILABLE_REASON`` says why, so the runtime can write it into its per-layer report and
keep using the PyTorch / CUDA-C++ paths.

The kernels are decorated with ``triton.jit`` lazily, on first use, and separately for compiled and
interpreted mode (``TRITON_INTERPRET=1``, read at call time). That lets CPU-only tests run the exact
same kernel source under Triton's interpreter no matter which module imported triton first.

* :mod:`sparsevit.kernels.bsr_linear`: ``y = act(x @ W^T + b)`` with ``W`` block-sparse (BSR).
* :mod:`sparsevit.kernels.attention`: flash-style attention for pruned heads (q/k dim != v dim).
"""
HAS_TRITON = False
TRITON_UNAVAILABLE_REASON = None
try:  # pragma: no cover - depends on the environment
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except Exception as exc:  # ImportError, or a broken install (missing libcuda, ABI mismatch ...)
    TRITON_UNAVAILABLE_REASON = f"triton unavailable ({type(exc).__name__}: {exc})"


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON:
        return False
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # older triton without knobs
        import os

        return os.environ.get("TRITON_INTERPRET", "0") == "1"


from .bsr_linear import (  # noqa: E402,F401
    SUPPORTED_BLOCKS,
    bsr_linear_triton,
    bsr_linear_unsupported_reasons,
)
from .attention import attention_triton, attention_triton_unsupported_reasons  # noqa: E402,F401
