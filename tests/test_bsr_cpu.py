"""sparsevit::bsr_linear on CPU: C++ kernel (every ISA level this CPU has) and reference, against
float64. The fast kernel's error must stay within 2x of dense torch's error in the same dtype."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_ref

from sparsevit import _ext
from sparsevit.formats import BlockSparseWeight
from sparsevit.ops.bsr import bsr_linear, reference_bsr_linear

HAS_CPP = _ext.has_op("bsr_linear")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension not built: {_ext.unavailable_reason('bsr_linear')}")
ACTS = [None, "gelu", "gelu_tanh"]
ACT_CODE = {None: 0, "gelu": 1, "gelu_tanh": 2}
BLOCKS = [(32, 32), (16, 16), (64, 64), (1, 8), (24, 40), (3, 5), (48, 8), (8, 16)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(T, out_f, in_f, block, dtype, bias, density=0.3, seed=0):
    g = _gen(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mask = torch.rand(out_f, in_f, generator=g) < density
    x = torch.randn(T, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    ws = BlockSparseWeight.from_dense(w.to(dtype), block=block, mask=mask)
    return x, ws, b


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", BLOCKS)
def test_cpp_matches_float64(dtype, block):
    for T, out_f, in_f in [(197, 200, 300), (7, 48, 64)]:
        for bias in (False, True):
            x, ws, b = _case(T, out_f, in_f, block, dtype, bias)
            for act in ACTS:
                y = bsr_linear(x, ws, b, act)
                assert y.dtype == dtype and y.shape == (T, out_f)
                assert_close_to_ref(y, x, ws, b, act, f"{dtype} {block} T={T} bias={bias} act={act}")


@needs_cpp
@pytest.mark.parametrize("isa", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_every_isa_level(isa, dtype):
    """AVX2 and AVX-512 (bf16 widened or vdpbf16ps) builds all run where the CPU has them."""
    if not torch.ops.sparsevit_C.bsr_linear_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    for block in [(32, 32), (16, 16), (64, 64), (1, 8), (8, 16), (20, 6)]:
        x, ws, b = _case(45, 100, 70, block, dtype, True, seed=3)
        for act in ACTS:
            y = torch.ops.sparsevit_C.bsr_linear(x, ws.packed, ws.col_indices, ws.crow_indices, b, 100, 70,
                                                 block[0], block[1], ACT_CODE[act], isa)
            assert_close_to_ref(y, x, ws, b, act, f"isa={isa} {dtype} {block} act={act}")


@needs_cpp
def test_cpp_edge_cases():
    # no kept block at all: bias (+ activation) only
    w = torch.zeros(40, 50)
    ws = BlockSparseWeight.from_dense(w, block=(16, 16))
    b = torch.randn(40)
    x = torch.randn(9, 50)
    torch.testing.assert_close(bsr_linear(x, ws, b, "gelu"), F.gelu(b).expand(9, 40))
    # strided rows (a column slice of a wider tensor), leading dims, one token, many threads' worth
    x_big = torch.randn(3, 11, 130)
    x = x_big[..., :100]
    x, ws, b = x, *_case(1, 64, 100, (32, 32), torch.float32, True)[1:]
    y = bsr_linear(x, ws, b)
    assert_close_to_ref(y.reshape(-1, 64), x.reshape(-1, 100), ws, b, None, "strided x")
    # a 4 KiB row stride (1024 fp32) aliases in L1: the kernel reads a re-strided copy
    xa, wa, ba = _case(40, 48, 1024, (16, 16), torch.float32, True)
    assert_close_to_ref(bsr_linear(xa, wa, ba, "gelu"), xa, wa, ba, "gelu", "aliasing stride")
    x1 = torch.randn(1, 100)
    assert_close_to_ref(bsr_linear(x1, ws, b), x1, ws, b, None, "one token")
    # whatever lies past the end of a row (here inf) must not leak through padded block columns
    for dtype, block in [(torch.float32, (32, 32)), (torch.bfloat16, (16, 15)), (torch.bfloat16, (16, 9))]:
        xs, ws2, _ = _case(20, 33, 45, block, dtype, False)
        wide = torch.full((20, 64), float("inf"), dtype=dtype)
        wide[:, :45] = xs
        y = bsr_linear(wide[:, :45], ws2)
        assert torch.isfinite(y).all(), f"padding leaked inf for {dtype} {block}"
        assert_close_to_ref(y, xs, ws2, None, None, f"padded {dtype} {block}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_matches_float64(dtype):
    x, ws, b = _case(33, 70, 90, (16, 32), dtype, True)
    for act in ACTS:
        assert_close_to_ref(reference_bsr_linear(x, ws, b, act), x, ws, b, act, f"reference {dtype} {act}")
    # float64 has no C++ kernel: the op falls back to the reference
    if dtype == torch.float64:
        torch.testing.assert_close(bsr_linear(x, ws, b, "gelu"), reference_bsr_linear(x, ws, b, "gelu"))


def test_wrapper_errors():
    x, ws, b = _case(5, 32, 64, (16, 16), torch.float32, True)
    with pytest.raises(ValueError, match="in_features=64"):
        bsr_linear(torch.randn(5, 63), ws)
    with pytest.raises(TypeError, match="w.to\\(dtype"):
        bsr_linear(x.double(), ws)
    with pytest.raises(ValueError, match="activation"):
        bsr_linear(x, ws, activation="relu")
    with pytest.raises(ValueError, match="bias must have shape"):
        bsr_linear(x, ws, torch.randn(31))
    with pytest.raises(ValueError, match="move one of them"):
        bsr_linear(x.to("meta"), ws)
    with pytest.raises(TypeError, match="BlockSparseWeight"):
        bsr_linear(x, ws.to_dense())


def _op_args(dtype=torch.float32):
    x, ws, b = _case(19, 40, 72, (16, 24), dtype, True)
    return (x, ws.values, ws.col_indices, ws.crow_indices, ws.packed, 40, 72, 16, 24, b, "gelu", "auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    torch.library.opcheck(torch.ops.sparsevit.bsr_linear.default, _op_args(dtype))


def test_under_torch_compile():
    x, ws, b = _case(13, 40, 64, (16, 16), torch.float32, True)

    def f(x):
        return bsr_linear(x * 2.0, ws, b, "gelu_tanh") + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


def _full_rows_case(T, out_f, in_f, block, dtype, seed):
    """Every block kept except block column 1 in odd block rows: rows of ~in_f/bw blocks, so the
    kernel's register accumulators spill to the L1 tile several times (every 128 columns)."""
    g = _gen(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mask = torch.ones(out_f, in_f, dtype=torch.bool)
    for r in range(1, -(-out_f // block[0]), 2):
        mask[r * block[0]:(r + 1) * block[0], block[1]:2 * block[1]] = False
    x = torch.randn(T, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype)
    return x, BlockSparseWeight.from_dense(w.to(dtype), block=block, mask=mask), b


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f", [128, 160, 300, 1000])
def test_cpp_long_rows_spill_to_tile(dtype, in_f):
    """Rows of exactly 4 blocks (128 columns: no spill), 5, ~10 and ~32 blocks (K not a multiple of
    the 128-column interval, padded last block), with bias and both GELUs, a partial token tile."""
    for block in [(32, 32), (16, 16), (64, 64)]:
        x, ws, b = _full_rows_case(29, 70, in_f, block, dtype, seed=in_f)
        for act in ACTS:
            assert_close_to_ref(bsr_linear(x, ws, b, act), x, ws, b, act, f"{dtype} K={in_f} {block} {act}")


@needs_cpp
@pytest.mark.parametrize("isa", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_nonfinite_read_and_unread_columns(isa, dtype):
    """The kernels flag tokens whose outputs are not finite; block columns no kept block reads are
    scanned apart. Both kinds of column, in full and partial token tiles, match dense float64."""
    if not torch.ops.sparsevit_C.bsr_linear_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    for block in [(32, 32), (16, 16), (1, 8)]:
        g = _gen(7)
        out_f, in_f = 70, 4 * block[1] + 5
        w = torch.randn(out_f, in_f, generator=g)
        keep = torch.rand(-(-out_f // block[0]), -(-in_f // block[1]), generator=g) < 0.5
        keep[:, 2] = False  # block column 2 is read by no kept block
        keep[0, 0] = True
        mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out_f, :in_f]
        ws = BlockSparseWeight.from_dense(w.to(dtype), block=block, mask=mask)
        x = torch.randn(50, in_f, generator=g).to(dtype)
        x[3, 1] = float("nan")                    # read column
        x[17, 2 * block[1] + 1] = float("inf")    # unread column
        x[49, 0] = -float("inf")                  # read column, last (partial) tile
        x[30, :] = float("nan")
        y = torch.ops.sparsevit_C.bsr_linear(x, ws.packed, ws.col_indices, ws.crow_indices, None, out_f, in_f,
                                             block[0], block[1], 0, isa).double()
        ref = F.linear(x.double(), ws.to_dense().double())
        what = f"isa={isa} {dtype} {block}"
        assert torch.equal(y.isnan(), ref.isnan()), f"{what}: NaN pattern differs"
        assert torch.equal(y.isinf(), ref.isinf()), f"{what}: Inf pattern differs"
        fin = ref.isfinite()
        torch.testing.assert_close(y[fin], ref[fin], rtol=2e-2, atol=2e-2)


@needs_cpp
def test_cpp_overflow_is_not_mistaken_for_nonfinite_input():
    """Finite inputs whose sums overflow raise the kernel's non-finite flag: the output must stay
    what dense gives (+inf where blocks are kept, the bias elsewhere), not NaN."""
    g = _gen(5)
    w = torch.rand(64, 96, generator=g) + 0.5
    mask = torch.zeros(64, 96, dtype=torch.bool)
    mask[:32, :32] = True
    ws = BlockSparseWeight.from_dense(w, block=(32, 32), mask=mask)
    x = torch.full((13, 96), 3e37)
    b = torch.randn(64, generator=g)
    y = bsr_linear(x, ws, b)
    ref = F.linear(x.double(), ws.to_dense().double(), b.double()).float()
    torch.testing.assert_close(y, ref)
    assert torch.isinf(y[:, :32]).all() and torch.isfinite(y[:, 32:]).all()


class _threads:
    """torch's intra-op thread count set for a block (the work split depends on it)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


# (tokens, out, in, block) of structurally sliced layers: in % bw != 0 (the kernel stops at the end
# of each row of x, read in place), out % bh != 0 (partial last block row), 1 / 197 / odd tokens.
SLICED = [(197, 384, 770, (32, 32)), (1, 753, 384, (32, 32)), (23, 40, 753, (16, 16)), (197, 776, 40, (32, 32)),
          (30, 96, 753, (16, 15)), (5, 50, 41, (16, 9))]


@needs_cpp
@pytest.mark.parametrize("isa", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_sliced_widths_in_place_every_split(isa, dtype):
    """Odd widths of sliced layers at 1, 2 and 3 threads (token tiles x block rows split), bias and
    both GELUs, x a column slice of a wider tensor holding inf past each row's end (nothing past the
    row's last column may be read)."""
    if not torch.ops.sparsevit_C.bsr_linear_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    for T, out_f, in_f, block in SLICED:
        x, ws, b = _case(T, out_f, in_f, block, dtype, True, density=0.4, seed=T + in_f)
        wide = torch.full((T, in_f + 7), float("inf"), dtype=dtype)
        wide[:, :in_f] = x
        for nth in (1, 2, 3):
            with _threads(nth):
                for act in ACTS:
                    y = torch.ops.sparsevit_C.bsr_linear(wide[:, :in_f], ws.packed, ws.col_indices, ws.crow_indices,
                                                         b, out_f, in_f, block[0], block[1], ACT_CODE[act], isa)
                    assert_close_to_ref(y, x, ws, b, act, f"isa={isa} {dtype} {T}x{in_f}->{out_f} {block} "
                                                          f"threads={nth} act={act}")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_work_split_many_tiles_and_large_weight(dtype):
    """Many token tiles (1579 tokens: runs of tiles per unit) on a sliced fc1, and a weight past the
    L2 budget (full 1536x768: split over block rows first), at 2 and 3 threads."""
    cases = [(1579, 753, 384, (32, 32), 0.3), (45, 1536, 768, (32, 32), 1.0)]
    for T, out_f, in_f, block, density in cases:
        x, ws, b = _case(T, out_f, in_f, block, dtype, True, density=density, seed=11)
        for nth in (2, 3):
            with _threads(nth):
                y = bsr_linear(x, ws, b, "gelu")
            assert_close_to_ref(y, x, ws, b, "gelu", f"{dtype} {T}x{in_f}->{out_f} threads={nth}")


@needs_cpp
@pytest.mark.parametrize("isa", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_gelu_extremes(isa, dtype):
    """Both GELUs of the fused epilogue over their whole range (saturated tails, huge values,
    +-inf, NaN) against float64 torch: no kept block, so the output is act(bias)."""
    if not torch.ops.sparsevit_C.bsr_linear_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    b = torch.tensor([-1e30, -50, -9.5, -4.1, -3.9, -1.0, -0.0, 0.3, 3.9, 4.1, 9.5, 50, 1e30, float("inf"),
                      -float("inf"), float("nan"), -13.0, 2.5]).to(dtype)
    ws = BlockSparseWeight.from_dense(torch.zeros(18, 20, dtype=dtype), block=(16, 16))
    x = torch.randn(3, 20).to(dtype)
    for act, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
        y = torch.ops.sparsevit_C.bsr_linear(x, ws.packed, ws.col_indices, ws.crow_indices, b, 18, 20, 16, 16,
                                             ACT_CODE[act], isa).double()
        ref = F.gelu(b.double(), approximate=approximate).expand(3, 18)
        assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf()), f"{act}: {y[0]} vs {ref[0]}"
        fin = ref.isfinite()
        rtol = 1e-2 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(y[fin], ref[fin], rtol=rtol, atol=2e-7, msg=f"isa={isa} {dtype} {act}")


@needs_cpp
@pytest.mark.parametrize("isa", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_last_token_tile_every_fill(isa, dtype):
    """Every fill of the last token tile (kernel A has a half-width variant for a last tile at most
    half full), NaN / Inf tokens inside it, 1 and 2 threads, against float64. in=1000 puts a token
    tile past the L1 budget (activations prefetched in every block row); in=200 stays below it."""
    if not torch.ops.sparsevit_C.bsr_linear_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    for in_f, block in [(200, (32, 32)), (1000, (32, 32)), (200, (16, 16))]:
        for T in range(24, 37):
            x, ws, b = _case(T, 70, in_f, block, dtype, True, density=0.4, seed=T)
            x[T - 1, 5] = float("nan")
            x[T - 2, in_f - 1] = float("inf") if T % 2 else -float("inf")
            ref = F.linear(x.double(), ws.to_dense().double(), b.double())
            for nth in (1, 2):
                with _threads(nth):
                    y = torch.ops.sparsevit_C.bsr_linear(x, ws.packed, ws.col_indices, ws.crow_indices, b, 70, in_f,
                                                         block[0], block[1], 0, isa)
                what = f"isa={isa} {dtype} T={T} in={in_f} {block} threads={nth}"
                assert torch.equal(y.isnan(), ref.isnan()), f"{what}: NaN pattern differs"
                assert torch.equal(y.isinf(), ref.isinf()), f"{what}: Inf pattern differs"
                assert_close_to_ref(y[: T - 2], x[: T - 2], ws, b, None, what)  # the finite tokens
