"""Per-layer kernel choice for a (masked) Linear whose weight lives on CUDA.

:func:`choose_cuda_linear` builds every candidate that can take the layer, times each on the
device for the layer's real token count, and keeps the fastest; the timings and the reasons for
every candidate left out go into the :class:`LayerDecision`. Candidates:

* ``dense``            masked weight through cuBLAS (``F.linear``): often the winner below ~70% sparsity;
* ``bsr_triton``       :mod:`sparsevit.kernels.bsr_linear`, for each block size the mask allows;
* ``bsr_cuda``         ``csrc/cuda/bsr_linear.cu`` (WMMA), fp16/bf16;
* ``semi_structured``  2:4 via ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt/CUTLASS), only
  when the mask is 2:4 along the input dim, the dtype is fp16/bf16 and the GPU is sm_80+.

Every module here applies ``activation`` itself (``None`` / ``"gelu"`` / ``"gelu_tanh"``).
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsevit.benchmark import cuda_median_ms
from sparsevit.runtime.report import LayerDecision

BLOCK_CANDIDATES = ((64, 64), (32, 32), (32, 64), (64, 32), (16, 16))
FORCED = {"triton": "bsr_triton", "cuda": "bsr_cuda", "cpp": "bsr_cuda", "semi_structured": "semi_structured",
          "dense": "dense", "reference": "dense"}


def _act(y: Tensor, activation: Optional[str]) -> Tensor:
    if activation in (None, "none"):
        return y
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")


class CudaDenseLinear(nn.Module):
    """``act(F.linear(x, W * mask, b))``: cuBLAS on the masked weight."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], activation: Optional[str] = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.activation = activation

    def forward(self, x):
        return _act(F.linear(x, self.weight, self.bias), self.activation)


class CudaBSRLinear(nn.Module):
    """Block-sparse Linear on CUDA through :func:`sparsevit.ops.bsr_gpu.bsr_linear_gpu`."""

    def __init__(self, values: Tensor, col_indices: Tensor, crow_indices: Tensor, shape: Tuple[int, int],
                 bias: Optional[Tensor], activation: Optional[str] = None, backend: str = "auto"):
        super().__init__()
        self.register_buffer("values", values.contiguous())
        self.register_buffer("col_indices", col_indices.to(torch.int32).contiguous())
        self.register_buffer("crow_indices", crow_indices.to(torch.int32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.activation, self.backend = activation, backend

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Optional[Tensor], block: Tuple[int, int], activation=None,
                   backend: str = "auto") -> "CudaBSRLinear":
        values, col, crow = bsr_tensors(weight, block)
        return cls(values, col, crow, tuple(weight.shape), bias, activation, backend)

    def extra_repr(self):
        bh, bw = self.values.shape[1:]
        return (f"in={self.in_features}, out={self.out_features}, block={bh}x{bw}, nnz_blocks={self.values.shape[0]}, "
                f"backend={self.backend}, activation={self.activation}")

    def to_dense(self) -> Tensor:
        from sparsevit.ops.bsr_gpu import bsr_to_dense

        return bsr_to_dense(self.values, self.col_indices, self.crow_indices, self.out_features, self.in_features)

    def forward(self, x):
        from sparsevit.ops.bsr_gpu import bsr_linear_gpu

        return bsr_linear_gpu(x, self.values, self.col_indices, self.crow_indices, self.out_features,
                              self.in_features, self.bias, self.activation, backend=self.backend)


class CudaSemiStructuredLinear(nn.Module):
    """2:4 sparse Linear (``torch.sparse`` semi-structured weight, sm_80+)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], activation: Optional[str] = None):
        super().__init__()
        self.weight = nn.Parameter(_to_semi_structured(weight), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.activation = activation

    def forward(self, x):
        shape = x.shape
        y = F.linear(x.reshape(-1, shape[-1]), self.weight, self.bias)
        return _act(y.reshape(*shape[:-1], y.shape[-1]), self.activation)


def _to_semi_structured(weight: Tensor) -> Tensor:
    try:  # the CPU engineer's N:M format knows its own packing
        from sparsevit.formats import NMSparseWeight

        return NMSparseWeight.from_dense(weight, n=2, m=4).to_semi_structured()
    except (ImportError, AttributeError, TypeError):
        return torch.sparse.to_sparse_semi_structured(weight.detach())


def bsr_tensors(weight: Tensor, block: Tuple[int, int]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(values, col_indices, crow_indices)`` of ``weight`` with all-zero ``block`` tiles dropped."""
    try:
        from sparsevit.formats import BlockSparseWeight

        w = BlockSparseWeight.from_dense(weight, block=block)
        return w.values, w.col_indices.to(torch.int32), w.crow_indices.to(torch.int32)
    except ImportError:  # formats not there: same layout, built here
        pass
    bh, bw = block
    out_f, in_f = weight.shape
    nbr, nbc = -(-out_f // bh), -(-in_f // bw)
    padded = weight.new_zeros((nbr * bh, nbc * bw))
    padded[:out_f, :in_f] = weight
    tiles = padded.reshape(nbr, bh, nbc, bw).permute(0, 2, 1, 3)
    keep = tiles.ne(0).any(-1).any(-1)
    crow = torch.zeros(nbr + 1, dtype=torch.int32, device=weight.device)
    crow[1:] = keep.sum(1).cumsum(0)
    return tiles[keep].contiguous(), keep.nonzero()[:, 1].to(torch.int32), crow


def is_2_4(mask: Tensor) -> bool:
    """True when every group of 4 consecutive inputs keeps at most 2 weights."""
    if mask.shape[-1] % 4:
        return False
    return bool(mask.ne(0).reshape(mask.shape[0], -1, 4).sum(-1).le(2).all())


def _candidates(weight: Tensor, bias, mask, activation, x) -> Tuple[Dict[str, Tuple[nn.Module, str, float]], List[str]]:
    """name -> (module, format, density) for every candidate that builds; plus why others did not."""
    from sparsevit.ops.bsr_gpu import gpu_unsupported_reasons

    cands, skipped = {"dense": (CudaDenseLinear(weight, bias, activation), "dense", 1.0)}, []
    for bh, bw in BLOCK_CANDIDATES:
        values, col, crow = bsr_tensors(weight, (bh, bw))
        n_tiles = (-(-weight.shape[0] // bh)) * (-(-weight.shape[1] // bw))
        density = values.shape[0] / max(n_tiles, 1)
        if density > 0.9:
            skipped.append(f"bsr {bh}x{bw}: block density {density:.2f} too high to beat dense")
            continue
        for backend, name in (("triton", "bsr_triton"), ("cuda_cpp", "bsr_cuda")):
            reasons = gpu_unsupported_reasons(backend, x, values, bias, activation)
            if reasons:
                skipped.append(f"{name} {bh}x{bw}: " + "; ".join(reasons))
                continue
            mod = CudaBSRLinear(values, col, crow, tuple(weight.shape), bias, activation, backend)
            cands[f"{name}({bh}x{bw})"] = (mod, f"bsr({bh}x{bw})", density)
    reason = _semi_structured_unsupported(weight, mask)
    if reason:
        skipped.append(f"semi_structured: {reason}")
    else:
        try:
            cands["semi_structured"] = (CudaSemiStructuredLinear(weight, bias, activation), "2:4", 0.5)
        except Exception as exc:  # noqa: BLE001 - shape constraints of cuSPARSELt/CUTLASS
            skipped.append(f"semi_structured: {type(exc).__name__}: {exc}")
    return cands, skipped


def _semi_structured_unsupported(weight: Tensor, mask: Optional[Tensor]) -> Optional[str]:
    if mask is None or not is_2_4(mask):
        return "mask is not 2:4 along the input dim"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {weight.dtype} (needs fp16/bf16)"
    if torch.cuda.get_device_capability(weight.device)[0] < 8:
        return "GPU older than sm_80"
    return None


def choose_cuda_linear(linear: nn.Linear, mask: Optional[Tensor], *, name: str, activation: Optional[str] = None,
                       tokens: int = 197 * 8, backend: str = "auto") -> Tuple[nn.Module, LayerDecision]:
    """The fastest correct CUDA module for ``linear`` with ``mask`` applied, and why.

    ``backend="auto"`` (or ``"sparse"``: best sparse candidate only) times every candidate on
    ``tokens`` random rows; ``"dense"``/``"reference"``, ``"triton"``, ``"cuda"``/``"cpp"`` and
    ``"semi_structured"`` force a family (the fastest block size within it), falling back to dense
    with the reason when it cannot take the layer.
    """
    weight = linear.weight.detach()
    if not weight.is_cuda:
        raise ValueError(f"choose_cuda_linear: {name}'s weight is on {weight.device}, not CUDA")
    if mask is not None:
        weight = weight * mask.to(device=weight.device, dtype=weight.dtype)
    bias = None if linear.bias is None else linear.bias.detach()
    density = float(weight.ne(0).float().mean()) if mask is not None else 1.0
    x = torch.randn(tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
    if backend in ("dense", "reference") or mask is None:
        why = "forced dense" if mask is not None else "no mask: nothing sparse to exploit"
        return CudaDenseLinear(weight, bias, activation), LayerDecision(
            name, "dense", "dense", "torch.linear(cuBLAS)", why, density=density)

    cands, skipped = _candidates(weight, bias, mask, activation, x)
    family = FORCED.get(backend)
    if family and family != "dense":
        pool = {k: v for k, v in cands.items() if k.startswith(family)}
    elif backend == "sparse":
        pool = {k: v for k, v in cands.items() if k != "dense"}
    else:
        pool = dict(cands)
    if not pool:
        mod = cands["dense"][0]
        return mod, LayerDecision(name, "fallback", "dense", "torch.linear(cuBLAS)",
                                  f"backend {backend!r} cannot take this layer: " + " | ".join(skipped),
                                  density=density)

    timings: Dict[str, float] = {}
    with torch.no_grad():
        ref = _act(F.linear(x, weight, bias), activation).float()
        for key, (mod, _, _) in list(pool.items()):
            try:
                out = mod(x).float()
                err = (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
                if not err < 5e-2:  # a wrong kernel must never win on speed
                    skipped.append(f"{key}: rejected, relative error {err:.2e} vs dense")
                    pool.pop(key)
                    continue
                timings[key] = cuda_median_ms(lambda: mod(x))
            except Exception as exc:  # noqa: BLE001 - compile errors, resource limits ...
                skipped.append(f"{key}: failed ({type(exc).__name__}: {exc})")
                pool.pop(key)
    if not timings:
        return cands["dense"][0], LayerDecision(name, "fallback", "dense", "torch.linear(cuBLAS)",
                                                "every candidate failed: " + " | ".join(skipped), density=density)
    best = min(timings, key=timings.get)
    mod, fmt, block_density = pool[best]
    kernel = {"dense": "torch.linear(cuBLAS)", "semi_structured": "torch.sparse.semi_structured"}.get(
        best, best.replace("bsr_triton", "triton_bsr").replace("bsr_cuda", "cuda_bsr_wmma"))
    rank = ", ".join(f"{k}={v:.4f}ms" for k, v in sorted(timings.items(), key=lambda kv: kv[1]))
    reason = f"fastest measured on {torch.cuda.get_device_name(weight.device)} at {tokens} tokens: {rank}"
    if skipped:
        reason += " | not tried: " + " | ".join(skipped)
    decision = LayerDecision(name, "dense" if best == "dense" else "packed", fmt, kernel, reason,
                             density=density if best == "dense" else block_density, est_ms=timings)
    return mod, decision
