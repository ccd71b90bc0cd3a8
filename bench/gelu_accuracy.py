"""Error of the C++ kernels' fused GELU epilogue against float64 torch, on a dense grid.

The epilogue (csrc/cpu/sparse_fine_simd.h vgelu_erf / vgelu_tanh, shared by the BSR and fine
kernels) is reached through ``sparsevit_C.bsr_linear`` with an all-zero weight, so the output is
exactly act(bias). Reported per ISA level and GELU form: the largest absolute error by range of x
and the largest relative error where |GELU(x)| > 1e-6. In the negative tail, GELU(x) = x Phi(x) is a
difference of two near-equal numbers in any fp32 formulation, hence the large relative errors there.

    python bench/gelu_accuracy.py [--points 480001] [--limit 12]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsevit import _ext  # noqa: E402
from sparsevit.formats import BlockSparseWeight  # noqa: E402

RANGES = ((-12, -3), (-3, -0.5), (-0.5, 0.5), (0.5, 3), (3, 12))
APPROXIMATE = {1: "none", 2: "tanh"}  # the kernels' act codes


def epilogue(values: torch.Tensor, act: int, isa: int) -> torch.Tensor:
    """act(values) computed by the BSR kernel's epilogue (zero weight, values as the bias)."""
    n = values.numel()
    ws = BlockSparseWeight.from_dense(torch.zeros(n, 16, dtype=values.dtype), block=(16, 16))
    x = torch.ones(1, 16, dtype=values.dtype)
    return torch.ops.sparsevit_C.bsr_linear(x, ws.packed, ws.col_indices, ws.crow_indices, values.contiguous(),
                                            n, 16, 16, 16, act, isa)[0]


def error_table(points: int, limit: float) -> list:
    grid = torch.linspace(-limit, limit, points, dtype=torch.float64).float()
    rows = []
    for isa in (0, 1, 2):
        if not torch.ops.sparsevit_C.bsr_linear_isa(isa):
            continue
        for act, approximate in APPROXIMATE.items():
            y = epilogue(grid, act, isa).double()
            ref = F.gelu(grid.double(), approximate=approximate)
            err = (y - ref).abs()
            rel = err / ref.abs().clamp_min(1e-30)
            row = {"isa": torch.ops.sparsevit_C.bsr_linear_isa(isa), "gelu": approximate}
            for lo, hi in RANGES:
                m = (grid >= lo) & (grid < hi)
                row[f"[{lo},{hi})"] = (err[m].max().item(), rel[m & (ref.abs() > 1e-6)].max().item())
            rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", type=int, default=480001)
    p.add_argument("--limit", type=float, default=12.0)
    args = p.parse_args()
    if not _ext.HAS_EXTENSION:
        sys.exit(f"the C++ extension did not load: {_ext.LOAD_ERROR}")
    for row in error_table(args.points, args.limit):
        cells = [f"{k} abs {a:.2e} rel {r:.2e}" for k, (a, r) in ((k, v) for k, v in row.items() if k.startswith("["))]
        print(f"{row['isa']:>12} gelu={row['gelu']:<5} " + " | ".join(cells))


if __name__ == "__main__":
    main()
