"""The Linear layers of an accelerated model and the one per-layer choice between them.

* :class:`SparseLinear` -- a :class:`~sparsevit.formats.BlockSparseWeight` (or an
  :class:`~sparsevit.formats.NMSparseWeight`, or a :class:`~sparsevit.formats.FineSparseWeight`)
  + bias + fused activation, run by the custom op ``sparsevit::bsr_linear``
  (``sparsevit::nm_linear``, ``sparsevit::fine_linear``); plain eager CPU calls go straight to the
  C++ kernel the op would pick (:func:`~sparsevit.ops.linear_kernels.eager_cpu_call_ok`), traced
  graphs always show the op. Which implementation runs is the op's business (:mod:`sparsevit.ops.linear_kernels`), so the module works on any device and dtype it is
  moved to; its indices and values are buffers (``state_dict`` round-trips, ``.to(...)`` just works).
* :class:`~sparsevit.runtime.dense_linear.DenseLinear` -- an ``nn.Linear`` holding ``W * mask``
  with the same fused activation, run by the dense implementation measured fastest for it.
* :func:`choose_linear` -- fed a plain :class:`LayerSpec`, walks the kernel registry over the
  candidate formats (the plan's tile shape first), ranks what can run by a cost model, times the
  best few (:func:`median_ms`, cached), and says why in a :class:`LayerDecision` (including why
  every implementation it did not use could not run). ``SPARSEVIT_CHOOSE=model`` skips the timing
  (deterministic; what the tests use). Sparse is chosen only when at most 3% slower than the
  fastest dense option: ``F.linear`` (MKL/oneDNN), oneDNN on a prepacked weight, sparsevit's BSR
  kernel on the full weight (:mod:`sparsevit.ops.dense_cpu`), all timed.
* :func:`best_dense` -- the same measurement for a layer that stays dense.
* :class:`LinearFactory` -- what ``build_block`` calls for every Linear of a block.

Activations are ``None``, ``"gelu"`` or ``"gelu_tanh"`` everywhere.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from sparsevit.errors import KernelError
from sparsevit.formats import (FINE_TILES, BlockSparseWeight, FineSparseWeight, NMSparseWeight, format_string,
                               pack_values, parse_format, tiles)
from sparsevit.formats.fine import chunk_columns, unit_width
from sparsevit.ops.bsr import bsr_linear
from sparsevit.ops.linear_kernels import (ACT_CODE, CppBSR, KernelInput, eager_cpu_call_ok, get_kernel, registry,
                                          resolve, walk)
from sparsevit.ops.fine_linear import cpp_fine_linear
from sparsevit.ops.fine_linear import cpp_kernel_takes_dtype as cpp_fine_takes_dtype
from sparsevit.ops.nm import nm_linear
from sparsevit.runtime.dense_linear import DenseLinear, _check_activation
from sparsevit.runtime.report import LayerDecision, Report

__all__ = ["SparseLinear", "DenseLinear", "LayerSpec", "choose_linear", "best_dense", "LinearFactory",
           "BLOCK_CANDIDATES",
           "BACKENDS", "block_density", "median_ms", "interleaved_ms", "kernel_choice_ms"]

# Tile shapes the chooser tries after the plan's own (kernels filter by the sides they take).
BLOCK_CANDIDATES: Tuple[Tuple[int, int], ...] = ((32, 32), (64, 64), (16, 16), (32, 64), (64, 32), (1, 8))
BACKENDS = ("auto", "dense", "sparse", "cpp", "triton", "cuda", "semi_structured", "reference")
# Modelled throughput (GFLOP/s at 2 CPU threads) of dense torch and of a sparse kernel on kept blocks.
_MODEL_GFLOPS = {torch.float32: (140.0, 200.0), torch.bfloat16: (800.0, 450.0)}
_SLOWER_TOLERANCE = 1.03  # sparse may be chosen when at most 3% slower (it also saves memory)
_MAX_PACK_DENSITY = 0.95  # the go-dense rule: above this fraction of kept tiles nothing is skipped
_MAX_FINE_DENSITY = 0.5  # fine-grained formats are tried at or below this fraction of kept weights
_TIMED_CANDIDATES = {"cpu": 2, "cuda": 6}  # sparse candidates timed per layer (ranked by the model)
_TIMING_CACHE: Dict[tuple, float] = {}


class SparseLinear(nn.Module):
    """``act(x @ W^T + b)`` with ``W`` block-sparse (or N:M, or fine-grained).

    Buffers (all in ``state_dict``): ``values``, ``col_indices`` + ``crow_indices`` (BSR),
    ``indices`` (N:M) or ``col_indices`` + ``row_ptr`` (fine), ``bias``, ``shape``, ``block`` (BSR),
    ``nm`` (N:M) or ``fine_tile`` (fine). Not saved: the CPU kernels' derived layouts (BSR
    ``packed``, fine ``seg_ptr``), rebuilt on load and on every device/dtype change (a fine weight
    in bf16 stores column pairs, so a dtype change re-packs it).

    ``kernel``: ``"auto"`` (the op picks per device) or an implementation name from
    :mod:`sparsevit.ops.linear_kernels`; a named kernel that cannot run after a move to another
    device/dtype is reset to ``"auto"`` (it was the choice for the device the layer was built on).
    """

    def __init__(self, weight: Union[BlockSparseWeight, NMSparseWeight, FineSparseWeight],
                 bias: Optional[Tensor] = None,
                 activation: Optional[str] = None, kernel: str = "auto"):
        super().__init__()
        _check_activation(activation)
        if kernel != "auto":
            get_kernel(kernel)  # unknown names fail here, not at the first forward
        self.register_buffer("values", weight.values)
        if isinstance(weight, BlockSparseWeight):
            self.register_buffer("col_indices", weight.col_indices)
            self.register_buffer("crow_indices", weight.crow_indices)
            self.register_buffer("block", torch.tensor(weight.block, dtype=torch.int64))
            self.register_buffer("packed", weight.packed, persistent=False)
        elif isinstance(weight, NMSparseWeight):
            self.register_buffer("indices", weight.indices)
            self.register_buffer("nm", torch.tensor([weight.n, weight.m], dtype=torch.int64))
        elif isinstance(weight, FineSparseWeight):
            self._set_fine(weight)
            self.register_buffer("fine_tile", torch.tensor([weight.tile], dtype=torch.int64))
        else:
            raise TypeError(f"weight must be a BlockSparseWeight, NMSparseWeight or FineSparseWeight, "
                            f"got {type(weight).__name__}")
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("shape", torch.tensor(weight.shape, dtype=torch.int64))
        self._meta = (tuple(weight.shape), _format_params(weight))
        self.activation = activation
        self.kernel = kernel

    @property
    def activation(self) -> Optional[str]:
        return self._activation

    @activation.setter
    def activation(self, name: Optional[str]) -> None:
        _check_activation(name)
        self._activation = name
        self._cpp_direct = None  # the direct call carries the activation's code

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, name: str) -> None:
        self._kernel = name
        self._cpp_direct = None  # forward decides again whether to call the C++ kernel directly

    def _set_fine(self, weight: FineSparseWeight) -> None:
        """(Re)sets the fine-grained buffers from a validated weight."""
        self.register_buffer("values", weight.values)
        self.register_buffer("col_indices", weight.col_indices)
        self.register_buffer("row_ptr", weight.row_ptr)
        self.register_buffer("seg_ptr", weight.seg_ptr, persistent=False)

    @property
    def is_nm(self) -> bool:
        return "nm" in self._buffers

    @property
    def is_fine(self) -> bool:
        return "fine_tile" in self._buffers

    @property
    def kind(self) -> str:
        """``"bsr"``, ``"nm"`` or ``"fine"`` (see :mod:`sparsevit.formats`)."""
        return "nm" if self.is_nm else "fine" if self.is_fine else "bsr"

    @property
    def fmt(self) -> str:
        """The weight's format string (``"bsr:32x32"``, ``"2:4"``, ``"fine:1x1"``; see :mod:`sparsevit.formats`)."""
        return format_string(self.kind, self._meta[1])

    @property
    def out_features(self) -> int:
        return self._meta[0][0]

    @property
    def in_features(self) -> int:
        return self._meta[0][1]

    @property
    def weight(self) -> Union[BlockSparseWeight, NMSparseWeight, FineSparseWeight]:
        """The sparse weight (a view on the buffers; no copy, no re-packing, no re-checking)."""
        if self.is_nm:
            return NMSparseWeight(self.values, self.indices, self._meta[0], *self._meta[1])
        if self.is_fine:
            return _fine_view(self.values, self.col_indices, self.row_ptr, self.seg_ptr, self._meta[0],
                              self._meta[1][1])
        return BlockSparseWeight(self.values, self.col_indices, self.crow_indices, self._meta[0],
                                 self._meta[1], self.packed, checked=False)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[Tensor] = None, block=(32, 32),
                   activation: Optional[str] = None, kernel: str = "auto",
                   fmt: Optional[str] = None) -> "SparseLinear":
        """Packs ``linear.weight * mask``: in ``block`` tiles (every tile with a True mask entry, or a
        nonzero without a mask, is kept), or in ``fmt`` (a format string, e.g. ``"2:4"``,
        ``"fine:1x1"``) if given."""
        w = linear.weight.detach()
        kind, params = parse_format(fmt) if fmt is not None else ("bsr", tuple(block))
        if kind == "nm":
            dense = w if mask is None else w * mask.to(device=w.device, dtype=w.dtype)
            sparse = NMSparseWeight.from_dense(dense, *params)
        elif kind == "bsr":
            sparse = BlockSparseWeight.from_dense(w, block=params, mask=mask)
        elif kind == "fine":
            sparse = FineSparseWeight.from_dense(w, mask=mask, tile=params[1])
        else:
            raise ValueError(f"SparseLinear stores a sparse format, not {fmt!r}; use DenseLinear.from_dense")
        return cls(sparse, None if linear.bias is None else linear.bias.detach(), activation, kernel)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight (zeros where weights were dropped) and bias; the
        activation is not part of it."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: Tensor) -> Tensor:
        direct = self.direct_args()
        if direct:
            bufs = self._buffers
            if x.shape[-1] == direct[1] and eager_cpu_call_ok(x, bufs["values"], bufs["bias"]):
                y = self.run_direct(x.reshape(-1, direct[1]), direct)
                return y if x.dim() == 2 else y.view(x.shape[:-1] + (direct[0],))
        if self.is_nm:
            return nm_linear(x, self.weight, self.bias, self.activation, self.kernel)
        if self.is_fine:
            runner = get_kernel("reference" if self.kernel == "reference" else "cpp_fine")
            return runner.run_fine(x, self.weight, self.bias, self.activation)
        return bsr_linear(x, self.weight, self.bias, self.activation, self.kernel)

    def direct_args(self) -> tuple:
        """:meth:`_direct_args`, decided once per kernel / device / dtype / shape / activation (each
        change resets it): what the op would pick anyway."""
        direct = self._cpp_direct
        if direct is None:
            direct = self._cpp_direct = self._direct_args()
        return direct

    def run_direct(self, x2d: Tensor, direct: tuple) -> Tensor:
        """``sparsevit_C::bsr_linear`` on ``x2d`` ``[tokens, in]`` with the tensors read straight from the
        buffer dict (nn.Module.__getattr__ and the generic wrapper cost ~14 us a call, 0.7 ms of a
        batch-1 DeiT-S forward); ``direct`` from :meth:`direct_args`. The op checks every argument."""
        b = self._buffers
        return torch.ops.sparsevit_C.bsr_linear(x2d, b["packed"], b["col_indices"], b["crow_indices"], b["bias"],
                                                *direct)

    def lean_call(self, dtype: torch.dtype) -> Optional[Callable[[Tensor], Tensor]]:
        """``f(x2d)``: the compiled call :meth:`forward` makes on a contiguous ``[tokens, in]`` input of
        ``dtype`` in eager CPU inference (the caller checks that, and hooks), minus its per-call checks;
        None where forward would take another route. For the lean block path (runtime/modules.py)."""
        if self._buffers["values"].dtype != dtype:
            return None
        direct = self.direct_args()
        if direct:
            return lambda x2d: self.run_direct(x2d, direct)
        if self.is_fine and self.kernel != "reference" and cpp_fine_takes_dtype(dtype, self._buffers["values"]):
            return self._run_fine_direct
        return None

    def _run_fine_direct(self, x2d: Tensor) -> Tensor:
        """What ``fine_linear`` calls in eager CPU inference where the compiled kernel takes the input."""
        b, (out_f, in_f) = self._buffers, self._meta[0]
        return cpp_fine_linear(x2d, b["values"], b["col_indices"], b["seg_ptr"], b["bias"], out_f, in_f,
                               self._activation or "none")

    def _direct_args(self) -> tuple:
        """The int arguments of ``sparsevit_C::bsr_linear`` after its tensors (out, in, bh, bw, act,
        isa) when the op would run the C++ BSR kernel here anyway; ``()`` (decided: no direct call)
        otherwise, so that forward does not ask again (``None`` means undecided)."""
        if self.kind != "bsr" or resolve(self._kernel_input(), self.kernel) is not CppBSR:
            return ()
        (out_f, in_f), (bh, bw) = self._meta
        return (out_f, in_f, bh, bw, ACT_CODE["none" if self.activation is None else self.activation], -1)

    def _apply(self, fn, recurse=True):
        before = self.weight if self.is_fine else None
        super()._apply(fn, recurse)
        if self.is_fine:
            self._repack_fine(before)
        elif not self.is_nm:
            # the packed layout depends on the dtype (bf16 interleaves k pairs): rebuild, never cast
            p, want_pairs = self.packed, 2 if self.values.dtype == torch.bfloat16 else 1
            if p is None or p.dtype != self.values.dtype or p.shape[-1] != want_pairs or p.device != self.values.device:
                self.packed = pack_values(self.values)
        self._keep_kernel_if_runnable()
        return self

    def _repack_fine(self, before: FineSparseWeight) -> None:
        """A dtype change may change the stored unit (bf16 pairs) and the segment width: re-pack
        from the weight as it was (exact: the values are the same numbers)."""
        v = self.values
        if v.device.type == "meta":
            return  # shapes only; nothing to index
        if v.shape[1] != unit_width(self._meta[1][1], v.dtype) or chunk_columns(v.dtype) != chunk_columns(before.dtype):
            self._set_fine(before.to(device=v.device, dtype=v.dtype))

    def __setstate__(self, state):
        # unpickled elsewhere (another machine, a build without the kernel it was built with)
        if "kernel" in state:  # pickled before ``kernel`` became a property
            state["_kernel"] = state.pop("kernel")
        if "activation" in state:  # pickled before ``activation`` became a property
            state["_activation"] = state.pop("activation")
        super().__setstate__(state)
        self._keep_kernel_if_runnable()

    def _keep_kernel_if_runnable(self):
        """The kernel picked at build time was the choice for that device and dtype: where it cannot
        run (or is not registered here), the op chooses again."""
        if self.kernel != "auto":
            try:
                cannot = get_kernel(self.kernel).not_supported_reasons(self._kernel_input())
            except KernelError:
                cannot = True
            if cannot:
                self.kernel = "auto"
        self._cpp_direct = None

    def _kernel_input(self) -> KernelInput:
        dev = self.values.device
        return KernelInput(dev.type, self.values.dtype, self.fmt, self.activation, dev.index)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self._check_incoming(state_dict, prefix)
        # The number of kept blocks differs between checkpoints: take the incoming sizes.
        for name in ("values", "col_indices", "crow_indices", "indices", "row_ptr", "bias"):
            key = prefix + name
            if key in state_dict and self._buffers.get(name) is not None:
                buf = self._buffers[name]
                self._buffers[name] = torch.empty(state_dict[key].shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        fmt = self.nm if self.is_nm else (1, self.fine_tile) if self.is_fine else self.block
        self._meta = (tuple(int(v) for v in self.shape.tolist()), tuple(int(v) for v in fmt))
        if self.is_fine:
            self._set_fine(FineSparseWeight(self.values, self.col_indices, self.row_ptr, self._meta[0],
                                            self._meta[1][1]))
        elif not self.is_nm:
            self.packed = pack_values(self.values)
        self._cpp_direct = None  # the direct call carries the shape

    def _check_incoming(self, state_dict, prefix):
        """Refuses a corrupt sparse weight before anything is copied (a kernel must never read it)."""
        get = lambda name: state_dict.get(prefix + name, self._buffers.get(name))  # noqa: E731
        try:
            shape = tuple(int(v) for v in get("shape").tolist())
            if self.is_nm:
                NMSparseWeight(get("values"), get("indices"), shape, *(int(v) for v in get("nm").tolist()))
            elif self.is_fine:
                FineSparseWeight(get("values").to(self.values.dtype), get("col_indices"), get("row_ptr"), shape,
                                 int(get("fine_tile").reshape(-1)[0]))
            else:
                BlockSparseWeight(get("values"), get("col_indices"), get("crow_indices"), shape,
                                  tuple(int(v) for v in get("block").tolist()), packed=get("values"))
        except (ValueError, TypeError, RuntimeError, KernelError, IndexError) as exc:
            raise ValueError(f"{prefix.rstrip('.') or 'SparseLinear'}: the state_dict holds a corrupt sparse "
                             f"weight ({exc}); it cannot be loaded. Re-save it from a model built by "
                             f"sparsevit.accelerate.") from None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, "
                f"density={self.weight.density:.3f}, bias={self.bias is not None}, "
                f"activation={self.activation}, kernel={self.kernel}")


def _format_params(weight) -> Tuple[int, int]:
    if isinstance(weight, BlockSparseWeight):
        return tuple(weight.block)
    if isinstance(weight, FineSparseWeight):
        return (1, weight.tile)
    return (weight.n, weight.m)


def _fine_view(values, col_indices, row_ptr, seg_ptr, shape, tile) -> FineSparseWeight:
    """A :class:`FineSparseWeight` on buffers that were validated when they were set (no re-check,
    no host sync: this runs on every forward, also on the meta device)."""
    w = FineSparseWeight.__new__(FineSparseWeight)
    w.tile, w.unit, w.shape = tile, values.shape[1], tuple(shape)
    w.values, w.col_indices, w.row_ptr, w.seg_ptr = values, col_indices, row_ptr, seg_ptr
    w.chunk_cols = chunk_columns(values.dtype)
    return w


# --------------------------------------------------------------------------------------- chooser
@dataclass
class LayerSpec:
    """Everything the chooser needs to know about one Linear, as plain values.

    weight ``[out, in]`` (unmasked) and bias, on the device and in the dtype the layer will run;
    mask: keep-mask of the weight's shape (``None``: the zeros in the weight); block_hint: the tile
    shape the plan's masks were made for (tried first); nm_hint: the plan's N:M pattern;
    tokens: rows per call to model/time at (e.g. 197 * batch).
    """

    name: str
    weight: Tensor
    bias: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    activation: Optional[str] = None
    tokens: int = 197 * 8
    block_hint: Optional[Tuple[int, int]] = None
    nm_hint: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        _check_activation(self.activation)
        if self.mask is not None and tuple(self.mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"{self.name}: mask shape {tuple(self.mask.shape)} != weight shape "
                             f"{tuple(self.weight.shape)}")
        w = self.weight.detach()
        self.keep = (w != 0) if self.mask is None else (self.mask.to(w.device) != 0)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def kernel_input(self, fmt: str) -> KernelInput:
        return KernelInput(self.device.type, self.dtype, fmt, self.activation, self.device.index)

    def as_linear(self) -> nn.Linear:
        lin = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None,
                        device=self.device, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def block_density(keep: Tensor, block: Tuple[int, int]) -> float:
    """Fraction of ``block`` tiles of the boolean ``keep`` matrix holding at least one True."""
    return float(tiles(keep, block).any(dim=3).any(dim=2).float().mean())


def _is_nm(keep: Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs keeps at most ``n`` weights."""
    if keep.shape[-1] % m:
        return False
    return bool(keep.reshape(keep.shape[0], -1, m).sum(-1).le(n).all())


def median_ms(fn, device: Union[str, torch.device] = "cpu", reps: int = 3, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls: CUDA events on CUDA (the stream's own
    time), ``perf_counter`` elsewhere. The one timer of the package (bench/ uses it too)."""
    return interleaved_ms({0: fn}, device, reps, warmup)[0]


def interleaved_ms(fns: Dict, device: Union[str, torch.device] = "cpu", reps: int = 5, warmup: int = 1,
                   statistic: Callable[[List[float]], float] = statistics.median) -> Dict:
    """{key: ``statistic`` of its ms} of several functions timed in rounds, one call of each per
    round, so a frequency change or a burst of load on a shared machine hits every candidate alike
    (timing them one after another let the first layer's first candidate look 2x slower than it is)."""
    for fn in fns.values():
        for _ in range(max(warmup, 1)):
            fn()  # also first-touch of outputs / workspaces, autotuning
    times: Dict = {key: [] for key in fns}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    for _ in range(reps):
        for key, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[key].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1e3)
    return {key: statistic(t) for key, t in times.items()}


def kernel_choice_ms(fns: Dict, device: Union[str, torch.device] = "cpu") -> Dict:
    """What the choosers compare: the best of 5 interleaved rounds. Other processes' load only ever
    adds time (with 2 threads, one stolen core stalls the whole parallel region), so the fastest
    round is the closest to what a kernel costs on a quiet machine (with medians, builds under load
    gave 10-22 of DeiT-S's 48 block-sparse layers a dense kernel that a quiet build did not)."""
    return interleaved_ms(fns, device, reps=5, statistic=min)


def fine_stored_density(keep: Tensor, tile: int, dtype: torch.dtype) -> float:
    """Fraction of the weight the fine-grained format stores (and its kernel multiplies) for a
    ``1 x tile`` mask: bf16 stores 1x1 masks as column pairs, so 70% unstructured sparsity keeps
    about half of the pairs, where the kernel loses to dense (the rule below uses this, not the
    mask's own density)."""
    return block_density(keep, (1, unit_width(tile, dtype)))


def _candidate_formats(spec: LayerSpec, go_dense_rule: bool) -> Tuple[List[Tuple[str, float]], List[str]]:
    """(format, density) to try, the plan's tile shape first, and why others were left out."""
    blocks, skipped = list(BLOCK_CANDIDATES), []
    hint = None if spec.block_hint is None else tuple(int(b) for b in spec.block_hint)
    fine_tiles = list(FINE_TILES)
    if hint is not None and hint[0] == 1 and hint[1] in FINE_TILES:
        fine_tiles = [hint[1]] + [t for t in fine_tiles if t != hint[1]]
    elif hint is not None:
        blocks = [hint] + [b for b in blocks if b != hint]
    out, too_dense = [], []
    for blk in blocks:
        fmt, d = format_string("bsr", blk), block_density(spec.keep, blk)
        if go_dense_rule and d > _MAX_PACK_DENSITY:
            too_dense.append((fmt, d))
        else:
            out.append((fmt, d))
    if too_dense:
        lo, hi = min(d for _, d in too_dense), max(d for _, d in too_dense)
        skipped.append(f"{'/'.join(f for f, _ in too_dense)}: tile density {lo:.2f}-{hi:.2f} "
                       f"(> {_MAX_PACK_DENSITY}), nothing to skip")
    fine, fine_dense = [], []
    for t in fine_tiles:
        fmt, d = format_string("fine", (1, t)), block_density(spec.keep, (1, t))
        stored = fine_stored_density(spec.keep, t, spec.dtype)
        if stored <= _MAX_FINE_DENSITY:
            fine.append((fmt, d))
        else:
            fine_dense.append((fmt, stored))
    if fine_dense:
        skipped.append(f"{'/'.join(f'{f} {d:.2f}' for f, d in fine_dense)}: stored density above "
                       f"{_MAX_FINE_DENSITY} (the fine-grained kernel pays off at 60-95% sparsity)")
    plan_first = fine_tiles[0] != FINE_TILES[0] or hint == (1, 1)  # the plan's tiles are fine-grained
    plan_first = plan_first and bool(fine) and fine[0][0] == format_string("fine", (1, fine_tiles[0]))
    out = (fine[:1] + out + fine[1:]) if plan_first else (out + fine)
    n, m = spec.nm_hint or (2, 4)
    if _is_nm(spec.keep, n, m):
        out.insert(0 if spec.nm_hint else len(out), (f"{n}:{m}", n / m))
    return out, skipped


def _model_ms(spec: LayerSpec, kernel, fmt: str, density: float) -> float:
    """Cost model: FLOPs over a per-dtype throughput, scaled by the kernel's tile efficiency."""
    dense_gflops, sparse_gflops = _MODEL_GFLOPS.get(spec.dtype, _MODEL_GFLOPS[torch.float32])
    out_f, in_f = spec.weight.shape
    flops = 2.0 * spec.tokens * out_f * in_f
    if fmt == "dense":
        return flops / dense_gflops / 1e6
    kind, params = parse_format(fmt)
    eff = kernel.efficiency.get(tuple(params), 0.7) if kind in ("bsr", "fine") else 0.7
    overhead = spec.tokens * (in_f + out_f) * 4 / 20e9 * 1e3  # activations in/out at ~20 GB/s
    return flops * density / (sparse_gflops * eff) / 1e6 + overhead


def _pool(backend: str):
    """The implementations ``backend`` allows."""
    if backend == "auto":
        return [k for k in registry() if k.auto]
    if backend == "sparse":
        return [k for k in registry() if k.auto and k.kinds != ("dense",)]
    return [k for k in registry() if k.backend == backend]


def _summarise(rejected: List[Tuple[str, str, List[str]]]) -> str:
    """One clause per implementation; formats are named only where their reasons differ."""
    by_kernel: Dict[str, Dict[str, List[str]]] = {}
    for name, fmt, reasons in rejected:
        by_kernel.setdefault(name, {}).setdefault("; ".join(reasons), []).append(fmt)
    parts = []
    for name, groups in by_kernel.items():
        if len(groups) == 1:
            parts.append(f"{name}: {next(iter(groups))}")
        else:
            parts += [f"{name} {'/'.join(fmts)}: {why}" for why, fmts in groups.items()]
    return " | ".join(parts)


def _build(spec: LayerSpec, kernel, fmt: str, lin: nn.Linear) -> nn.Module:
    if fmt == "dense":
        return DenseLinear.from_dense(lin, spec.mask, spec.activation)
    return SparseLinear.from_dense(lin, spec.mask, activation=spec.activation, kernel=kernel.name, fmt=fmt)


def _decision(spec: LayerSpec, action: str, fmt: str, kernel: str, reason: str, density: float,
              est=None) -> LayerDecision:
    shape = tuple(spec.weight.shape)
    return LayerDecision(spec.name, action, fmt, kernel, reason, shape, shape, density, dict(est or {}))


def _dense_label(kernel: str, activation: Optional[str]) -> str:
    label = "torch.linear" if kernel == "torch_linear" else kernel
    return label + (f"+{activation}" if activation else "")


def _dense(spec: LayerSpec, lin: nn.Linear, reason: str, est=None, module: Optional[DenseLinear] = None):
    """The dense module (plain ``F.linear`` unless ``module`` is the measured best) and its decision."""
    module = module if module is not None else DenseLinear.from_dense(lin, spec.mask, spec.activation)
    return module, _decision(spec, "dense", "dense", _dense_label(module.kernel, spec.activation), reason, 1.0, est)


def _dense_options(spec: LayerSpec, lin: nn.Linear) -> Tuple[List[Tuple[str, DenseLinear]], List[str]]:
    """``[(key, module)]`` for every dense implementation that can run the layer (F.linear first),
    and why the others cannot (:func:`sparsevit.ops.dense_cpu.dense_candidates`)."""
    from sparsevit.ops.dense_cpu import dense_candidates

    base = DenseLinear.from_dense(lin, spec.mask, spec.activation)
    options, not_used = [("dense torch_linear", base)], []
    if spec.device.type != "cpu":
        return options, not_used
    for cand in dense_candidates(base.weight, base.bias, spec.activation):
        if cand.name == "torch_linear":
            continue
        if cand.not_supported_reasons:
            not_used.append(f"dense {cand.name}: {'; '.join(cand.not_supported_reasons)}")
        else:
            options.append((f"dense {cand.name}", DenseLinear.from_dense(base, None, spec.activation, cand.name)))
    return options, not_used


def _time_candidates(spec: LayerSpec, lin: nn.Linear, cands, dense_options):
    """Builds and times ``cands`` [(kernel, fmt, density)] and ``dense_options`` [(key, module)]:
    {key: (ms, module)}, and why any was dropped. A candidate whose output is wrong never wins on
    speed. Times are cached per (candidate, shape, dtype, activation, tokens, threads)."""
    out_f, in_f = spec.weight.shape
    x = torch.randn(spec.tokens, in_f, device=spec.device, dtype=spec.dtype)
    ref_mod = DenseLinear.from_dense(lin, spec.mask, spec.activation)
    threads = torch.get_num_threads()
    # Dense options run on the masked weight, and sparsevit_bsr_full skips its all-zero blocks: the
    # mask's density belongs in the cache key, or a time measured on a full weight is reused for a
    # sparse one of the same shape (and the other way round).
    mask_density = 1.0 if spec.mask is None else round(float(spec.mask.float().mean()), 2)
    dropped = []
    with torch.inference_mode():
        ref = ref_mod(x).float()
        scale = max(ref.abs().max().item(), 1e-6)
        entries = [(key, None, "dense", 1.0, mod) for key, mod in dense_options] + \
                  [(f"{k.name} {fmt}", k, fmt, d, None) for k, fmt, d in cands]
        correct = {}  # key -> (cache key, module)
        for key, k, fmt, d, mod in entries:
            try:
                mod = mod if mod is not None else _build(spec, k, fmt, lin)
                err = (mod(x).float() - ref).abs().max().item() / scale
                if not err < 5e-2:
                    dropped.append(f"{key}: rejected, relative error {err:.2e} vs dense")
                    continue
                correct[key] = ((key, out_f, in_f, spec.dtype, spec.device.type, spec.activation,
                                 spec.bias is None, spec.tokens, threads, round(d, 2), mask_density), mod)
            except Exception as exc:  # noqa: BLE001 - compile errors, resource limits: say so, go on
                dropped.append(f"{key}: failed ({type(exc).__name__}: {exc})")
        untimed = {ck: (lambda m=mod: m(x)) for ck, mod in correct.values() if ck not in _TIMING_CACHE}
        if untimed:
            _TIMING_CACHE.update(kernel_choice_ms(untimed, spec.device))
        timed = {key: (_TIMING_CACHE[ck], mod) for key, (ck, mod) in correct.items()}
    return timed, dropped


def _fastest_dense(timed) -> Tuple[str, float, Optional[DenseLinear]]:
    key, (t, mod) = min(((k, v) for k, v in timed.items() if k.startswith("dense ")), key=lambda kv: kv[1][0])
    return key[len("dense "):], t, mod


def _ms_list(timed, prefix: str) -> str:
    return ", ".join(f"{k[len(prefix):]} {t:.2f}" for k, (t, _) in sorted(timed.items(), key=lambda kv: kv[1][0])
                     if k.startswith(prefix))


def best_dense(spec: LayerSpec, lin: Optional[nn.Linear] = None, why: str = "") -> Tuple[DenseLinear, LayerDecision]:
    """The fastest dense implementation of ``spec`` on its device (measured, cached; ``F.linear``
    with ``SPARSEVIT_CHOOSE=model``), and a decision whose reason starts with ``why`` and lists
    the ms of every option and why any could not run."""
    lin = lin if lin is not None else spec.as_linear()
    options, not_used = _dense_options(spec, lin)
    if os.environ.get("SPARSEVIT_CHOOSE", "measure") == "model" or len(options) == 1:
        how = "not timed (SPARSEVIT_CHOOSE=model)" if len(options) > 1 else "the only dense option here"
        return _dense(spec, lin, _with_not_used(f"{why}; F.linear: {how}", not_used), module=options[0][1])
    timed, dropped = _time_candidates(spec, lin, [], options)
    name, t, mod = _fastest_dense(timed)
    reason = f"{why}; fastest dense: {name} (ms at {spec.tokens} tokens: {_ms_list(timed, 'dense ')})"
    return _dense(spec, lin, _with_not_used(reason, not_used + dropped),
                  {k: v for k, (v, _) in timed.items()}, module=mod)


def _with_not_used(reason: str, not_used: List[str]) -> str:
    return reason + (" | not used: " + " | ".join(not_used) if not_used else "")


def choose_linear(spec: LayerSpec, backend: str = "auto", fmt: Optional[str] = None
                  ) -> Tuple[nn.Module, LayerDecision]:
    """The fastest correct module computing ``act(x @ (W*mask)^T + b)`` for ``spec``, and why.

    Args:
        spec: the layer (its weight's device and dtype decide which implementations can run).
        backend: ``"auto"`` (choose, dense included), ``"dense"``, ``"sparse"`` (best sparse
            implementation), or one implementation family: ``"cpp"``, ``"triton"``, ``"cuda"``,
            ``"semi_structured"``, ``"reference"``. A family that cannot run the layer raises
            :class:`~sparsevit.errors.KernelError` with the reasons.
        fmt: a format string (:mod:`sparsevit.formats`) to use without timing (rebuilding a saved model).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    lin = spec.as_linear()
    if fmt is not None:
        return _choose_given_format(spec, backend, fmt, lin)
    elem_density = float(spec.keep.float().mean())
    if backend == "dense":
        return _dense(spec, lin, f"dense: backend='dense' requested (element density {elem_density:.2f})")
    auto = backend == "auto"
    formats, not_used = _candidate_formats(spec, go_dense_rule=auto)
    density = dict(formats)
    sparse_pool = [k for k in _pool(backend) if k.kinds != ("dense",)]
    runnable, rejected = walk([spec.kernel_input(f) for f, _ in formats], sparse_pool)
    not_used = [_summarise(rejected)] * bool(rejected) + not_used
    if not runnable:
        if not auto:
            raise KernelError(f"{spec.name}: backend={backend!r} cannot run this layer ({spec.dtype} on "
                              f"{spec.device.type}): {' | '.join(not_used)}. Use backend='auto' or 'dense'.")
        module, dec = best_dense(spec, lin, f"dense: no sparse kernel can run it (element density {elem_density:.2f})")
        dec.reason = _with_not_used(dec.reason, not_used)
        return module, dec
    ranked = sorted((_model_ms(spec, k, inp.fmt, density[inp.fmt]), i, k, inp.fmt)
                    for i, (k, inp) in enumerate(runnable))
    hinted = spec.block_hint is not None or spec.nm_hint is not None
    plan_tile = [r for r in ranked if hinted and r[3] == formats[0][0]][:1]  # always evaluated
    top = plan_tile + [r for r in ranked if r not in plan_tile][:_TIMED_CANDIDATES.get(spec.device.type, 2)]
    measure = os.environ.get("SPARSEVIT_CHOOSE", "measure") != "model" and backend != "reference"
    if measure:
        dense_options, dense_not_used = _dense_options(spec, lin) if auto else ([], [])
        timed, dropped = _time_candidates(spec, lin, [(k, f, density[f]) for _, _, k, f in top], dense_options)
        not_used += dense_not_used + dropped
        how = "measured"
    else:
        timed = {"dense torch_linear": (_model_ms(spec, None, "dense", 1.0), None)} if auto else {}
        timed.update({f"{k.name} {f}": (t, None) for t, _, k, f in top})
        how = "modelled"
    return _pick(spec, lin, backend, top, timed, not_used, how)


def _pick(spec, lin, backend, top, timed, not_used, how):
    est = {key: t for key, (t, _) in timed.items()}
    sparse = [(timed[f"{k.name} {f}"][0], k, f) for _, _, k, f in top if f"{k.name} {f}" in timed]
    if not sparse:
        if backend != "auto":
            raise KernelError(f"{spec.name}: every {backend!r} candidate failed: {' | '.join(not_used)}")
        name, _, best = _fastest_dense(timed)
        return _dense(spec, lin, _with_not_used(f"dense ({name}): every sparse candidate failed", not_used),
                      est, best)
    t_sparse, k, fmt = min(sparse, key=lambda s: s[0])
    mod = timed[f"{k.name} {fmt}"][1] or _build(spec, k, fmt, lin)
    d = mod.weight.density
    if backend != "auto":
        return mod, _decision(spec, "packed", fmt, k.label(), _with_not_used(
            f"{fmt} density {d:.2f}: backend={backend!r} requested", not_used), d, est)
    name, t_dense, best = _fastest_dense(timed)
    ratio = (f"({t_sparse:.2f} ms vs {t_dense:.2f} ms for dense {name}, {how} at {spec.tokens} tokens; "
             f"every candidate, ms: {_ms_list(timed, '')})")
    if t_sparse <= _SLOWER_TOLERANCE * t_dense:
        return mod, _decision(spec, "packed", fmt, k.label(), _with_not_used(
            f"{fmt} density {d:.2f}: {t_dense / t_sparse:.1f}x faster than dense {ratio}", not_used), d, est)
    return _dense(spec, lin, _with_not_used(
        f"dense ({name}): density {d:.2f} at best {fmt}, sparse would be {t_sparse / t_dense:.1f}x slower {ratio}",
        not_used), est, best)


def _choose_given_format(spec: LayerSpec, backend: str, fmt: str, lin: nn.Linear):
    """``fmt`` fixed (e.g. read from a saved model): the first implementation that runs it."""
    kind, _ = parse_format(fmt)
    if backend == "dense":
        return _dense(spec, lin, f"dense: format {fmt!r} given, backend='dense'")
    if kind == "dense":
        return best_dense(spec, lin, f"dense: format {fmt!r} given")
    pool = [k for k in _pool(backend) if k.kinds != ("dense",)]
    runnable, rejected = walk([spec.kernel_input(fmt)], pool)
    if runnable:
        k = runnable[0][0]
    elif backend in ("auto", "sparse"):
        k = get_kernel("reference")
    else:
        raise KernelError(f"{spec.name}: backend={backend!r} cannot run format {fmt}: {_summarise(rejected)}")
    mod = _build(spec, k, fmt, lin)
    reason = f"format {fmt} given" + (f"; no fast kernel runs it: {_summarise(rejected)}" if not runnable else "")
    return mod, _decision(spec, "packed", fmt, k.label(), reason, mod.weight.density)


# ----------------------------------------------------------------------------- per-block factory
class LinearFactory:
    """Makes each Linear of an accelerated block: the fastest dense implementation
    (:func:`best_dense`) when nothing unstructured is left, plain ``F.linear`` for
    ``backend="dense"``, else whatever :func:`choose_linear` picks. Every decision goes into ``report``.

    Args:
        report: the model's :class:`~sparsevit.runtime.report.Report`.
        backend: see :func:`choose_linear`.
        batch_hint: batch size the choice is tuned for (token counts are per image).
        block_hint: the plan's tile shape (``plan.block``), tried first.
        nm_hint: the plan's N:M pattern (``plan.nm``).
        formats: ``{linear fqn: format string}`` forcing a layer's format without timing (used to
            rebuild a saved model); see :mod:`sparsevit.formats` for the grammar.
    """

    def __init__(self, report: Report, backend: str, batch_hint: int, block_hint: Optional[Tuple[int, int]] = None,
                 formats: Optional[Dict[str, str]] = None, nm_hint: Optional[Tuple[int, int]] = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        for name, fmt in (formats or {}).items():
            parse_format(fmt)  # a bad entry fails here, naming the grammar
        self.report, self.backend, self.batch_hint = report, backend, batch_hint
        self.block_hint = None if block_hint is None else tuple(int(b) for b in block_hint)
        self.nm_hint = None if nm_hint is None else tuple(int(v) for v in nm_hint)
        self.formats = dict(formats or {})
        # what each chosen layer was and what was decided, by name: the MLP pair choice
        # (:mod:`sparsevit.runtime.mlp_pair`) reconsiders fc1 and fc2 together
        self.specs: Dict[str, LayerSpec] = {}
        self.decisions: Dict[str, LayerDecision] = {}

    def __call__(self, name: str, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                 shape_before: tuple, tokens: int, activation: Optional[str] = None):
        """Returns ``(module, fused)``; ``fused`` tells whether the module applies ``activation``."""
        has_zeros = mask is not None and not bool(mask.all())
        fmt = self.formats.get(name)
        if fmt is None and self.backend == "dense":
            return self._dense(name, weight, bias, mask if has_zeros else None, shape_before, activation)
        if fmt is None and not has_zeros and self.backend == "auto":
            spec = LayerSpec(name, weight, bias, None, activation, tokens * self.batch_hint)
            module, decision = best_dense(spec, why="dense: no unstructured sparsity left after structural slicing")
            decision.action = "sliced" if tuple(weight.shape) != tuple(shape_before) else "kept"
            decision.shape_before = shape_before
            self.report.append(decision)
            return module, activation is not None
        spec = LayerSpec(name, weight, bias, mask if has_zeros else None, activation, tokens * self.batch_hint,
                         self.block_hint, self.nm_hint)
        module, decision = choose_linear(spec, self.backend, fmt)
        decision.shape_before = shape_before
        decision.shape_after = tuple(weight.shape)
        self.report.append(decision)
        self.specs[name], self.decisions[name] = spec, decision
        return module, activation is not None

    def _dense(self, name, weight, bias, mask, shape_before, activation):
        lin = LayerSpec(name, weight, bias).as_linear()
        if mask is not None:
            with torch.no_grad():
                lin.weight.mul_(mask.to(lin.weight.dtype))
        why = "dense: backend='dense' requested"
        kernel = "torch.linear"
        if activation is not None:  # fuse the GELU (in place at inference) into the Linear
            lin, kernel = DenseLinear.from_dense(lin, None, activation), f"torch.linear+{activation}"
        self.report.append(LayerDecision(
            name, "sliced" if tuple(weight.shape) != tuple(shape_before) else "kept", "dense", kernel, why,
            shape_before, tuple(weight.shape), float(mask.float().mean()) if mask is not None else 1.0))
        return lin, activation is not None
