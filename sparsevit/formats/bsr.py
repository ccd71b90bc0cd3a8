"""Block-compressed sparse rows (BSR) for the weight of a Linear layer.

``W[out, in]`` (same orientation as ``nn.Linear.weight``) is cut into ``bh x bw`` blocks; every block
holding a nonzero (or a True mask entry) is kept whole. Canonical fields, read by all kernels (C++,
Triton, CUDA):

* ``values``        ``[nnz_blocks, bh, bw]`` in the weight dtype,
* ``col_indices``   int32 ``[nnz_blocks]`` block column of each kept block, sorted within a block row,
* ``crow_indices``  int32 ``[n_block_rows + 1]`` offsets of each block row into ``values``.

Alongside them sits ``packed``, the CPU kernels' layout chosen at pack time: each block transposed so
that one vector load covers consecutive *output rows* at a fixed input column (the C++ micro-kernel
keeps a [tokens x rows] tile of accumulators in registers and broadcasts activations):

* fp32 / other: ``[nnz, bw, BHP, 1]``
* bf16:         ``[nnz, ceil(bw/2), BHP, 2]`` -- input-column pairs interleaved for ``vdpbf16ps``

with ``BHP = packed_block_rows(bh)`` (rows zero-padded to a multiple of 16, or to 1/2/4/8 for short
blocks). Rows/columns that are not multiples of the block are zero-padded inside the last blocks;
the logical ``shape`` is kept and padding never reaches a result.
"""
from typing import Dict, Optional, Tuple

import torch

__all__ = ["BlockSparseWeight", "packed_block_rows", "pack_values", "bsr_to_dense", "check_bsr_indices", "tiles"]


def packed_block_rows(bh: int) -> int:
    """Rows of a packed block: what the C++ kernels vectorise over (must match bsr_linear.cpp)."""
    if bh <= 8:
        p = 1
        while p < bh:
            p *= 2
        return p
    return (bh + 15) // 16 * 16


def pack_values(values: torch.Tensor) -> torch.Tensor:
    """``[nnz, bh, bw]`` blocks -> the CPU kernel layout described in the module docstring."""
    nnz, bh, bw = values.shape
    bhp = packed_block_rows(bh)
    vt = values.transpose(1, 2)  # [nnz, bw, bh]
    if bhp != bh:
        vt = torch.nn.functional.pad(vt, (0, bhp - bh))
    if values.dtype == torch.bfloat16:
        if bw % 2:
            vt = torch.nn.functional.pad(vt, (0, 0, 0, 1))
        # [nnz, bw2, bhp] -> [nnz, bw2/2, 2, bhp] -> [nnz, bw2/2, bhp, 2]
        return vt.reshape(nnz, vt.shape[1] // 2, 2, bhp).transpose(2, 3).contiguous()
    return vt.reshape(nnz, bw, bhp, 1).contiguous()


def _check_block(block) -> Tuple[int, int]:
    if isinstance(block, int):
        block = (block, block)
    try:
        bh, bw = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"block must be (bh, bw) with 1 <= bh, bw <= 64, got {block!r}") from None
    if not (1 <= bh <= 64 and 1 <= bw <= 64):
        raise ValueError(f"block must be (bh, bw) with 1 <= bh, bw <= 64, got {block}")
    return bh, bw


def tiles(t: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """``[nbr, nbc, bh, bw]`` view of the ``[out, in]`` matrix ``t`` cut into ``block`` tiles, the
    ragged edge zero-padded (False for a boolean ``t``). The one tiling helper of the package."""
    bh, bw = block
    out_f, in_f = t.shape
    nbr, nbc = -(-out_f // bh), -(-in_f // bw)
    padded = torch.nn.functional.pad(t, (0, nbc * bw - in_f, 0, nbr * bh - out_f))
    return padded.reshape(nbr, bh, nbc, bw).transpose(1, 2)


def bsr_to_dense(values: torch.Tensor, col_indices: torch.Tensor, crow_indices: torch.Tensor,
                 shape: Tuple[int, int]) -> torch.Tensor:
    """The logical ``[out, in]`` matrix of BSR tensors (zeros where blocks were dropped, the padding
    of the ragged edge cut off). The one place that rebuilds a dense weight from BSR."""
    out_f, in_f = shape
    nnz, bh, bw = values.shape
    nbr, nbc = -(-out_f // bh), -(-in_f // bw)
    rows = torch.repeat_interleave(torch.arange(nbr, device=values.device),
                                   (crow_indices[1:] - crow_indices[:-1]).long(), output_size=nnz)
    full = values.new_zeros(nbr, nbc, bh, bw)
    full[rows, col_indices.long()] = values
    return full.transpose(1, 2).reshape(nbr * bh, nbc * bw)[:out_f, :in_f]


def check_bsr_indices(values: torch.Tensor, col_indices: torch.Tensor, crow_indices: torch.Tensor,
                      shape: Tuple[int, int], block: Tuple[int, int]) -> None:
    """Raises ``ValueError`` naming the first problem unless the BSR tensors describe a valid
    ``shape`` matrix of ``block`` tiles: ``values`` ``[nnz, bh, bw]`` floating point; integer
    ``crow_indices`` of ``n_block_rows + 1`` entries starting at 0, never decreasing, ending at
    ``nnz``; integer ``col_indices`` of ``nnz`` entries in ``[0, n_block_cols)``, strictly increasing
    within a block row. Tensors on the meta device are checked for shapes only."""
    bh, bw = block
    out_f, in_f = shape
    nbr, nbc = -(-out_f // bh), -(-in_f // bw)
    if values.dim() != 3 or tuple(values.shape[1:]) != (bh, bw) or not values.is_floating_point():
        raise ValueError(f"values must be a floating-point [nnz, {bh}, {bw}] tensor, got {values.dtype} "
                         f"{tuple(values.shape)}")
    for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    nnz = values.shape[0]
    if crow_indices.numel() != nbr + 1:
        raise ValueError(f"crow_indices must have {nbr + 1} entries for {out_f} rows and bh={bh}, "
                         f"got {crow_indices.numel()}")
    if col_indices.numel() != nnz:
        raise ValueError(f"col_indices has {col_indices.numel()} entries but values has {nnz} blocks")
    if values.device.type == "meta":
        return
    crow, col = crow_indices.long().cpu(), col_indices.long().cpu()
    if int(crow[0]) != 0 or int(crow[-1]) != nnz:
        raise ValueError(f"crow_indices must start at 0 and end at nnz={nnz}, got {int(crow[0])} ... {int(crow[-1])}")
    steps = crow[1:] - crow[:-1]
    if bool((steps < 0).any()):
        raise ValueError(f"crow_indices decreases at block row {int((steps < 0).nonzero()[0])}")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= nbc):
        raise ValueError(f"col_indices out of range: values in [{int(col.min())}, {int(col.max())}], "
                         f"block columns are [0, {nbc})")
    rows = torch.repeat_interleave(torch.arange(nbr), steps, output_size=nnz)
    same_row = rows[1:] == rows[:-1]
    if bool((same_row & (col[1:] <= col[:-1])).any()):
        raise ValueError("col_indices must be strictly increasing within each block row (sorted, no duplicates)")


class BlockSparseWeight:
    """A block-sparse ``[out, in]`` weight. Build with :meth:`from_dense`; see the module docstring.

    The constructor checks the indices (:func:`check_bsr_indices`) and raises ``ValueError`` on a
    corrupt weight; ``checked=False`` skips that for tensors that were checked already.
    """

    def __init__(self, values: torch.Tensor, col_indices: torch.Tensor, crow_indices: torch.Tensor,
                 shape: Tuple[int, int], block: Tuple[int, int], packed: Optional[torch.Tensor] = None,
                 checked: bool = True):
        bh, bw = _check_block(block)
        out_f, in_f = (int(s) for s in shape)
        if checked:
            if out_f < 0 or in_f < 0:
                raise ValueError(f"shape must be (out_features, in_features) >= 0, got {shape}")
            check_bsr_indices(values, col_indices, crow_indices, (out_f, in_f), (bh, bw))
        self.values = values
        self.col_indices = col_indices.to(torch.int32)
        self.crow_indices = crow_indices.to(torch.int32)
        self.shape = (out_f, in_f)
        self.block = (bh, bw)
        self.packed = pack_values(values) if packed is None else packed

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: torch.Tensor, block=(32, 32), mask: Optional[torch.Tensor] = None
                   ) -> "BlockSparseWeight":
        """Packs ``dense * mask``; keeps every block with a nonzero (or, with ``mask``, a True entry).

        ``to_dense()`` reproduces ``dense * mask`` exactly. ``block`` may be non-square and need not
        divide the shape (edges are zero-padded inside the last blocks).
        """
        if dense.dim() != 2:
            raise ValueError(f"dense weight must be 2-D [out, in], got shape {tuple(dense.shape)}")
        bh, bw = _check_block(block)
        out_f, in_f = dense.shape
        if mask is not None:
            if tuple(mask.shape) != tuple(dense.shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(dense.shape)}")
            keep = (mask != 0).to(dense.device)
            dense = dense * mask.to(device=dense.device, dtype=dense.dtype)
        else:
            keep = dense != 0
        nbr = -(-out_f // bh)
        blocks = tiles(dense, (bh, bw))
        kb = tiles(keep, (bh, bw)).any(dim=3).any(dim=2)
        rows, cols = kb.nonzero(as_tuple=True)  # row-major order: sorted by row, then column
        values = blocks[rows, cols].contiguous()
        counts = torch.bincount(rows, minlength=nbr)
        crow = torch.zeros(nbr + 1, dtype=torch.int32, device=dense.device)
        crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
        return cls(values, cols.to(torch.int32), crow, (out_f, in_f), (bh, bw), checked=False)

    def to_dense(self) -> torch.Tensor:
        """The logical ``[out, in]`` weight (zeros where blocks were dropped)."""
        return bsr_to_dense(self.values, self.col_indices, self.crow_indices, self.shape).contiguous()

    # ---- properties ------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_block_rows(self) -> int:
        return -(-self.shape[0] // self.block[0])

    @property
    def n_block_cols(self) -> int:
        return -(-self.shape[1] // self.block[1])

    @property
    def density(self) -> float:
        """Kept blocks / all blocks."""
        total = self.n_block_rows * self.n_block_cols
        return self.nnz_blocks / total if total else 0.0

    # ---- conversion / (de)serialisation ----------------------------------------------------------
    def to(self, device=None, dtype=None) -> "BlockSparseWeight":
        """Moves/casts; the packed layout is rebuilt when the dtype changes (bf16 packs k pairs)."""
        values = self.values.to(device=device, dtype=dtype)
        packed = None if values.dtype != self.dtype else self.packed.to(device=device)
        return BlockSparseWeight(values, self.col_indices.to(device=device),
                                 self.crow_indices.to(device=device), self.shape, self.block, packed,
                                 checked=False)

    def to_tensors(self) -> Dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); the packed layout is rebuilt on load."""
        return {
            "values": self.values,
            "col_indices": self.col_indices,
            "crow_indices": self.crow_indices,
            "shape": torch.tensor(self.shape, dtype=torch.int64),
            "block": torch.tensor(self.block, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, d: Dict[str, torch.Tensor]) -> "BlockSparseWeight":
        shape = tuple(int(s) for s in d["shape"].tolist())
        block = tuple(int(b) for b in d["block"].tolist())
        return cls(d["values"], d["col_indices"], d["crow_indices"], shape, block)

    def __repr__(self) -> str:
        return (f"BlockSparseWeight(shape={self.shape}, block={self.block[0]}x{self.block[1]}, "
                f"nnz_blocks={self.nnz_blocks}, density={self.density:.3f}, dtype={self.dtype}, "
                f"device={self.device})")
