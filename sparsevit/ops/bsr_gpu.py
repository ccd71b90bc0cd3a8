"""GPU implementations of block-sparse linear, and their registration for ``sparsevit::bsr_linear``.

Two fast backends compute ``act(x @ W^T + b)`` for a BSR weight on CUDA:

* ``"cuda_cpp"``: ``torch.ops.sparsevit_C.bsr_linear_cuda`` (``csrc/cuda/bsr_linear.cu``, WMMA tensor
  cores, fp16/bf16, blocks 16/32/64 per side), present when the extension was built with CUDA;
* ``"triton"``: :func:`sparsevit.kernels.bsr_linear_triton` (fp16/bf16/fp32, blocks 16..128).

:func:`bsr_linear_gpu` runs one of them (``backend="auto"``: CUDA C++ where it applies, else
Triton, else a dense reconstruction of ``W`` with cuBLAS, which is always correct);
:func:`gpu_unsupported_reasons` says why a backend cannot take an input. Importing this module
registers the ``"cuda"`` kernel of ``sparsevit::bsr_linear`` (defined in :mod:`sparsevit.ops.bsr`),
mapping that op's arguments by name so small schema changes there do not break us. The Triton path
is itself wrapped as the custom op ``sparsevit::bsr_linear_triton`` so it stays opaque (and
traceable through its fake impl) under ``torch.compile``.
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsevit import _ext

try:
    from sparsevit import kernels as _kernels
except Exception as exc:  # noqa: BLE001
    _kernels = None
    _KERNELS_ERROR = f"sparsevit.kernels failed to import ({type(exc).__name__}: {exc})"
else:
    _KERNELS_ERROR = None

BACKENDS = ("auto", "cuda_cpp", "triton", "dense")
CPP_BLOCKS = (16, 32, 64)
_ACT_CODE = {None: 0, "none": 0, "gelu": 1, "gelu_tanh": 2}


def _apply_act(y: Tensor, activation: Optional[str]) -> Tensor:
    if activation in (None, "none"):
        return y
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


def bsr_to_dense(values: Tensor, col_indices: Tensor, crow_indices: Tensor, out_features: int,
                 in_features: int) -> Tensor:
    """``W`` ``[out, in]`` from the BSR tensors (drops the zero padding of the ragged edge)."""
    nnz, bh, bw = values.shape
    n_rows = crow_indices.numel() - 1
    n_cols = max(-(-in_features // bw), 1)
    counts = (crow_indices[1:] - crow_indices[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(n_rows, device=values.device), counts)
    blocks = values.new_zeros((n_rows, n_cols, bh, bw))
    blocks[rows, col_indices.long()] = values
    return blocks.permute(0, 2, 1, 3).reshape(n_rows * bh, n_cols * bw)[:out_features, :in_features]


# ---------------------------------------------------------------- explainable backend availability
def gpu_unsupported_reasons(backend: str, x: Tensor, values: Tensor, bias: Optional[Tensor] = None,
                            activation: Optional[str] = None) -> List[str]:
    """Why ``backend`` (``"cuda_cpp"`` / ``"triton"``) cannot run this input; empty list: it can."""
    reasons = []
    if not x.is_cuda:
        reasons.append(f"x is on {x.device}, not CUDA")
    if activation not in _ACT_CODE:
        reasons.append(f"activation {activation!r} not in none/gelu/gelu_tanh")
    if backend == "cuda_cpp":
        if not _ext.HAS_CUDA_EXTENSION:
            reasons.append("CUDA C++ kernels not built: " + (_ext.LOAD_ERROR or "extension built without CUDA"))
        elif not _ext.has_op("bsr_linear_cuda"):
            reasons.append(_ext.unavailable_reason("bsr_linear_cuda"))
        if x.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {x.dtype}: the CUDA C++ kernel takes fp16/bf16 (tensor cores)")
        if values.dtype != x.dtype:
            reasons.append(f"weight dtype {values.dtype} != input dtype {x.dtype}")
        if values.dim() == 3 and (values.shape[1] not in CPP_BLOCKS or values.shape[2] not in CPP_BLOCKS):
            reasons.append(f"block {values.shape[1]}x{values.shape[2]} unsupported by the CUDA C++ kernel "
                           f"(sides in {CPP_BLOCKS})")
        if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 8:
            reasons.append("CUDA C++ kernel needs sm_80+")
    elif backend == "triton":
        if _kernels is None:
            reasons.append(_KERNELS_ERROR)
        else:
            reasons += [r for r in _kernels.bsr_linear_unsupported_reasons(x, values, bias, activation)
                        if "needs CUDA" not in r]
    else:
        reasons.append(f"unknown backend {backend!r}")
    return reasons


# ---------------------------------------------------------------- the Triton path as an opaque op
@torch.library.custom_op("sparsevit::bsr_linear_triton", mutates_args=())
def _bsr_linear_triton_op(x: Tensor, values: Tensor, col_indices: Tensor, crow_indices: Tensor,
                          out_features: int, bias: Optional[Tensor], activation: str) -> Tensor:
    return _kernels.bsr_linear_triton(x, values, col_indices, crow_indices, out_features, bias,
                                      None if activation == "none" else activation)


@_bsr_linear_triton_op.register_fake
def _(x, values, col_indices, crow_indices, out_features, bias, activation):
    return x.new_empty((*x.shape[:-1], out_features))


def _register_cpp_fake() -> None:
    if not _ext.has_op("bsr_linear_cuda"):
        return
    try:
        @torch.library.register_fake("sparsevit_C::bsr_linear_cuda")
        def _(x, values, col_indices, crow_indices, out_features, bias, activation):
            return x.new_empty((*x.shape[:-1], out_features))
    except Exception:  # noqa: BLE001 - already registered (module reloaded)
        pass


_register_cpp_fake()


def bsr_linear_gpu(x: Tensor, values: Tensor, col_indices: Tensor, crow_indices: Tensor, out_features: int,
                   in_features: int, bias: Optional[Tensor] = None, activation: Optional[str] = None,
                   backend: str = "auto") -> Tensor:
    """``act(x @ W^T + bias)`` on CUDA with the chosen backend (see the module docstring).

    A forced backend that cannot take the input raises ``ValueError`` with the reasons;
    ``"auto"`` falls through CUDA C++ -> Triton -> dense cuBLAS.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    act = "none" if activation is None else activation
    if backend == "auto":
        backend = next((b for b in ("cuda_cpp", "triton")
                        if not gpu_unsupported_reasons(b, x, values, bias, activation)), "dense")
    elif backend != "dense":
        reasons = gpu_unsupported_reasons(backend, x, values, bias, activation)
        if reasons:
            raise ValueError(f"bsr_linear backend {backend!r} unavailable: " + "; ".join(reasons))
    if backend == "cuda_cpp":
        return torch.ops.sparsevit_C.bsr_linear_cuda(x, values, col_indices.to(torch.int32),
                                                     crow_indices.to(torch.int32), int(out_features), bias,
                                                     _ACT_CODE[activation])
    if backend == "triton":
        return _bsr_linear_triton_op(x, values, col_indices, crow_indices, int(out_features), bias, act)
    w = bsr_to_dense(values, col_indices, crow_indices, out_features, in_features).to(x.dtype)
    return _apply_act(F.linear(x, w, None if bias is None else bias.to(x.dtype)), activation)


# ---------------------------------------------------------------- registration for sparsevit::bsr_linear
_ALIASES: Dict[str, tuple] = {
    "x": ("x", "input", "inp"),
    "values": ("values", "vals", "blocks"),
    "col_indices": ("col_indices", "col_idx", "cols"),
    "crow_indices": ("crow_indices", "crow", "row_ptr", "indptr"),
    "out_features": ("out_features", "n_out", "out_dim"),
    "in_features": ("in_features", "n_in", "in_dim"),
    "bias": ("bias",),
    "activation": ("activation", "act"),
}
REGISTRATION_ERROR: Optional[str] = None


def _make_cuda_impl(arg_names: List[str]):
    lookup = {}
    for key, names in _ALIASES.items():
        lookup[key] = next((n for n in names if n in arg_names), None)
    missing = [k for k in ("x", "values", "col_indices", "crow_indices", "out_features") if lookup[k] is None]
    if missing:
        raise RuntimeError(f"sparsevit::bsr_linear schema {arg_names} lacks {missing}")

    def impl(*args, **kwargs):
        bound = dict(zip(arg_names, args))
        bound.update(kwargs)
        get = lambda key, default=None: bound.get(lookup[key], default) if lookup[key] else default  # noqa: E731
        x = get("x")
        act = get("activation")
        act = None if act in (None, "none") else act
        in_features = get("in_features") or x.shape[-1]
        return bsr_linear_gpu(x, get("values"), get("col_indices"), get("crow_indices"), int(get("out_features")),
                              int(in_features), get("bias"), act, backend="auto")

    return impl


def _register() -> None:
    global REGISTRATION_ERROR
    try:
        import sparsevit.ops.bsr  # noqa: F401  (defines the op)

        op = torch.ops.sparsevit.bsr_linear.default
        names = [a.name for a in op._schema.arguments]
        torch.library.register_kernel("sparsevit::bsr_linear", "cuda", _make_cuda_impl(names))
    except Exception as exc:  # noqa: BLE001 - the CPU/reference paths must keep working
        REGISTRATION_ERROR = f"{type(exc).__name__}: {exc}"


_register()
