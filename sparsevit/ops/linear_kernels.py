"""The registry of implementations of the sparse Linear ops (``sparsevit::bsr_linear``,
``sparsevit::nm_linear``, ``sparsevit::fine_linear``), in the style of xformers' attention dispatch.

Each implementation is one small class that declares what it can run (format kind, devices,
dtypes, tile sides) and says why it cannot run a given input (:meth:`LinearKernel.not_supported_reasons`).
Two things walk this registry in priority order and nothing else decides:

* the ops themselves, for ``kernel="auto"`` (the first implementation with no reasons, else the
  PyTorch reference) and for a named kernel (which raises :class:`~sparsevit.errors.KernelError`
  with the reasons when it cannot run);
* the runtime's per-layer chooser (:mod:`sparsevit.runtime.linear`), whose report shows the reasons
  collected here for every implementation it did not use.

Adding an implementation is adding one class with :func:`register` (and, for a new compiled op,
its ``run``); nothing else needs to know about it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F

from sparsevit import _ext
from sparsevit.errors import KernelError
from sparsevit.formats import bsr_to_dense, pack_values, packed_block_rows, parse_format

__all__ = ["ACT_CODE", "KernelInput", "LinearKernel", "register", "registry", "get_kernel", "walk", "resolve",
           "apply_activation", "ACTIVATIONS", "check_linear_inputs", "standard_ops_wanted"]

ACTIVATIONS = (None, "gelu", "gelu_tanh")
ACT_CODE = {"none": 0, "gelu": 1, "gelu_tanh": 2}  # the compiled kernels' `act` argument
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def standard_ops_wanted() -> bool:
    """True while the forward is traced (``torch.compile``/``torch.export``) or runs under a
    ``TorchDispatchMode`` (``FlopCounterMode``, fake tensors): dense layers and CPU attention then
    call the standard torch op with the same math, so exporters, Inductor and counters see it."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


def eager_cpu_call_ok(x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """True when a layer may call its C++ CPU kernel directly instead of through its custom op: a
    plain CPU tensor of the weight's dtype, in eager inference. The custom op's Python dispatch,
    argument checks and kernel lookup cost ~20 us a call, 1-2 ms of a batch-1 ViT forward. Anything
    traced (torch.compile/export, a TorchScript trace such as ``torch.onnx.export(dynamo=False)``),
    autocast, grad-tracking or under a dispatch mode takes the op, which checks everything."""
    if type(x) is not torch.Tensor or x.dtype != values.dtype or x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu") or torch.jit.is_tracing():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return not standard_ops_wanted()


def token_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """``x`` [..., in_features] as the 2-D [tokens, in_features] the kernels take (a view where the
    last dim is already contiguous; row strides are the kernels' business)."""
    x2d = x.reshape(-1, in_features)
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def check_linear_inputs(x: torch.Tensor, w, bias: Optional[torch.Tensor], activation: Optional[str],
                        weight_cls: type, how_to_build: str) -> str:
    """The public sparse-linear wrappers' argument checks (one place for every weight format).

    ``w`` must be a ``weight_cls`` (``how_to_build`` tells the user how to make one); shapes, devices
    and dtypes must agree, except that under ``torch.autocast`` the op itself casts. Returns the
    activation name the ops take (``"none"`` for None).
    """
    if not isinstance(w, weight_cls):
        raise TypeError(f"w must be a sparsevit {weight_cls.__name__}, got {type(w).__name__}; "
                        f"build one with {how_to_build}")
    if activation not in ACTIVATIONS and activation != "none":
        raise ValueError(f"activation must be one of None, 'gelu', 'gelu_tanh'; got {activation!r}")
    if x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features (shape {tuple(x.shape)}) but the "
                         f"weight expects in_features={w.shape[1]} (weight shape {tuple(w.shape)})")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weight is on {w.device}; move one of them, "
                         f"e.g. w = w.to(device=x.device)")
    autocasting = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cpu", "cuda") else False
    if x.dtype != w.dtype and not autocasting:
        raise TypeError(f"x is {x.dtype} but the weight is {w.dtype}; cast one of them, e.g. "
                        f"w = w.to(dtype=x.dtype) (re-packs) or x.to({w.dtype})")
    if bias is not None:
        if bias.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != x.device or (bias.dtype != x.dtype and not autocasting):
            raise TypeError(f"bias is {bias.dtype} on {bias.device}, x is {x.dtype} on {x.device}; "
                            f"use bias.to(x)")
    return "none" if activation is None else activation


def run_mlp_wrapper(name: str, x: torch.Tensor, w1, b1: Optional[torch.Tensor], activation: Optional[str], w2,
                    b2: Optional[torch.Tensor], weight_cls: type, how_to_build: str, op_args, cpu_call, op_call):
    """The public fused-MLP wrappers (``fine_mlp``, ``bsr_mlp``): both layers' checks, then the C++
    call in eager CPU inference (``cpu_call``) or the registered op (``op_call``: traced, autograd),
    both taking ``op_args(x2d, w1, b1, act, w2, b2)``; returns ``[..., out]``."""
    act = check_linear_inputs(x, w1, b1, activation, weight_cls, how_to_build)
    if not isinstance(w2, weight_cls) or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"{name}: w2 must be a {weight_cls.__name__} taking fc1's {w1.shape[0]} outputs, got {w2!r}")
    check_linear_inputs(x.new_empty(0, w2.shape[1]), w2, b2, None, weight_cls, how_to_build)
    x2d = token_rows(x, w1.shape[1])
    args = op_args(x2d, w1, b1, act, w2, b2)
    direct = eager_cpu_call_ok(x2d, w1.values, b1) and eager_cpu_call_ok(x2d, w2.values, b2)
    y = cpu_call(*args) if direct else op_call(*args)
    return y.reshape(*x.shape[:-1], w2.shape[0])


def apply_activation(y: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """``nn.GELU()`` for ``"gelu"``, ``nn.GELU(approximate="tanh")`` for ``"gelu_tanh"``, identity
    for ``None`` / ``"none"``. The one activation table of the package."""
    if activation in (None, "none"):
        return y
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    raise ValueError(f"activation must be one of None, 'gelu', 'gelu_tanh'; got {activation!r}")


@dataclass(frozen=True)
class KernelInput:
    """What decides whether an implementation can run one Linear (hashable, holds no tensors).

    device: device type (``"cpu"``, ``"cuda"``, ``"meta"``); fmt: a format string
    (:mod:`sparsevit.formats`); activation: ``None`` / ``"gelu"`` / ``"gelu_tanh"``.
    """

    device: str
    dtype: torch.dtype
    fmt: str
    activation: Optional[str] = None
    device_index: Optional[int] = None


class LinearKernel:
    """One implementation of the sparse Linear ops. Subclasses set the class attributes and may add
    :meth:`extra_reasons` (build / hardware checks) and a :meth:`label` for the report."""

    name: str = ""                    # registry key, the ops' ``kernel`` argument
    backend: str = ""                 # the ``accelerate(backend=...)`` value that forces it
    kinds: Tuple[str, ...] = ("bsr",)  # format kinds it runs: dense | bsr | nm | fine
    devices: Tuple[str, ...] = ()
    dtypes: Tuple[torch.dtype, ...] = ()
    block_sides: Optional[Tuple[int, ...]] = None  # allowed tile sides (None: any)
    auto: bool = True                 # may be picked without being asked for
    priority: int = 0                 # higher first
    # relative speed per kept FLOP by tile shape, for the cost model (1.0 = its best case)
    efficiency: Dict[Tuple[int, int], float] = {}

    @classmethod
    def not_supported_reasons(cls, inp: KernelInput) -> List[str]:
        """Why this implementation cannot run ``inp`` (empty: it can)."""
        kind, params = parse_format(inp.fmt)
        if kind not in cls.kinds:
            return [f"runs {'/'.join(cls.kinds)} weights, not {inp.fmt}"]
        if inp.device not in cls.devices:  # the one reason that matters; the rest would be noise
            return [f"runs on {'/'.join(cls.devices)}, the layer is on {inp.device}"]
        reasons = []
        if inp.dtype not in cls.dtypes:
            reasons.append(f"dtype {inp.dtype} (takes {', '.join(str(d).replace('torch.', '') for d in cls.dtypes)})")
        if kind == "bsr" and cls.block_sides and not (params[0] in cls.block_sides and params[1] in cls.block_sides):
            reasons.append(f"block {params[0]}x{params[1]} (sides must be in {cls.block_sides})")
        if inp.activation not in ACTIVATIONS:
            reasons.append(f"activation {inp.activation!r} (takes None, 'gelu', 'gelu_tanh')")
        if not reasons:
            reasons += cls.extra_reasons(inp)
        return reasons

    @classmethod
    def extra_reasons(cls, inp: KernelInput) -> List[str]:
        return []

    @classmethod
    def label(cls) -> str:
        """The kernel name the report shows."""
        return cls.name

    # Implementations of a BSR kernel define run_bsr, of an N:M kernel run_nm; the arguments are the
    # ops' own (x is 2-D [tokens, in_features], act is "none" / "gelu" / "gelu_tanh").
    # run_bsr(x, values, col_indices, crow_indices, packed, out_features, in_features, bh, bw, bias, act)
    # run_nm(x, values, indices, out_features, in_features, n, m, bias, act)
    # Fine-grained kernels define run_fine(x, w: FineSparseWeight, bias, activation) (x of any rank).


_REGISTRY: List[Type[LinearKernel]] = []


def register(cls: Type[LinearKernel]) -> Type[LinearKernel]:
    """Class decorator: adds an implementation to the registry (kept in priority order)."""
    if any(k.name == cls.name for k in _REGISTRY):
        raise ValueError(f"a linear kernel named {cls.name!r} is registered already")
    _REGISTRY.append(cls)
    _REGISTRY.sort(key=lambda k: -k.priority)
    resolve.cache_clear()
    return cls


def registry() -> Tuple[Type[LinearKernel], ...]:
    """Every implementation, highest priority first."""
    return tuple(_REGISTRY)


def get_kernel(name: str) -> Type[LinearKernel]:
    for k in _REGISTRY:
        if k.name == name:
            return k
    raise KernelError(f"unknown linear kernel {name!r}; registered: {', '.join(k.name for k in _REGISTRY)}")


def walk(inputs: Sequence[KernelInput], kernels: Optional[Sequence[Type[LinearKernel]]] = None
         ) -> Tuple[List[Tuple[Type[LinearKernel], KernelInput]], List[Tuple[str, str, List[str]]]]:
    """Every (implementation, input) pair that can run, in priority order, and
    ``(implementation name, format, reasons)`` for every pair that cannot."""
    runnable, rejected = [], []
    for k in (kernels if kernels is not None else _REGISTRY):
        for inp in inputs:
            if parse_format(inp.fmt)[0] not in k.kinds:
                continue
            reasons = k.not_supported_reasons(inp)
            if reasons:
                rejected.append((k.name, inp.fmt, reasons))
            else:
                runnable.append((k, inp))
    return runnable, rejected


@functools.lru_cache(maxsize=256)
def resolve(inp: KernelInput, requested: str = "auto") -> Type[LinearKernel]:
    """The implementation an op runs for ``inp``: ``requested`` itself (or :class:`KernelError`
    naming why it cannot), or for ``"auto"`` the first automatic one that can, else the reference."""
    if requested != "auto":
        k = get_kernel(requested)
        reasons = k.not_supported_reasons(inp)
        if reasons:
            raise KernelError(f"linear kernel {requested!r} cannot run {inp.fmt} {inp.dtype} on {inp.device}: "
                              f"{'; '.join(reasons)}. Use kernel 'auto' or 'reference'.")
        return k
    for k in _REGISTRY:
        if k.auto and k.kinds != ("dense",) and not k.not_supported_reasons(inp):
            return k
    return get_kernel("reference")


# ------------------------------------------------------------------------------------ the kernels
@register
class DenseTorch(LinearKernel):
    """``F.linear`` on the masked weight (MKL/oneDNN on CPU, cuBLAS on CUDA)."""

    name, backend, kinds = "dense", "dense", ("dense",)
    devices, dtypes, priority = ("cpu", "cuda"), _FLOATS, 10

    @classmethod
    def label(cls) -> str:
        return "torch.linear"


@register
class CppBSR(LinearKernel):
    """csrc/cpu/bsr_linear.cpp: register-tiled AVX-512/AVX2 kernel over pre-packed blocks."""

    name, backend = "cpp_bsr", "cpp"
    devices, dtypes, priority = ("cpu",), (torch.float32, torch.bfloat16), 50
    # measured on Zen 4/5 AVX-512 at 2 threads: 16x16 pays more per-block overhead, 1x8 is load-bound
    efficiency = {(32, 32): 1.0, (64, 64): 0.95, (32, 64): 1.0, (16, 16): 0.8, (1, 8): 0.25}

    @classmethod
    def extra_reasons(cls, inp):
        if not _ext.has_op("bsr_linear"):
            return [_ext.unavailable_reason("bsr_linear")]
        if not torch.ops.sparsevit_C.bsr_linear_isa(-1):
            return ["CPU lacks AVX2+FMA"]
        return []

    @classmethod
    def label(cls) -> str:
        return (torch.ops.sparsevit_C.bsr_linear_isa(-1) if _ext.has_op("bsr_linear") else "") or cls.name

    @staticmethod
    def run_bsr(x, values, col_indices, crow_indices, packed, out_features, in_features, bh, bw, bias, act):
        if packed.dtype != x.dtype or packed.dim() != 4 or packed.shape[2] != packed_block_rows(bh) \
                or packed.shape[3] != (2 if x.dtype == torch.bfloat16 else 1):
            # values cast by autocast (or a hand-made call): the packed layout depends on the dtype
            packed = pack_values(values.to(x.dtype))
        return torch.ops.sparsevit_C.bsr_linear(x, packed, col_indices, crow_indices, bias, out_features,
                                                in_features, bh, bw, ACT_CODE[act], -1)


@register
class CudaBSR(LinearKernel):
    """csrc/cuda/bsr_linear.cu: WMMA tensor-core kernel."""

    name, backend = "cuda_bsr", "cuda"
    devices, dtypes, priority = ("cuda",), (torch.float16, torch.bfloat16), 90
    block_sides = (16, 32, 64)

    @classmethod
    def extra_reasons(cls, inp):
        from sparsevit.ops.bsr_gpu import cuda_cpp_reasons

        return cuda_cpp_reasons(inp.device_index)

    @staticmethod
    def run_bsr(x, values, col_indices, crow_indices, packed, out_features, in_features, bh, bw, bias, act):
        from sparsevit.ops.bsr_gpu import run_cuda_cpp

        return run_cuda_cpp(x, values, col_indices, crow_indices, out_features, bias, act)


@register
class TritonBSR(LinearKernel):
    """kernels/bsr_linear.py: Triton block-sparse GEMM with the fused epilogue."""

    name, backend = "triton_bsr", "triton"
    devices, dtypes, priority = ("cuda",), (torch.float16, torch.bfloat16, torch.float32), 80
    block_sides = (16, 32, 64)

    @classmethod
    def extra_reasons(cls, inp):
        from sparsevit.ops.bsr_gpu import triton_reasons

        return triton_reasons()

    @staticmethod
    def run_bsr(x, values, col_indices, crow_indices, packed, out_features, in_features, bh, bw, bias, act):
        import sparsevit.ops.bsr_gpu  # noqa: F401  (defines sparsevit::bsr_linear_triton)

        return torch.ops.sparsevit.bsr_linear_triton(x, values, col_indices, crow_indices, out_features, bias, act)


@register
class SemiStructured24(LinearKernel):
    """torch's 2:4 semi-structured sparse GEMM (cuSPARSELt / CUTLASS), sm_80+."""

    name, backend, kinds = "semi_structured_2_4", "semi_structured", ("nm",)
    devices, dtypes, priority = ("cuda",), (torch.float16, torch.bfloat16), 85

    @classmethod
    def extra_reasons(cls, inp):
        reasons = [] if inp.fmt == "2:4" else [f"format {inp.fmt}: torch's semi-structured kernels take 2:4 only"]
        if torch.cuda.is_available() and torch.cuda.get_device_capability(inp.device_index or 0)[0] < 8:
            reasons.append("GPU older than sm_80")
        return reasons

    @classmethod
    def label(cls) -> str:
        return "torch.sparse.semi_structured"

    @staticmethod
    def run_nm(x, values, indices, out_features, in_features, n, m, bias, act):
        from sparsevit.ops.nm import semi_structured_weight

        w = semi_structured_weight(values, indices, (out_features, in_features), n, m)
        return apply_activation(F.linear(x, w, bias), act)


@register
class CppFine(LinearKernel):
    """csrc/cpu/sparse_fine*.cpp through ``sparsevit::fine_linear``: unstructured and 1x4 / 1x8
    tiles, tokens in the vector lanes, bias and GELU fused (:mod:`sparsevit.ops.fine_linear`)."""

    name, backend, kinds = "cpp_fine", "cpp", ("fine",)
    devices, dtypes, priority = ("cpu",), (torch.float32, torch.bfloat16), 50
    # per kept weight, relative to the BSR kernel's best case: it gathers activations per weight
    efficiency = {(1, 1): 0.35, (1, 4): 0.5, (1, 8): 0.6}

    @classmethod
    def extra_reasons(cls, inp):
        if not _ext.has_op("fine_linear"):
            return [_ext.unavailable_reason("fine_linear")]
        if not torch.ops.sparsevit_C.fine_linear_isa(-1):
            return ["CPU lacks AVX2+FMA"]
        return []

    @classmethod
    def label(cls) -> str:
        from sparsevit.ops.fine_linear import cpp_kernel_name

        return cpp_kernel_name() or cls.name

    @staticmethod
    def run_fine(x, w, bias, activation):
        from sparsevit.ops.fine_linear import fine_linear

        return fine_linear(x, w, bias, activation)


@register
class Reference(LinearKernel):
    """Dense reconstruction of the weight + ``F.linear``: what every fast kernel is tested against.
    Never faster than dense, so only used when asked for or when nothing else can run."""

    name, backend, kinds = "reference", "reference", ("bsr", "nm", "fine")
    devices, dtypes, priority, auto = ("cpu", "cuda", "meta"), _FLOATS, 0, False

    @classmethod
    def label(cls) -> str:
        return "reference_bsr"

    @staticmethod
    def run_bsr(x, values, col_indices, crow_indices, packed, out_features, in_features, bh, bw, bias, act):
        w = bsr_to_dense(values, col_indices, crow_indices, (out_features, in_features))
        return apply_activation(F.linear(x, w, bias), act)

    @staticmethod
    def run_nm(x, values, indices, out_features, in_features, n, m, bias, act):
        from sparsevit.formats import NMSparseWeight

        w = NMSparseWeight(values, indices, (out_features, in_features), n, m).to_dense()
        return apply_activation(F.linear(x, w, bias), act)

    @staticmethod
    def run_fine(x, w, bias, activation):
        return apply_activation(F.linear(x, w.to_dense().to(x.dtype), bias), activation)
