"""sparsevit::fine_linear (unstructured / 1x4 / 1x8 sparse weights) on CPU: the packed format, the C++
kernel at every ISA level this CPU has and the reference path, against float64. The fast kernel's
error must stay within 2x of dense torch's error in the same dtype (plus one ulp of the output)."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_ref

from sparsevit import _ext
from sparsevit.errors import KernelError
from sparsevit.formats.fine import FineSparseWeight
from sparsevit.ops.bsr import apply_activation
from sparsevit.ops.fine_linear import fine_linear, not_supported_reasons, reference_fine_linear

HAS_CPP = _ext.has_op("fine_linear")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension: {_ext.unavailable_reason('fine_linear')}")
ACTS = [None, "gelu", "gelu_tanh"]
ACT_CODE = {None: 0, "gelu": 1, "gelu_tanh": 2}
DTYPES = [torch.float32, torch.bfloat16]


def _mask(out_f, in_f, tile, sparsity, g):
    n_tiles = -(-in_f // tile)
    keep = torch.rand(out_f, n_tiles, generator=g) >= sparsity
    return keep.repeat_interleave(tile, dim=1)[:, :in_f]


def _case(T, out_f, in_f, tile, sparsity, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mask = _mask(out_f, in_f, tile, sparsity, g)
    x = torch.randn(T, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    return x, FineSparseWeight.from_dense(w.to(dtype), mask, tile=tile), b


# ---- format -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", [1, 4, 8])
def test_format_round_trip(dtype, tile):
    x, fw, _ = _case(1, 37, 53, tile, 0.7, dtype, False)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 53, generator=g).to(dtype)
    mask = _mask(37, 53, tile, 0.7, g)
    fw = FineSparseWeight.from_dense(w, mask, tile=tile)
    assert torch.equal(fw.to_dense(), w * mask.to(dtype))
    assert fw.unit == (2 if (tile == 1 and dtype == torch.bfloat16) else tile)
    back = FineSparseWeight.from_tensors(fw.to_tensors())
    assert torch.equal(back.to_dense(), fw.to_dense()) and torch.equal(back.seg_ptr, fw.seg_ptr)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    conv = fw.to(dtype=other)
    assert torch.equal(conv.to_dense(), fw.to_dense().to(other))
    assert bool(conv.stored_mask()[fw.stored_mask()].all())  # every stored entry survives the re-pack


def test_format_rejects_bad_indices():
    _, fw, _ = _case(1, 10, 40, 4, 0.5, torch.float32, False)
    d = fw.to_tensors()
    bad_col = dict(d, col_indices=d["col_indices"].clone())
    bad_col["col_indices"][0] = 40
    with pytest.raises(KernelError, match="outside"):
        FineSparseWeight.from_tensors(bad_col)
    odd = dict(d, col_indices=d["col_indices"].clone())
    odd["col_indices"][0] += 1  # not a multiple of the unit width 4
    with pytest.raises(KernelError, match="multiple"):
        FineSparseWeight.from_tensors(odd)
    rows = fw.row_ptr.tolist()
    r = next(i for i in range(10) if rows[i + 1] - rows[i] >= 2)
    unsorted = dict(d, col_indices=d["col_indices"].clone())
    unsorted["col_indices"][rows[r]], unsorted["col_indices"][rows[r] + 1] = (
        d["col_indices"][rows[r] + 1], d["col_indices"][rows[r]])
    with pytest.raises(KernelError, match="strictly increase"):
        FineSparseWeight.from_tensors(unsorted)
    rp = dict(d, row_ptr=d["row_ptr"].clone())
    rp["row_ptr"][-1] += 1
    with pytest.raises(KernelError, match="row_ptr"):
        FineSparseWeight.from_tensors(rp)
    with pytest.raises(KernelError, match="int32"):
        FineSparseWeight.from_tensors(dict(d, col_indices=d["col_indices"].long()))
    with pytest.raises(KernelError, match="missing"):
        FineSparseWeight.from_tensors({k: v for k, v in d.items() if k != "row_ptr"})
    with pytest.raises(ValueError, match="tile"):
        FineSparseWeight.from_dense(torch.randn(4, 8), tile=2)


@needs_cpp
def test_cpp_rejects_corrupt_segments():
    x, fw, _ = _case(3, 10, 40, 1, 0.5, torch.float32, False)
    seg = fw.seg_ptr.clone()
    seg[3, 1] = fw.values.shape[0] + 5
    with pytest.raises(RuntimeError, match="seg_ptr"):
        torch.ops.sparsevit_C.fine_linear(x, fw.values, fw.col_indices, seg, None, 10, 40, 1, 0, -1)
    with pytest.raises(RuntimeError, match="even unit"):
        xb = x.bfloat16()
        torch.ops.sparsevit_C.fine_linear(xb, fw.values.bfloat16(), fw.col_indices, fw.seg_ptr, None, 10, 40,
                                          1, 0, -1)


# ---- kernel against float64 ---------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", [1, 4, 8])
@pytest.mark.parametrize("sparsity", [0.6, 0.9, 0.95])
def test_matches_float64(dtype, tile, sparsity):
    for T, out_f, in_f in [(1, 37, 53), (5, 37, 53), (33, 37, 53), (70, 45, 300)]:
        for bias in (False, True):
            x, fw, b = _case(T, out_f, in_f, tile, sparsity, dtype, bias, seed=T)
            for act in ACTS:
                y = fine_linear(x, fw, b, act)
                assert y.dtype == dtype and y.shape == (T, out_f)
                assert_close_to_ref(y, x, fw, b, act, f"{dtype} 1x{tile} {sparsity} T={T} {out_f}x{in_f} "
                                                       f"bias={bias} act={act}")


@needs_cpp
@pytest.mark.parametrize("isa", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa_level(isa, dtype):
    """AVX2 and AVX-512 (bf16 widened or vdpbf16ps) builds all run where the CPU has them."""
    if not torch.ops.sparsevit_C.fine_linear_isa(isa):
        pytest.skip(f"CPU lacks ISA level {isa}")
    for tile in (1, 4, 8):
        x, fw, b = _case(131, 50, 270, tile, 0.8, dtype, True, seed=3)
        for act in ACTS:
            y = torch.ops.sparsevit_C.fine_linear(x, fw.values, fw.col_indices, fw.seg_ptr, b, 50, 270, fw.unit,
                                                  ACT_CODE[act], isa)
            assert_close_to_ref(y, x, fw, b, act, f"isa={isa} {dtype} 1x{tile} act={act}")


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows_and_empty_weight(dtype):
    x, fw, b = _case(9, 30, 41, 1, 0.7, dtype, True)
    w = fw.to_dense().clone()
    w[::3] = 0  # every third output row stores nothing: bias + activation only
    fw = FineSparseWeight.from_dense(w, tile=1)
    for act in ACTS:
        assert_close_to_ref(fine_linear(x, fw, b, act), x, fw, b, act, f"{dtype} empty rows act={act}")
    empty = FineSparseWeight.from_dense(torch.zeros(30, 41, dtype=dtype))
    assert empty.nnz == 0
    y = fine_linear(x, empty, b, "gelu")
    expect = F.gelu(b.double()).expand(9, 30)
    assert (y.double() - expect).abs().max().item() <= 2 * torch.finfo(dtype).eps * expect.abs().max().item()
    assert fine_linear(x[:0], fw, b).shape == (0, 30)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_inputs_propagate_like_dense(dtype):
    x, fw, b = _case(40, 37, 53, 1, 0.9, dtype, True)
    x[3, 7] = float("nan")
    x[20, 0] = float("inf")
    x[21, 52] = float("-inf")
    y = fine_linear(x, fw, b, "gelu")
    ref = apply_activation(F.linear(x.double(), fw.to_dense().double(), b.double()), "gelu")
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN positions differ from the dense product"
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    clean = [t for t in range(40) if t not in (3, 20, 21)]
    assert_close_to_ref(y[clean], x[clean], fw, b, "gelu", f"{dtype} finite tokens")
    assert bool(finite[clean].all())


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_flags_under_both_thread_splits(dtype):
    """NaN/Inf flags are written by whichever pack runs them: per-thread tile packing (16-token tiles,
    many tiles) and packing up front (one wide tile), each on 1 and 2 threads."""
    x, fw, b = _case(150, 21, 45, 1, 0.8, dtype, True, seed=5)
    x[0, 3], x[77, 44], x[149, 0] = float("nan"), float("inf"), float("-inf")
    ref = apply_activation(F.linear(x.double(), fw.to_dense().double(), b.double()), "gelu")
    width = 8 if "avx2" in torch.ops.sparsevit_C.fine_linear_isa(-1) else 16
    threads = torch.get_num_threads()
    try:
        for nth in (1, 2):
            torch.set_num_threads(nth)
            for tt in (width, 0):
                y = torch.ops.sparsevit_C.fine_linear(x, fw.values, fw.col_indices, fw.seg_ptr, b, 21, 45,
                                                      fw.unit, 1, -1, tt)
                what = f"{dtype} token_tile={tt} threads={nth}"
                assert torch.equal(torch.isnan(y), torch.isnan(ref)), f"{what}: NaN positions differ"
                assert torch.equal(torch.isinf(y), torch.isinf(ref)), f"{what}: Inf positions differ"
                clean = [t for t in range(150) if t not in (0, 77, 149)]
                assert_close_to_ref(y[clean], x[clean], fw, b, "gelu", what)
    finally:
        torch.set_num_threads(threads)


def test_reference_path_matches_float64():
    x, fw, b = _case(7, 20, 33, 4, 0.8, torch.float64, True)
    y = reference_fine_linear(x, fw, b, "gelu_tanh")
    ref = F.gelu(F.linear(x, fw.to_dense(), b), approximate="tanh")
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    assert fine_linear(x, fw, b, "gelu_tanh").dtype == torch.float64  # float64: reference path


@needs_cpp
def test_autocast_runs_in_bf16():
    x, fw, b = _case(17, 24, 40, 4, 0.7, torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fine_linear(x, fw, b, "gelu")
    assert y.dtype == torch.bfloat16
    ref = F.gelu(F.linear(x.double(), fw.to_dense().double(), b.double()))
    assert (y.double() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_wrapper_errors_and_reasons():
    x, fw, b = _case(4, 12, 20, 1, 0.5, torch.float32, True)
    with pytest.raises(TypeError, match="FineSparseWeight"):
        fine_linear(x, fw.to_dense())
    with pytest.raises(ValueError, match="in_features"):
        fine_linear(x[:, :10], fw)
    with pytest.raises(TypeError, match="bfloat16"):
        fine_linear(x.bfloat16(), fw)
    with pytest.raises(ValueError, match="activation"):
        fine_linear(x, fw, activation="relu")
    assert fine_linear(x.reshape(2, 2, 20), fw, b).shape == (2, 2, 12)
    if HAS_CPP and torch.ops.sparsevit_C.fine_linear_isa(-1):
        assert not_supported_reasons(x, fw) == []
    assert any("float64" in r for r in not_supported_reasons(x.double(), fw.to(dtype=torch.float64)))
    assert any("!=" in r for r in not_supported_reasons(x.bfloat16(), fw))


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x, fw, b = _case(6, 11, 19, 1, 0.6, dtype, True)
    for bias, act in ((b, "gelu"), (None, "none")):
        torch.library.opcheck(torch.ops.sparsevit.fine_linear.default,
                              (x, fw.values, fw.col_indices, fw.row_ptr, fw.seg_ptr, 11, 19, bias, act),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_tiles_and_row_ranges(dtype):
    """Every token-tile width (1-8 vectors, a short last tile), row ranges split at the L2 cap
    (out > 256 rows) and both 2-thread splits give the float64 result: whole tiles per thread (packed
    by their owner; narrow tiles make >= 3 per thread) and tiles packed up front with row ranges x
    tiles handed out (wide tiles: too few to go round)."""
    x, fw, b = _case(197, 530, 300, 1, 0.8, dtype, True, seed=7)
    isa_name = torch.ops.sparsevit_C.fine_linear_isa(-1)
    width = 8 if "avx2" in isa_name else 16
    tiles = [0] + [v * width for v in range(1, (4 if "avx2" in isa_name else 8) + 1)]
    threads = torch.get_num_threads()
    try:
        for nth in (1, 2):
            torch.set_num_threads(nth)
            for tt in tiles:
                y = torch.ops.sparsevit_C.fine_linear(x, fw.values, fw.col_indices, fw.seg_ptr, b, 530, 300,
                                                      fw.unit, 1, -1, tt)
                assert_close_to_ref(y, x, fw, b, "gelu", f"{dtype} token_tile={tt} threads={nth}")
    finally:
        torch.set_num_threads(threads)
    for bad in (width + 1, 1024, -width):
        with pytest.raises(RuntimeError, match="token_tile"):
            torch.ops.sparsevit_C.fine_linear(x, fw.values, fw.col_indices, fw.seg_ptr, b, 530, 300, fw.unit, 0,
                                              -1, bad)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_token_tiles_do_not_change_any_token(dtype):
    """Tiles are cut to near-equal sizes (whole vectors), and where threads own tiles their count is
    rounded up to a multiple of the threads: 213 tokens in 2-vector tiles make 7 tiles of 1-2 vectors
    on 1 thread and 8 on 2. Tiles this narrow keep the same accumulator split whatever their size, so
    every token's result is bit-identical across the two cuttings, and matches float64; odd and even
    unit counts per row segment (the masked tail unit) with 3 input chunks."""
    x, fw, b = _case(213, 70, 300, 1, 0.6, dtype, True, seed=11)
    x[5, 0] = float("inf")  # the masked tail reads column 0 where a segment has no odd unit
    width = 8 if "avx2" in torch.ops.sparsevit_C.fine_linear_isa(-1) else 16
    threads = torch.get_num_threads()
    ys = []
    try:
        for nth in (1, 2):
            torch.set_num_threads(nth)
            ys.append(torch.ops.sparsevit_C.fine_linear(x, fw.values, fw.col_indices, fw.seg_ptr, b, 70, 300,
                                                        fw.unit, 1, -1, 2 * width))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=0, equal_nan=True,
                               msg=f"{dtype}: 1 and 2 threads (7 and 8 tiles) differ")
    ref = apply_activation(F.linear(x.double(), fw.to_dense().double(), b.double()), "gelu")
    assert torch.equal(torch.isnan(ys[0]), torch.isnan(ref)) and torch.equal(torch.isinf(ys[0]), torch.isinf(ref))
    clean = [t for t in range(213) if t != 5]
    assert_close_to_ref(ys[0][clean], x[clean], fw, b, "gelu", f"{dtype} equal tiles")


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_eager_call_matches_the_op(dtype, monkeypatch):
    """Eager CPU inference calls the compiled kernel without the custom-op dispatcher and gets the
    op's exact result; grad-tracking inputs and dispatch modes still go through the registered op."""
    import sparsevit.ops.fine_linear as fl
    from torch.utils._python_dispatch import TorchDispatchMode

    x, fw, b = _case(45, 29, 70, 1, 0.8, dtype, True, seed=11)
    via_op = torch.ops.sparsevit.fine_linear(x, fw.values, fw.col_indices, fw.row_ptr, fw.seg_ptr, 29, 70, b, "gelu")
    calls = []
    real_op = fl._fine_linear_op
    monkeypatch.setattr(fl, "_fine_linear_op", lambda *a: calls.append(1) or real_op(*a))
    with torch.no_grad():
        assert torch.equal(fine_linear(x, fw, b, "gelu"), via_op)
    assert calls == [], "eager inference should call the kernel directly"
    assert torch.equal(fine_linear(x.clone().requires_grad_(True), fw, b, "gelu").detach(), via_op)
    assert calls == [1], "a grad-tracking input must go through the registered op"

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Passthrough():
        assert torch.equal(fine_linear(x, fw, b, "gelu"), via_op)
    assert calls == [1, 1], "a dispatch mode must see the registered op"
