"""N:M semi-structured sparsity (2:4 and friends) for a Linear weight ``W[out, in]``.

In every group of ``m`` consecutive input columns at most ``n`` weights are nonzero. The packed form
keeps, per group, ``n`` values and their positions inside the group (``uint8``); this is what
``to_dense()`` unpacks and what checkpoints store. ``to_semi_structured()`` hands the weight to
torch's 2:4 kernels (cuSPARSELt / CUTLASS), which only exist on CUDA.
"""
from typing import Dict

import torch

__all__ = ["NMSparseWeight"]


class NMSparseWeight:
    """``values [out, in/m*n]`` + ``indices [out, in/m*n]`` (uint8 position within each group of m)."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, shape, n: int, m: int):
        self.values = values
        self.indices = indices
        self.shape = (int(shape[0]), int(shape[1]))
        self.n, self.m = int(n), int(m)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, n: int = 2, m: int = 4) -> "NMSparseWeight":
        """Packs a weight that already is N:M along the input dim; raises ``ValueError`` otherwise."""
        if dense.dim() != 2:
            raise ValueError(f"dense weight must be 2-D [out, in], got shape {tuple(dense.shape)}")
        if not (0 < n <= m <= 255):
            raise ValueError(f"need 0 < n <= m <= 255, got n={n}, m={m}")
        out_f, in_f = dense.shape
        if in_f % m:
            raise ValueError(f"in_features={in_f} is not a multiple of m={m}; {n}:{m} sparsity needs "
                             f"whole groups along the input dim")
        groups = dense.reshape(out_f, in_f // m, m)
        nz = groups != 0
        counts = nz.sum(-1)
        if bool((counts > n).any()):
            bad = int((counts > n).sum())
            r, g = (int(i) for i in (counts > n).nonzero()[0])
            raise ValueError(
                f"weight is not {n}:{m} sparse along the input dim: {bad} of {counts.numel()} groups of "
                f"{m} have more than {n} nonzeros (first: row {r}, columns {g * m}..{g * m + m - 1} "
                f"has {int(counts[r, g])}). Prune to {n}:{m} first (keep the {n} largest |w| per group).")
        # Stable order: nonzeros first by position, then zero slots to fill up to n.
        pos = torch.arange(m, device=dense.device).expand_as(groups)
        key = torch.where(nz, pos, pos + m)
        idx = key.argsort(dim=-1)[..., :n]
        vals = torch.gather(groups, -1, idx)
        return cls(vals.reshape(out_f, -1).contiguous(), idx.to(torch.uint8).reshape(out_f, -1).contiguous(),
                   (out_f, in_f), n, m)

    def to_dense(self) -> torch.Tensor:
        out_f, in_f = self.shape
        groups = torch.zeros(out_f, in_f // self.m, self.m, dtype=self.values.dtype, device=self.values.device)
        groups.scatter_(-1, self.indices.reshape(out_f, -1, self.n).long(),
                        self.values.reshape(out_f, -1, self.n))
        return groups.reshape(out_f, in_f)

    def to_semi_structured(self):
        """torch's ``SparseSemiStructuredTensor`` (``torch.sparse.to_sparse_semi_structured``); CUDA only."""
        if self.values.device.type != "cuda":
            raise RuntimeError(
                f"to_semi_structured() needs the weight on CUDA (torch's 2:4 kernels are GPU only); it is "
                f"on {self.values.device}. Move it first: w.to(device='cuda').to_semi_structured()")
        if (self.n, self.m) != (2, 4):
            raise RuntimeError(f"torch semi-structured sparsity is 2:4, this weight is {self.n}:{self.m}")
        return torch.sparse.to_sparse_semi_structured(self.to_dense())

    def to(self, device=None, dtype=None) -> "NMSparseWeight":
        return NMSparseWeight(self.values.to(device=device, dtype=dtype), self.indices.to(device=device),
                              self.shape, self.n, self.m)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def device(self):
        return self.values.device

    @property
    def density(self) -> float:
        return self.n / self.m

    def to_tensors(self) -> Dict[str, torch.Tensor]:
        return {"values": self.values, "indices": self.indices,
                "shape": torch.tensor(self.shape, dtype=torch.int64),
                "nm": torch.tensor([self.n, self.m], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, d: Dict[str, torch.Tensor]) -> "NMSparseWeight":
        n, m = (int(v) for v in d["nm"].tolist())
        return cls(d["values"], d["indices"], tuple(d["shape"].tolist()), n, m)

    def __repr__(self) -> str:
        return f"NMSparseWeight(shape={self.shape}, {self.n}:{self.m}, dtype={self.dtype}, device={self.device})"
