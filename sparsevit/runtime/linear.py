"""Sparse / dense Linear modules for CPU and the per-layer choice between them.

* :class:`SparseLinear` -- a :class:`~sparsevit.formats.BlockSparseWeight` (+ bias, + fused
  activation) run by ``sparsevit.ops.bsr_linear`` (C++ AVX-512/AVX2 kernel on CPU).
* :class:`DenseLinear` -- an ``nn.Linear`` holding ``W * mask`` plus the same fused-activation
  contract, for layers where dense wins.
* :func:`choose_linear` -- picks between them per layer (and the block shape), by a short timing
  at the layer's real token count (cached per shape / density / threads), or by a cost model when
  ``SPARSEVIT_CHOOSE=model`` (deterministic; what the tests use). Sparse is never chosen when it
  would be more than 3% slower than dense, and every decision says why.

Both modules compute ``act(x @ (W*mask)^T + b)`` exactly like the masked dense Linear (up to
rounding); ``activation`` is ``None``, ``"gelu"`` or ``"gelu_tanh"``.
"""
import os
import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsevit.formats.bsr import BlockSparseWeight, pack_values
from sparsevit.ops.bsr import (apply_activation, bsr_linear, cpp_kernel_name, cpp_unsupported_reasons,
                               reference_bsr_linear)
from sparsevit.runtime.report import LayerDecision

__all__ = ["SparseLinear", "DenseLinear", "choose_linear", "BLOCK_CANDIDATES", "block_density"]

# Block shapes tried by choose_linear, with the relative speed of the C++ kernel per kept FLOP
# (measured on Zen 4/5 AVX-512 at 2 threads; 16x16 pays more per-block overhead, 1x8 is
# load-bound). Used to rank candidates before timing and as the cost model without timing.
BLOCK_CANDIDATES: Tuple[Tuple[int, int], ...] = ((32, 32), (64, 64), (16, 16), (32, 64), (1, 8))
_BLOCK_EFFICIENCY = {(32, 32): 1.0, (64, 64): 0.95, (32, 64): 1.0, (16, 16): 0.8, (1, 8): 0.25}
# Modelled throughput (GFLOP/s at 2 threads) of dense torch and of the C++ kernel on kept blocks.
_MODEL_GFLOPS = {torch.float32: (140.0, 200.0), torch.bfloat16: (800.0, 450.0)}
_SLOWER_TOLERANCE = 1.03  # sparse may be chosen when at most 3% slower (it also saves memory)
_MAX_PACK_DENSITY = 0.95  # above this fraction of kept blocks the layer is treated as dense
_TIMING_CACHE: Dict[tuple, float] = {}


class SparseLinear(nn.Module):
    """``act(x @ W^T + b)`` with ``W`` block-sparse. Buffers: ``values``, ``col_indices``,
    ``crow_indices``, ``bias``, ``shape``, ``block`` (all in ``state_dict``) and the kernel layout
    ``packed`` (rebuilt on load and on dtype change, not saved).

    ``impl``: ``"auto"`` (the op's dispatch: C++ on CPU, registered kernels on GPU, else reference)
    or ``"reference"`` (always the PyTorch reference).
    """

    def __init__(self, weight: BlockSparseWeight, bias: Optional[Tensor] = None,
                 activation: Optional[str] = None, impl: str = "auto"):
        super().__init__()
        if activation not in (None, "gelu", "gelu_tanh"):
            raise ValueError(f"activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")
        if impl not in ("auto", "reference"):
            raise ValueError(f"impl must be 'auto' or 'reference', got {impl!r}")
        self.register_buffer("values", weight.values)
        self.register_buffer("col_indices", weight.col_indices)
        self.register_buffer("crow_indices", weight.crow_indices)
        self.register_buffer("packed", weight.packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("shape", torch.tensor(weight.shape, dtype=torch.int64))
        self.register_buffer("block", torch.tensor(weight.block, dtype=torch.int64))
        self._meta = (weight.shape, weight.block)
        self.activation = activation
        self.impl = impl

    @property
    def out_features(self) -> int:
        return self._meta[0][0]

    @property
    def in_features(self) -> int:
        return self._meta[0][1]

    @property
    def weight(self) -> BlockSparseWeight:
        """The block-sparse weight (a view on the buffers; no copy, no re-packing)."""
        return BlockSparseWeight(self.values, self.col_indices, self.crow_indices, self._meta[0],
                                 self._meta[1], self.packed)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[Tensor] = None, block=(32, 32),
                   activation: Optional[str] = None, impl: str = "auto") -> "SparseLinear":
        """Packs ``linear.weight * mask`` (every block with a nonzero / True mask entry is kept)."""
        w = BlockSparseWeight.from_dense(linear.weight.detach(), block=block, mask=mask)
        b = None if linear.bias is None else linear.bias.detach()
        return cls(w, b, activation, impl)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight (zeros where blocks were dropped) and bias; the
        activation is not part of it."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.impl == "reference":
            y = reference_bsr_linear(x.reshape(-1, self.in_features), w, self.bias, self.activation)
            return y.reshape(*x.shape[:-1], self.out_features)
        return bsr_linear(x, w, self.bias, self.activation)

    # nn.Module.to(dtype) casts `packed` element-wise, but bf16 uses a different (paired) layout.
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        want_pairs = 2 if self.values.dtype == torch.bfloat16 else 1
        p = self.packed
        if p is None or p.dtype != self.values.dtype or p.shape[-1] != want_pairs or p.device != self.values.device:
            self.packed = pack_values(self.values)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The number of kept blocks differs between checkpoints: take the incoming sizes.
        for name in ("values", "col_indices", "crow_indices", "bias"):
            key = prefix + name
            if key in state_dict and (self._buffers.get(name) is not None):
                src = state_dict[key]
                self._buffers[name] = torch.empty(src.shape, dtype=self._buffers[name].dtype,
                                                  device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._meta = (tuple(int(v) for v in self.shape.tolist()), tuple(int(v) for v in self.block.tolist()))
        self.packed = pack_values(self.values)

    def extra_repr(self) -> str:
        w = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block={w.block[0]}x{w.block[1]}, density={w.density:.3f}, bias={self.bias is not None}, "
                f"activation={self.activation}, impl={self.impl}")


class DenseLinear(nn.Linear):
    """``act(F.linear(x, W * mask, b))``: an ``nn.Linear`` (so ``isinstance(m, nn.Linear)`` holds)
    with the mask baked into its weight and an optional fused activation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: Optional[str] = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if activation not in (None, "gelu", "gelu_tanh"):
            raise ValueError(f"activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")
        self.activation = activation

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[Tensor] = None,
                   activation: Optional[str] = None) -> "DenseLinear":
        w = linear.weight.detach()
        m = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, activation=activation,
                device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w if mask is None else w * mask.to(device=w.device, dtype=w.dtype))
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        m.requires_grad_(False)
        return m

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.activation is not None and not torch.is_grad_enabled():
            # in place on the fresh linear output: saves a second activation-sized buffer
            return torch.ops.aten.gelu_(y, approximate="none" if self.activation == "gelu" else "tanh")
        return apply_activation(y, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"


# ---------------------------------------------------------------------------------------------
def block_density(keep: Tensor, block: Tuple[int, int]) -> float:
    """Fraction of ``block`` tiles of the boolean ``keep`` matrix holding at least one True."""
    bh, bw = block
    out_f, in_f = keep.shape
    nbr, nbc = -(-out_f // bh), -(-in_f // bw)
    k = F.pad(keep, (0, nbc * bw - in_f, 0, nbr * bh - out_f))
    return float(k.reshape(nbr, bh, nbc, bw).any(dim=3).any(dim=1).float().mean())


def _median_ms(fn, reps: int = 3) -> float:
    fn()  # warm-up (also first-touch of outputs / workspaces)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def _measure(key, fn) -> float:
    if key not in _TIMING_CACHE:
        with torch.inference_mode():
            _TIMING_CACHE[key] = _median_ms(fn)
    return _TIMING_CACHE[key]


def _model_ms(out_f, in_f, tokens, dtype, density=None, block=None) -> float:
    dense_gflops, sparse_gflops = _MODEL_GFLOPS.get(dtype, _MODEL_GFLOPS[torch.float32])
    flops = 2.0 * tokens * out_f * in_f
    if density is None:
        return flops / dense_gflops / 1e6
    eff = _BLOCK_EFFICIENCY.get(tuple(block), 0.7)
    overhead = tokens * (in_f + out_f) * 4 / 20e9 * 1e3  # activations in/out at ~20 GB/s
    return flops * density / (sparse_gflops * eff) / 1e6 + overhead


def _dense_decision(name, w, reason, density=1.0, est=None):
    return LayerDecision(name, "dense", "dense", "torch.linear", reason, tuple(w.shape), tuple(w.shape),
                         density, dict(est or {}))


def choose_linear(linear: nn.Linear, mask: Optional[Tensor], *, name: str,
                  activation: Optional[str] = None, tokens: int = 197 * 8,
                  backend: str = "auto") -> Tuple[nn.Module, LayerDecision]:
    """The fastest correct module computing ``act(x @ (W*mask)^T + b)`` for ``linear``, and why.

    Args:
        linear: the layer (its weight device decides CPU vs CUDA; CUDA goes to
            :func:`sparsevit.runtime.gpu_linear.choose_cuda_linear`).
        mask: optional element mask (any pattern; every block holding a True is kept, so results
            stay exact). ``None``: the zeros already in the weight.
        name: layer name for the report.
        activation: ``None`` / ``"gelu"`` / ``"gelu_tanh"`` fused into the returned module.
        tokens: rows per call to time/model at (e.g. 197 * batch).
        backend: ``"auto"`` (choose), ``"dense"``, ``"sparse"``/``"cpp"`` (C++ BSR kernel; error if
            unavailable) or ``"reference"`` (PyTorch reference op).
    """
    w = linear.weight.detach()
    if w.device.type == "cuda":
        from sparsevit.runtime.gpu_linear import choose_cuda_linear

        return choose_cuda_linear(linear, mask, name=name, activation=activation, tokens=tokens,
                                  backend=backend)
    if backend not in ("auto", "dense", "sparse", "cpp", "reference"):
        raise ValueError(f"backend must be 'auto', 'dense', 'sparse', 'cpp' or 'reference', got {backend!r}")
    if mask is not None and tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(w.shape)}")
    keep = (w != 0) if mask is None else (mask.to(w.device) != 0)
    out_f, in_f = w.shape
    elem_density = float(keep.float().mean())

    def dense(reason, est=None):
        return DenseLinear.from_dense(linear, mask, activation), _dense_decision(name, w, reason, 1.0, est)

    if backend == "dense":
        return dense(f"dense: backend='dense' requested (element density {elem_density:.2f})")

    # Candidate block shapes ranked by modelled time (density / kernel efficiency).
    cands = []
    for blk in BLOCK_CANDIDATES:
        d = block_density(keep, blk)
        cands.append((_model_ms(out_f, in_f, tokens, w.dtype, d, blk), blk, d))
    cands.sort()
    best_model, best_blk, best_d = cands[0]

    def sparse_module(blk, impl="auto"):
        return SparseLinear.from_dense(linear, mask, block=blk, activation=activation, impl=impl)

    def packed_decision(blk, d, kernel, reason, est=None):
        return LayerDecision(name, "packed", f"bsr({blk[0]}x{blk[1]})", kernel, reason, tuple(w.shape),
                             tuple(w.shape), d, dict(est or {}))

    if backend == "reference":
        blk, d = max(((b, dd) for _, b, dd in cands), key=lambda t: (-t[1], t[0][0] * t[0][1]))
        return sparse_module(blk, "reference"), packed_decision(
            blk, d, "reference_bsr", f"bsr {blk[0]}x{blk[1]} density {d:.2f}: backend='reference' requested")

    probe = torch.empty(0, in_f, dtype=w.dtype)
    reasons = cpp_unsupported_reasons(probe, BlockSparseWeight.from_dense(w[:1, :1]))
    if backend in ("sparse", "cpp"):
        if reasons:
            raise RuntimeError(f"{name}: backend={backend!r} needs the C++ BSR kernel, which cannot run: "
                               f"{'; '.join(reasons)}. Use backend='auto' or 'reference', or rebuild with "
                               f"`pip install -e . --no-build-isolation`.")
        return sparse_module(best_blk), packed_decision(
            best_blk, best_d, cpp_kernel_name(),
            f"bsr {best_blk[0]}x{best_blk[1]} density {best_d:.2f}: backend={backend!r} requested")

    # backend == "auto"
    if reasons:
        return dense(f"dense: {'; '.join(reasons)}; the reference BSR path is never faster than dense")
    if best_d > _MAX_PACK_DENSITY:
        return dense(f"dense: density {best_d:.2f} at best block {best_blk[0]}x{best_blk[1]} "
                     f"(element density {elem_density:.2f}), nothing to skip")

    measure = os.environ.get("SPARSEVIT_CHOOSE", "measure") != "model"
    threads = torch.get_num_threads()
    est: Dict[str, float] = {}
    if measure:
        x = torch.randn(tokens, in_f, dtype=w.dtype)
        wd = (w if mask is None else w * mask.to(w.dtype)).contiguous()
        t_dense = _measure(("dense", out_f, in_f, w.dtype, tokens, threads),
                           lambda: F.linear(x, wd, linear.bias))
        est["dense"] = t_dense
        scored = []
        for _, blk, d in cands[:2]:  # time the two best-ranked shapes only
            mod = sparse_module(blk)
            key = ("bsr", out_f, in_f, w.dtype, tokens, threads, blk, round(d, 2))
            t = _measure(key, lambda: mod(x))
            est[f"bsr{blk[0]}x{blk[1]}"] = t
            scored.append((t, blk, d, mod))
        t_sparse, blk, d, mod = min(scored, key=lambda s: s[0])
        how = "measured"
    else:
        t_dense = _model_ms(out_f, in_f, tokens, w.dtype)
        est["dense"] = t_dense
        for t, b, dd in cands[:2]:
            est[f"bsr{b[0]}x{b[1]}"] = t
        t_sparse, blk, d = best_model, best_blk, best_d
        mod = None
        how = "modelled"
    if t_sparse <= _SLOWER_TOLERANCE * t_dense:
        mod = mod if mod is not None else sparse_module(blk)
        return mod, packed_decision(
            blk, d, cpp_kernel_name(),
            f"bsr {blk[0]}x{blk[1]} density {d:.2f}: {t_dense / t_sparse:.1f}x faster than dense "
            f"({t_sparse:.2f} ms vs {t_dense:.2f} ms, {how} at {tokens} tokens)", est)
    return dense(f"dense: density {d:.2f} at best block {blk[0]}x{blk[1]}, sparse would be "
                 f"{t_sparse / t_dense:.1f}x slower ({t_sparse:.2f} ms vs {t_dense:.2f} ms, {how})", est)
