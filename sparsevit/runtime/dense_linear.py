"""The dense Linear of an accelerated model, run by whichever dense implementation is fastest.

On CPU ``F.linear`` in fp32 runs on MKL, which takes no AVX-512 path on AMD CPUs; oneDNN on a
prepacked weight and sparsevit's own BSR kernel on the full weight are often faster, and none is
best for every shape, so the chooser (:func:`sparsevit.runtime.linear.best_dense`) times them and
sets :attr:`DenseLinear.kernel`. The candidates and why one cannot run come from
:mod:`sparsevit.ops.dense_cpu` (one place).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsevit.errors import KernelError
from sparsevit.formats import BlockSparseWeight
from sparsevit.ops.bsr import bsr_linear
from sparsevit.ops.linear_kernels import (ACTIVATIONS, CppBSR, apply_activation, eager_cpu_call_ok, standard_ops_wanted,
                                          token_rows)

__all__ = ["DenseLinear"]

_ONEDNN_ATTR = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")


class DenseLinear(nn.Linear):
    """``act(F.linear(x, W * mask, b))``: an ``nn.Linear`` (so ``isinstance(m, nn.Linear)`` holds)
    with the mask baked into its weight, an optional fused activation, and the dense implementation
    the chooser measured fastest for it (``kernel``, a name of :data:`sparsevit.ops.dense_cpu.CANDIDATE_NAMES`):

    * ``"torch_linear"``: ``F.linear`` (MKL in fp32, oneDNN in bf16 on CPU; cuBLAS on CUDA);
    * ``"onednn_packed"``: oneDNN's inner product on a weight reordered once into its blocked layout;
    * ``"sparsevit_bsr_full"``: sparsevit's BSR kernel on the full weight (every 32x32 block kept).

    The state is ``weight`` and ``bias`` whatever the kernel (``state_dict`` is that of an
    ``nn.Linear``); the derived layout is rebuilt on load and on every device/dtype change, and a
    kernel that cannot run after a move falls back to ``"torch_linear"``. Traced forwards
    (``torch.compile``/``torch.export``, dispatch modes such as ``FlopCounterMode``), forwards under
    CPU autocast and forwards that need gradients take ``F.linear``, the
    same function, so exporters and autograd see a standard op.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: Optional[str] = None, device=None, dtype=None, kernel: str = "torch_linear"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _check_activation(activation)
        self.activation = activation
        self._derived = None
        self.set_kernel(kernel)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[Tensor] = None,
                   activation: Optional[str] = None, kernel: str = "torch_linear") -> "DenseLinear":
        w = linear.weight.detach()
        m = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, activation=activation,
                device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w if mask is None else w * mask.to(device=w.device, dtype=w.dtype))
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        m.requires_grad_(False)
        m.set_kernel(kernel)
        return m

    def kernel_reasons(self, kernel: str) -> List[str]:
        """Why ``kernel`` cannot run this layer as it is now (empty: it can)."""
        from sparsevit.ops.dense_cpu import CANDIDATE_NAMES, dense_candidates

        if kernel not in CANDIDATE_NAMES:
            raise ValueError(f"DenseLinear kernel must be one of {CANDIDATE_NAMES}, got {kernel!r}")
        if self.weight.device.type == "meta":
            return ["weight on the meta device"] if kernel != "torch_linear" else []
        cands = {c.name: c for c in dense_candidates(self.weight, self.bias, self.activation)}
        return cands[kernel].not_supported_reasons

    def set_kernel(self, kernel: str) -> None:
        """Use ``kernel`` from now on (raises :class:`KernelError` with the reasons if it cannot run)."""
        reasons = self.kernel_reasons(kernel)
        if reasons:
            raise KernelError(f"dense kernel {kernel!r} cannot run this layer: {'; '.join(reasons)}")
        self.kernel = kernel
        self._derive()

    def _derive(self) -> None:
        """Builds the kernel's layout from ``weight`` (never saved: it follows from the weight)."""
        w = self.weight.detach()
        if self.kernel == "onednn_packed":
            self._derived = torch.ops.mkldnn._reorder_linear_weight(w, None)
        elif self.kernel == "sparsevit_bsr_full":
            self._derived = BlockSparseWeight.from_dense(w, block=(32, 32))
        else:
            self._derived = None

    def forward(self, x: Tensor) -> Tensor:
        fast = (self._derived is not None and not standard_ops_wanted() and not torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)))
        if fast and self.kernel == "onednn_packed" and x.dtype == self.weight.dtype:
            y = self._run_onednn(x.reshape(-1, self.in_features))
            return y.reshape(*x.shape[:-1], self.out_features)
        if fast and self.kernel == "sparsevit_bsr_full" and x.dtype == self.weight.dtype:
            if eager_cpu_call_ok(x, self.weight, self.bias):
                y = self._run_bsr_full(token_rows(x, self.in_features))
                return y.reshape(*x.shape[:-1], self.out_features)
            return bsr_linear(x, self._derived, self.bias, self.activation)
        y = F.linear(x, self.weight, self.bias)
        if self.activation is not None and not torch.is_grad_enabled():
            # in place on the fresh linear output: saves a second activation-sized buffer
            return torch.ops.aten.gelu_(y, approximate="none" if self.activation == "gelu" else "tanh")
        return apply_activation(y, self.activation)

    def lean_call(self, dtype: torch.dtype) -> Optional[Callable[[Tensor], Tensor]]:
        """``f(x2d)``: the call :meth:`forward` makes on a contiguous ``[tokens, in]`` input of ``dtype`` in
        eager CPU inference without grad (the caller checks that, and hooks); None where it takes
        ``F.linear``. For the lean block path (runtime/modules.py)."""
        if self._derived is None or self.weight.dtype != dtype:
            return None
        return {"onednn_packed": self._run_onednn, "sparsevit_bsr_full": self._run_bsr_full}.get(self.kernel)

    def _run_onednn(self, x2d: Tensor) -> Tensor:
        attr, algorithm = _ONEDNN_ATTR[self.activation]
        return torch.ops.mkldnn._linear_pointwise(x2d, self._derived, self.bias, attr, [], algorithm)

    def _run_bsr_full(self, x2d: Tensor) -> Tensor:
        w = self._derived
        return CppBSR.run_bsr(x2d, w.values, w.col_indices, w.crow_indices, w.packed, self.out_features,
                              self.in_features, *w.block, self.bias, "none" if self.activation is None else self.activation)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._refresh()
        return self

    def _refresh(self) -> None:
        """After a move, cast or load: re-derive, or fall back to F.linear where the kernel cannot run."""
        if getattr(self, "kernel", "torch_linear") != "torch_linear" and self.kernel_reasons(self.kernel):
            self.kernel = "torch_linear"
        if hasattr(self, "kernel"):
            self._derive()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_derived"] = None  # opaque oneDNN tensors do not pickle; rebuilt below
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._refresh()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}, kernel={self.kernel}"
