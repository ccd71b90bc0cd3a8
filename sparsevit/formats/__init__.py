"""Packed weight layouts: block-sparse rows (:class:`BlockSparseWeight`) and N:M (:class:`NMSparseWeight`)."""
from sparsevit.formats.bsr import BlockSparseWeight, pack_values, packed_block_rows  # noqa: F401
from sparsevit.formats.nm import NMSparseWeight  # noqa: F401

__all__ = ["BlockSparseWeight", "NMSparseWeight", "pack_values", "packed_block_rows"]
