"""The C++ kernels' fused GELU epilogue (csrc/cpu/sparse_fine_simd.h, shared by the BSR and fine
kernels) against float64 torch on a dense grid with tails, +-inf, NaN and -0, at every ISA level.

The bounds are the errors of the previous formulation (Abramowitz-Stegun erf with a degree-6 exp
and add-then-multiply, measured by bench/gelu_accuracy.py on a 5x finer grid), so a cheaper one
may not be less accurate; the one exception is erf's |x| < 0.5, where the current kernels reach
8.7e-8 (AVX2) / 8.1e-8 (AVX-512) against 7.8e-8 / 8.0e-8 before: about 3 ulp of GELU(0.42)
either way, rounding luck of the ~1e-8 mean error. Past |x| ~ 5.7 the fp32 output is x or -0 exactly; the error there is the
rounding of x itself."""
import pytest
import torch
import torch.nn.functional as F

from sparsevit import _ext
from sparsevit.formats import BlockSparseWeight

needs_cpp = pytest.mark.skipif(not _ext.HAS_EXTENSION, reason=f"C++ extension not built: {_ext.LOAD_ERROR}")

# act code -> (torch's approximate, {x range: max abs error of the previous formulation, rounded up})
BOUNDS = {
    1: ("none", {(-12, -3): 2.6e-7, (-3, -0.5): 2.6e-7, (-0.5, 0.5): 9e-8, (0.5, 3): 4.6e-7, (3, 12.01): 4.7e-7}),
    2: ("tanh", {(-12, -3): 7.7e-8, (-3, -0.5): 5.7e-8, (-0.5, 0.5): 5e-8, (0.5, 3): 2.6e-7, (3, 12.01): 4.4e-7}),
}


def epilogue(values: torch.Tensor, act: int, isa: int) -> torch.Tensor:
    """act(values) from the kernel's epilogue: an all-zero weight with `values` as the bias."""
    n = values.numel()
    ws = BlockSparseWeight.from_dense(torch.zeros(n, 16, dtype=values.dtype), block=(16, 16))
    x = torch.ones(2, 16, dtype=values.dtype)
    return torch.ops.sparsevit_C.bsr_linear(x, ws.packed, ws.col_indices, ws.crow_indices, values.contiguous(),
                                            n, 16, 16, 16, act, isa)


@needs_cpp
@pytest.mark.parametrize("isa", [0, 1, 2])
@pytest.mark.parametrize("act", [1, 2])
def test_gelu_epilogue_dense_grid(isa, act):
    if not torch.ops.sparsevit_C.bsr_linear_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    approximate, bounds = BOUNDS[act]
    grid = torch.linspace(-12, 12, 96001, dtype=torch.float64).float()
    y = epilogue(grid, act, isa)
    assert torch.equal(y[0], y[1]), "every token row gets the same epilogue"
    err = (y[0].double() - F.gelu(grid.double(), approximate=approximate)).abs()
    for (lo, hi), bound in bounds.items():
        m = (grid >= lo) & (grid < hi)
        worst = err[m].argmax()
        assert err[m].max() <= bound, f"isa={isa} gelu={approximate}: |err| {err[m].max():.3e} > {bound:.1e} " \
                                      f"at x={grid[m][worst].item()!r} in [{lo},{hi})"


@needs_cpp
@pytest.mark.parametrize("isa", [0, 1, 2])
@pytest.mark.parametrize("act", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_epilogue_special_values(isa, act, dtype):
    """-0 stays -0, the saturated tails are exactly x and -0, +inf -> +inf, NaN and -inf -> NaN
    (as x Phi(x) computes in float64: -inf * 0)."""
    if not torch.ops.sparsevit_C.bsr_linear_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    approximate = BOUNDS[act][0]
    inf, nan = float("inf"), float("nan")
    v = torch.tensor([-0.0, 0.0, -1e30, -1e4, -60.0, -13.0, 13.0, 60.0, 1e4, 1e30, inf, -inf, nan, 1e-30, -1e-30],
                     dtype=dtype)
    y = epilogue(v, act, isa)[0]
    ref = F.gelu(v.double(), approximate=approximate)
    assert torch.equal(y.isnan(), ref.isnan()), f"{y} vs {ref}"
    fin = ref.isfinite()
    assert torch.equal(y[~fin & ~ref.isnan()].double(), ref[~fin & ~ref.isnan()])
    rtol = 8e-3 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(y[fin].double(), ref[fin], rtol=rtol, atol=1e-30, msg=f"{y[fin]} vs {ref[fin]}")
    zeros = v == 0
    assert torch.equal(torch.signbit(y[zeros]), torch.signbit(v[zeros])), "GELU(-0) is -0"
    assert torch.signbit(y[2]) and y[2] == 0, "the negative tail is -0"
