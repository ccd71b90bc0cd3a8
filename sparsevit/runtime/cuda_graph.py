"""CUDA-graph capture of a whole forward for one fixed input shape.

At ViT-B batch 1 a forward launches a few hundred small kernels; replaying them as one CUDA graph
removes the per-launch CPU cost, which dominates at small batch. The price is static shapes and
static memory: the graph reads its input from one buffer and writes its output to another, so
:class:`CUDAGraphModule` copies each call's input into the static buffer, replays, and returns the
output (cloned by default, since the next replay overwrites it).
"""
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["CUDAGraphModule", "capture_cuda_graph"]


class CUDAGraphModule(nn.Module):
    """Captures ``module(*example_inputs)`` once and replays it.

    Args:
        module: the model (eval mode, parameters on one CUDA device).
        example_inputs: a tensor or a sequence of tensors with the shapes/dtypes every call will use.
        warmup: eager iterations on a side stream before capture (lets cuBLAS / Triton autotuning and
            lazy initialisation happen outside the graph).
        clone_output: return a copy of the static output (safe); ``False`` returns the static buffer
            itself, valid until the next call.
    Calls must match the captured shapes, dtypes and device exactly; anything else raises
    ``ValueError`` (re-capture with a new example for a new shape).
    """

    def __init__(self, module: nn.Module, example_inputs: Union[Tensor, Sequence[Tensor]], *, warmup: int = 3,
                 clone_output: bool = True):
        super().__init__()
        inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
        if not inputs or not all(isinstance(t, Tensor) for t in inputs):
            raise ValueError("CUDAGraphModule: example_inputs must be a tensor or a sequence of tensors")
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphModule: CUDA graphs need a CUDA device; none is available")
        for i, t in enumerate(inputs):
            if not t.is_cuda:
                raise ValueError(f"CUDAGraphModule: example input {i} is on {t.device}; CUDA graphs capture "
                                 "CUDA work only (move the model and inputs with .cuda())")
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_cuda:
                raise ValueError(f"CUDAGraphModule: '{name}' is on {p.device}; the whole module must be on CUDA")
        self.module = module
        self.clone_output = clone_output
        self._signature = [(tuple(t.shape), t.dtype, t.device) for t in inputs]
        self._static_in = [t.detach().clone() for t in inputs]
        self._graph = torch.cuda.CUDAGraph()
        self._static_out = self._capture(warmup)

    @torch.no_grad()
    def _capture(self, warmup: int):
        stream = torch.cuda.Stream(device=self._static_in[0].device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(max(warmup, 1)):
                self.module(*self._static_in)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        with torch.cuda.graph(self._graph):
            out = self.module(*self._static_in)
        return out

    def _check(self, inputs) -> None:
        got = [(tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else type(t) for t in inputs]
        if got != self._signature:
            raise ValueError(f"CUDAGraphModule: input signature {got} differs from the captured one "
                             f"{self._signature}; capture a new graph for this shape")

    def forward(self, *inputs):
        self._check(inputs)
        with torch.no_grad():
            for buf, t in zip(self._static_in, inputs):
                buf.copy_(t)
            self._graph.replay()
        if not self.clone_output:
            return self._static_out
        return _tree_clone(self._static_out)

    def __getattr__(self, name):  # expose the wrapped model's attributes (sparsevit_report ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def _tree_clone(out):
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_tree_clone(o) for o in out)
    if isinstance(out, dict):
        return {k: _tree_clone(v) for k, v in out.items()}
    return out


def capture_cuda_graph(model: nn.Module, example_input: Union[Tensor, Sequence[Tensor]], warmup: int = 3,
                       clone_output: Optional[bool] = True) -> CUDAGraphModule:
    """``CUDAGraphModule(model.eval(), example_input)``; see :class:`CUDAGraphModule`."""
    return CUDAGraphModule(model.eval(), example_input, warmup=warmup, clone_output=bool(clone_output))
