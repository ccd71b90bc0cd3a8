"""Fine-grained sparse rows for the weight of a Linear layer (unstructured, 1x4 or 1x8 tiles).

``W[out, in]`` (``nn.Linear.weight`` orientation) is kept as *units*: runs of ``unit`` consecutive
input columns of one output row, starting at a multiple of ``unit``. A unit is stored when its mask
tile holds any True entry (or, without a mask, any nonzero); its other entries are stored as the
(masked) zeros they are. Fields, all plain tensors so a module can hold them as buffers:

* ``values``       ``[nnz_units, unit]`` in the weight dtype,
* ``col_indices``  int32 ``[nnz_units]`` first input column of each unit, strictly increasing per row,
* ``row_ptr``      int32 ``[out + 1]`` offsets of each output row into ``values``,
* ``seg_ptr``      int32 ``[out, n_segments + 1]`` (derived) first unit of each row at or after column
  ``s * chunk_cols``: the CPU kernel walks the input in chunks whose packed activations stay in L1.

``tile`` (1, 4 or 8) is the mask granularity along the input dim. The stored ``unit`` equals ``tile``,
except bf16 with ``tile == 1``, which stores column pairs (``unit == 2``): ``vdpbf16ps`` multiplies
pairs of input columns, so a pair holding one nonzero costs one instruction either way.

Every index is validated at construction (the C++ kernel trusts them): a corrupt or hand-made
instance raises :class:`sparsevit.errors.KernelError` naming the first bad entry.
"""
from typing import Dict, Optional, Tuple

import torch

from sparsevit.errors import KernelError

__all__ = ["FineSparseWeight", "TILES", "unit_width", "chunk_columns"]

TILES = (1, 4, 8)


def unit_width(tile: int, dtype: torch.dtype) -> int:
    """Stored unit width for a mask tile width and dtype (bf16 needs even-aligned column pairs)."""
    return 2 if (dtype == torch.bfloat16 and tile == 1) else tile


def chunk_columns(dtype: torch.dtype) -> int:
    """Input columns per kernel chunk (a segment of ``seg_ptr``). With the AVX-512 token tiles (bf16:
    128 tokens, fp32: 80) one chunk of packed activations is 32 KiB (bf16) or 40 KiB (fp32): measured
    at DeiT-S shapes (``bench/cpu_kernels.py``), 128 columns beat 32/64 (per-row overhead per chunk)
    and 192/256 (cache misses) in both dtypes, within a few % of kept-work rate."""
    return 128


def _check_tile(tile) -> int:
    if isinstance(tile, (tuple, list)):
        if len(tile) != 2 or int(tile[0]) != 1:
            raise ValueError(f"tile must be 1, 4 or 8 (or (1, t)): tiles run along the input dim, got {tile}")
        tile = tile[1]
    tile = int(tile)
    if tile not in TILES:
        raise ValueError(f"tile must be one of {TILES} input columns, got {tile}")
    return tile


def _segment_pointers(col: torch.Tensor, row_ptr: torch.Tensor, chunk: int, in_f: int) -> torch.Tensor:
    """seg[o, s] = first unit of row o whose column is >= s * chunk (binary search per row)."""
    out_f = row_ptr.numel() - 1
    n_seg = max(1, -(-in_f // chunk))
    bounds = torch.arange(n_seg + 1, dtype=torch.int64) * chunk
    bounds[-1] = max(in_f, 1) + chunk  # past every column
    col64, rp = col.to(torch.int64).cpu(), row_ptr.to(torch.int64).cpu()
    # Offset each row's columns by row * big so one global searchsorted handles all rows at once.
    big = in_f + 2 * chunk + 1
    rows = torch.repeat_interleave(torch.arange(out_f), rp[1:] - rp[:-1], output_size=col64.numel())
    keys = col64 + rows * big
    queries = bounds.unsqueeze(0) + (torch.arange(out_f) * big).unsqueeze(1)
    seg = torch.searchsorted(keys, queries.reshape(-1)).reshape(out_f, n_seg + 1)
    return seg.to(torch.int32).contiguous()


class FineSparseWeight:
    """A fine-grained sparse ``[out, in]`` weight; build with :meth:`from_dense`. See the module docstring."""

    def __init__(self, values: torch.Tensor, col_indices: torch.Tensor, row_ptr: torch.Tensor,
                 shape: Tuple[int, int], tile: int):
        out_f, in_f = (int(s) for s in shape)
        self.tile = _check_tile(tile)
        self.unit = unit_width(self.tile, values.dtype)
        self.shape = (out_f, in_f)
        self.values = values
        self.col_indices = col_indices
        self.row_ptr = row_ptr
        self._validate()
        self.chunk_cols = chunk_columns(values.dtype)
        self.seg_ptr = _segment_pointers(col_indices, row_ptr, self.chunk_cols, in_f).to(values.device)

    def _validate(self) -> None:
        out_f, in_f = self.shape
        v, col, rp, u = self.values, self.col_indices, self.row_ptr, self.unit
        if out_f < 0 or in_f < 0:
            raise KernelError(f"FineSparseWeight: negative shape {self.shape}")
        if v.dim() != 2 or v.shape[1] != u:
            raise KernelError(f"FineSparseWeight: values must be [nnz_units, {u}] for tile={self.tile} "
                              f"and {v.dtype}, got {tuple(v.shape)}")
        if col.dtype != torch.int32 or rp.dtype != torch.int32:
            raise KernelError(f"FineSparseWeight: col_indices/row_ptr must be int32, got {col.dtype}/{rp.dtype}")
        if col.dim() != 1 or col.numel() != v.shape[0]:
            raise KernelError(f"FineSparseWeight: col_indices has shape {tuple(col.shape)}, values has "
                              f"{v.shape[0]} units")
        if rp.dim() != 1 or rp.numel() != out_f + 1:
            raise KernelError(f"FineSparseWeight: row_ptr must have {out_f + 1} entries, got {rp.numel()}")
        rpc, colc = rp.cpu().to(torch.int64), col.cpu().to(torch.int64)
        if int(rpc[0]) != 0 or int(rpc[-1]) != col.numel() or bool((rpc[1:] < rpc[:-1]).any()):
            bad = int(torch.nonzero(rpc[1:] < rpc[:-1])[0]) if bool((rpc[1:] < rpc[:-1]).any()) else -1
            raise KernelError(f"FineSparseWeight: row_ptr must rise from 0 to {col.numel()} "
                              f"(got first={int(rpc[0])}, last={int(rpc[-1])}, first decrease at row {bad})")
        bad = (colc < 0) | (colc >= in_f) | (colc % u != 0)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise KernelError(f"FineSparseWeight: col_indices[{i}] = {int(colc[i])} is outside [0, {in_f}) "
                              f"or not a multiple of the unit width {u}")
        if colc.numel() > 1:
            rows = torch.repeat_interleave(torch.arange(out_f), rpc[1:] - rpc[:-1], output_size=colc.numel())
            same_row = rows[1:] == rows[:-1]
            bad = same_row & (colc[1:] <= colc[:-1])
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0]) + 1
                raise KernelError(f"FineSparseWeight: col_indices must strictly increase within a row; "
                                  f"entry {i} (row {int(rows[i])}) = {int(colc[i])} follows {int(colc[i - 1])}")

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: Optional[torch.Tensor] = None, tile=1
                   ) -> "FineSparseWeight":
        """Packs ``weight * mask`` (or the nonzeros of ``weight``) at mask granularity ``tile``.

        ``to_dense()`` then reproduces ``weight * mask`` exactly, in ``weight``'s dtype.
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        tile = _check_tile(tile)
        if mask is not None:
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
            keep = (mask != 0).to(weight.device)
            weight = weight * keep.to(weight.dtype)
        else:
            keep = weight != 0
        return cls._from_keep(weight, keep, tile)

    @classmethod
    def _from_keep(cls, weight: torch.Tensor, keep: torch.Tensor, tile: int) -> "FineSparseWeight":
        out_f, in_f = weight.shape
        u = unit_width(tile, weight.dtype)
        n_units = -(-in_f // u)
        pad = n_units * u - in_f
        wp = torch.nn.functional.pad(weight, (0, pad)).reshape(out_f, n_units, u)
        kp = torch.nn.functional.pad(keep, (0, pad)).reshape(out_f, n_units, u).any(dim=2)
        rows, units = kp.nonzero(as_tuple=True)  # row-major: sorted by row, then column
        values = wp[rows, units].contiguous()  # columns past `in` were zero-padded above
        counts = torch.bincount(rows, minlength=out_f)
        row_ptr = torch.zeros(out_f + 1, dtype=torch.int32, device=weight.device)
        row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
        return cls(values, (units * u).to(torch.int32), row_ptr, (out_f, in_f), tile)

    def stored_mask(self) -> torch.Tensor:
        """Bool ``[out, in]``: the entries this weight stores (its units), zeros included."""
        out_f, in_f = self.shape
        u = self.unit
        rp = self.row_ptr.to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(out_f, device=rp.device), rp[1:] - rp[:-1],
                                       output_size=self.col_indices.numel())
        m = torch.zeros(out_f, -(-in_f // u) * u, dtype=torch.bool, device=rp.device)
        cols = self.col_indices.to(torch.int64).unsqueeze(1) + torch.arange(u, device=rp.device)
        m[rows.unsqueeze(1).expand_as(cols), cols] = True
        return m[:, :in_f]

    def to_dense(self) -> torch.Tensor:
        """The logical ``[out, in]`` weight (zeros where units were dropped)."""
        out_f, in_f = self.shape
        u = self.unit
        rp = self.row_ptr.to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(out_f, device=rp.device), rp[1:] - rp[:-1],
                                       output_size=self.col_indices.numel())
        full = torch.zeros(out_f, -(-in_f // u) * u, dtype=self.dtype, device=self.device)
        cols = self.col_indices.to(torch.int64).unsqueeze(1) + torch.arange(u, device=rp.device)
        full[rows.unsqueeze(1).expand_as(cols), cols] = self.values
        return full[:, :in_f].contiguous()

    # ---- properties ------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        """Stored weight entries (units x unit width), zeros inside kept tiles included."""
        return int(self.values.numel())

    @property
    def density(self) -> float:
        """Stored entries / all entries: the fraction of dense MACs the kernel performs."""
        total = self.shape[0] * self.shape[1]
        return self.nnz / total if total else 0.0

    # ---- conversion / (de)serialisation ----------------------------------------------------------
    def to(self, device=None, dtype=None) -> "FineSparseWeight":
        """Moves/casts. A dtype change that changes the unit width (bf16 pairs) re-packs."""
        dtype = self.dtype if dtype is None else dtype
        if unit_width(self.tile, dtype) != self.unit or chunk_columns(dtype) != self.chunk_cols:
            keep = self.stored_mask()
            w = self.to_dense().to(device=device, dtype=dtype)
            return FineSparseWeight._from_keep(w, keep.to(w.device), self.tile)
        return FineSparseWeight(self.values.to(device=device, dtype=dtype), self.col_indices.to(device=device),
                                self.row_ptr.to(device=device), self.shape, self.tile)

    def to_tensors(self) -> Dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); ``seg_ptr`` is rebuilt on load."""
        return {
            "values": self.values,
            "col_indices": self.col_indices,
            "row_ptr": self.row_ptr,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "tile": torch.tensor([self.tile], dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, d: Dict[str, torch.Tensor]) -> "FineSparseWeight":
        """Inverse of :meth:`to_tensors`; validates every index (files are data)."""
        missing = {"values", "col_indices", "row_ptr", "shape", "tile"} - set(d)
        if missing:
            raise KernelError(f"FineSparseWeight.from_tensors: missing tensors {sorted(missing)}")
        shape = tuple(int(s) for s in d["shape"].tolist())
        if len(shape) != 2:
            raise KernelError(f"FineSparseWeight.from_tensors: shape must have 2 entries, got {shape}")
        return cls(d["values"], d["col_indices"], d["row_ptr"], shape, int(d["tile"].reshape(-1)[0]))

    def __repr__(self) -> str:
        return (f"FineSparseWeight(shape={self.shape}, tile=1x{self.tile}, unit={self.unit}, "
                f"nnz={self.nnz}, density={self.density:.3f}, dtype={self.dtype}, device={self.device})")
