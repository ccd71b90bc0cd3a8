"""Loads the compiled extension ``sparsevit._C`` once, without ever making it a hard requirement.

If the build was skipped or failed, importing sparsevit still works: every op keeps its reference
PyTorch path, and ``accelerate`` reports per layer that the compiled kernel was unavailable (with
the load error), so nothing falls back silently.
"""
import warnings

import torch

HAS_EXTENSION = False
HAS_CUDA_EXTENSION = False
LOAD_ERROR = None

try:
    import importlib.util

    if importlib.util.find_spec("sparsevit._C") is None:
        raise ImportError("sparsevit._C was not built (installed with SPARSEVIT_SKIP_BUILD=1, or the compile "
                          "failed: see the pip install log)")
    from sparsevit import _C  # noqa: F401  (loading registers torch.ops.sparsevit_C.*)

    HAS_EXTENSION = True
    HAS_CUDA_EXTENSION = "cuda" in torch.ops.sparsevit_C.build_info()
except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "sparsevit: compiled kernels unavailable, using the PyTorch reference path "
        f"({LOAD_ERROR}). Rebuild with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_op(name: str) -> bool:
    """True when the compiled library registered ``torch.ops.sparsevit_C.<name>``."""
    return HAS_EXTENSION and hasattr(torch.ops.sparsevit_C, name)


def unavailable_reason(name: str) -> str:
    """Why a compiled op cannot be used, for the per-layer report."""
    if not HAS_EXTENSION:
        return f"compiled extension not loaded ({LOAD_ERROR})"
    return f"compiled extension has no op '{name}' (built without it)"
