"""Packed weight layouts: block-sparse rows (:class:`BlockSparseWeight`) and N:M (:class:`NMSparseWeight`).

Format strings
--------------
Every place that names the storage format of one Linear (the per-layer report's ``fmt``, the
``formats=`` argument of the runtime's ``LinearFactory``, saved models) uses this grammar:

* ``"dense"``          the masked weight as a plain ``[out, in]`` matrix;
* ``"bsr:BHxBW"``      block-sparse rows with ``BH x BW`` tiles, ``1 <= BH, BW <= 64`` (``"bsr:32x32"``);
* ``"N:M"``            at most ``N`` of every ``M`` consecutive input weights kept (``"2:4"``);
* ``"fine:1xT"``       fine-grained rows (:class:`~sparsevit.formats.fine.FineSparseWeight`) with
  ``1 x T`` mask tiles along the input dim, ``T`` in 1, 4, 8 (``"fine:1x1"`` is unstructured).

:func:`parse_format` turns a string into ``("dense", None)``, ``("bsr", (bh, bw))``,
``("nm", (n, m))`` or ``("fine", (1, t))`` and raises ``ValueError`` naming the grammar for anything else;
:func:`format_string` is its inverse.
"""
import re
from typing import Optional, Tuple

from sparsevit.formats.bsr import (BlockSparseWeight, bsr_to_dense, check_bsr_indices, pack_values,  # noqa: F401
                                  packed_block_rows, tiles)
from sparsevit.formats.fine import TILES as FINE_TILES, FineSparseWeight  # noqa: F401
from sparsevit.formats.nm import NMSparseWeight  # noqa: F401

__all__ = ["BlockSparseWeight", "NMSparseWeight", "FineSparseWeight", "FINE_TILES", "pack_values", "packed_block_rows",
           "bsr_to_dense", "check_bsr_indices", "tiles", "parse_format", "format_string"]

_GRAMMAR = ("'dense', 'bsr:BHxBW' (e.g. 'bsr:32x32', sides 1..64), 'N:M' (e.g. '2:4') or 'fine:1xT' "
            "(T in 1, 4, 8, e.g. 'fine:1x1')")


def parse_format(fmt: str) -> Tuple[str, Optional[Tuple[int, int]]]:
    """``"dense"`` -> ``("dense", None)``, ``"bsr:32x16"`` -> ``("bsr", (32, 16))``, ``"2:4"`` -> ``("nm", (2, 4))``,
    ``"fine:1x4"`` -> ``("fine", (1, 4))``."""
    if not isinstance(fmt, str):
        raise ValueError(f"weight format must be a string, one of {_GRAMMAR}; got {fmt!r}")
    s = fmt.strip().lower()
    if s == "dense":
        return "dense", None
    m = re.fullmatch(r"bsr:(\d+)x(\d+)", s)
    if m:
        bh, bw = int(m.group(1)), int(m.group(2))
        if 1 <= bh <= 64 and 1 <= bw <= 64:
            return "bsr", (bh, bw)
    m = re.fullmatch(r"fine:1x(\d+)", s)
    if m and int(m.group(1)) in FINE_TILES:
        return "fine", (1, int(m.group(1)))
    m = re.fullmatch(r"(\d+):(\d+)", s)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if 0 < n <= mm <= 255:
            return "nm", (n, mm)
    raise ValueError(f"unknown weight format {fmt!r}; use {_GRAMMAR}")


def format_string(kind: str, params: Optional[Tuple[int, int]] = None) -> str:
    """Inverse of :func:`parse_format`."""
    if kind == "dense":
        return "dense"
    if kind == "bsr":
        return f"bsr:{params[0]}x{params[1]}"
    if kind == "nm":
        return f"{params[0]}:{params[1]}"
    if kind == "fine":
        return f"fine:1x{params[-1]}"
    raise ValueError(f"unknown format kind {kind!r} (dense, bsr, nm, fine)")
