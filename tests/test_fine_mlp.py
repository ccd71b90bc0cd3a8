"""sparsevit::fine_mlp (fc2(act(fc1(x))) with the hidden activation kept in the packed layout): equal
bit for bit to two fine_linear calls, close to float64, under both thread splits, with NaN/Inf in
the input or born in the hidden activation, and taken by SparseMlp only where it applies."""
import pytest
import torch
import torch.nn.functional as F

from sparsevit import _ext
from sparsevit.formats.fine import FineSparseWeight
from sparsevit.ops.bsr import apply_activation
from sparsevit.ops.fine_linear import fine_linear
from sparsevit.ops.fine_mlp import fine_mlp, fused_mlp_forward, not_fusable_reasons

needs_cpp = pytest.mark.skipif(not _ext.has_op("fine_mlp"), reason=f"C++: {_ext.unavailable_reason('fine_mlp')}")
ACT_CODE = {None: 0, "gelu": 1, "gelu_tanh": 2}


def _layer(out_f, in_f, tile, sparsity, g, dtype=torch.float32, scale=1.0):
    w = torch.randn(out_f, in_f, generator=g) * scale
    keep = (torch.rand(out_f, -(-in_f // tile), generator=g) >= sparsity).repeat_interleave(tile, 1)[:, :in_f]
    return FineSparseWeight.from_dense(w.to(dtype), keep, tile=tile), torch.randn(out_f, generator=g).to(dtype)


def _mlp(T, in_f, hidden, out_f, tiles=(1, 1), sparsity=0.8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w1, b1 = _layer(hidden, in_f, tiles[0], sparsity, g, dtype)
    w2, b2 = _layer(out_f, hidden, tiles[1], sparsity, g, dtype)
    return torch.randn(T, in_f, generator=g).to(dtype), w1, b1, w2, b2


def _unfused(x, w1, b1, act, w2, b2):
    return fine_linear(fine_linear(x, w1, b1, act), w2, b2)


def _check_float64(y, x, w1, b1, act, w2, b2, what):
    """|y - ref64| <= 2x dense fp32 torch's error + one ulp of the output's scale."""
    h = apply_activation(F.linear(x.double(), w1.to_dense().double(), b1.double()), act)
    ref = F.linear(h, w2.to_dense().double(), b2.double())
    dense = F.linear(apply_activation(F.linear(x, w1.to_dense(), b1), act), w2.to_dense(), b2)
    tol = 2 * (dense.double() - ref).abs().max().item() + torch.finfo(x.dtype).eps * ref.abs().max().item()
    err = (y.double() - ref).abs().max().item()
    assert err <= tol, f"{what}: max err {err:.3g} > {tol:.3g}"


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [(1, 1), (4, 8), (8, 1), (1, 4)])
def test_equals_two_fine_linear_calls_and_float64(tiles, dtype):
    """Odd token counts (short last tiles), odd widths, hidden widths not a multiple of fc2's unit
    (zero padding rows of the packed hidden; bf16: an odd last row paired with zero), with and
    without bias, every activation."""
    for T, in_f, hidden, out_f in [(1, 54, 37, 45), (5, 53, 130, 29), (33, 70, 61, 45), (197, 96, 203, 50)]:
        for sparsity in (0.6, 0.9):
            x, w1, b1, w2, b2 = _mlp(T, in_f, hidden, out_f, tiles, sparsity, seed=T, dtype=dtype)
            for act in ACT_CODE:
                for bias in (True, False):
                    c1, c2 = (b1, b2) if bias else (None, None)
                    y = fine_mlp(x, w1, c1, act, w2, c2)
                    what = f"{dtype} tiles={tiles} T={T} {in_f}->{hidden}->{out_f} sp={sparsity} act={act} bias={bias}"
                    assert y.shape == (T, out_f) and y.dtype == dtype
                    assert torch.equal(y, _unfused(x, w1, c1, act, w2, c2)), f"{what}: differs from fine_linear x2"
                    if bias:
                        _check_float64(y, x, w1, b1, act, w2, b2, what)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_thread_splits_and_token_tiles(dtype):
    """Tiles owned by one thread (narrow tiles: many per thread) and row ranges x tiles shared out
    (wide tiles: too few to go round; bf16: fc1's ranges start at even rows), on 1 and 2 threads."""
    x, w1, b1, w2, b2 = _mlp(150, 46, 301, 21, (1, 4), 0.8, seed=5, dtype=dtype)
    fl = torch.ops.sparsevit_C.fine_linear
    width = 8 if "avx2" in torch.ops.sparsevit_C.fine_linear_isa(-1) else 16
    threads = torch.get_num_threads()
    try:
        for nth in (1, 2):
            torch.set_num_threads(nth)
            for tt in (0, width, 3 * width):
                y = torch.ops.sparsevit_C.fine_mlp(x, w1.values, w1.col_indices, w1.seg_ptr, b1, 301, w1.unit, 1,
                                                   w2.values, w2.col_indices, w2.seg_ptr, b2, 21, 46, w2.unit, -1, tt)
                h = fl(x, w1.values, w1.col_indices, w1.seg_ptr, b1, 301, 46, w1.unit, 1, -1, tt)
                expect = fl(h, w2.values, w2.col_indices, w2.seg_ptr, b2, 21, 301, w2.unit, 0, -1, tt)
                # the token tile sets the accumulator split, so compare at the same tile width
                assert torch.equal(y, expect), f"threads={nth} token_tile={tt}"
                _check_float64(y, x, w1, b1, "gelu", w2, b2, f"threads={nth} token_tile={tt}")
    finally:
        torch.set_num_threads(threads)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_isa_level(dtype):
    x, w1, b1, w2, b2 = _mlp(70, 34, 91, 17, (1, 8), 0.7, seed=2, dtype=dtype)
    for isa in (0, 1, 2):
        if not torch.ops.sparsevit_C.fine_linear_isa(isa):
            continue
        y = torch.ops.sparsevit_C.fine_mlp(x, w1.values, w1.col_indices, w1.seg_ptr, b1, 91, w1.unit, 1,
                                           w2.values, w2.col_indices, w2.seg_ptr, b2, 17, 34, w2.unit, isa)
        h = torch.ops.sparsevit_C.fine_linear(x, w1.values, w1.col_indices, w1.seg_ptr, b1, 91, 34, w1.unit, 1, isa)
        assert torch.equal(y, torch.ops.sparsevit_C.fine_linear(h, w2.values, w2.col_indices, w2.seg_ptr, b2, 17, 91,
                                                                w2.unit, 0, isa)), f"isa={isa}"
        _check_float64(y, x, w1, b1, "gelu", w2, b2, f"isa={isa}")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_in_input_and_hidden_like_dense(dtype):
    """NaN/Inf in x, and an Inf born in the hidden activation from finite x (fc1 overflows): same
    NaN/Inf positions as the dense float64 MLP, finite tokens unchanged."""
    g = torch.Generator().manual_seed(9)
    w1, b1 = _layer(40, 30, 1, 0.8, g, dtype)
    w2, b2 = _layer(23, 40, 1, 0.8, g, dtype)
    x = torch.randn(60, 30, generator=g).to(dtype)
    x[3, 7], x[40, 0] = float("nan"), float("inf")
    big = w1.to_dense()
    big[5] = 0
    big[5, 2] = 3e38  # token 50's hidden row 5 overflows to +Inf
    w1 = FineSparseWeight.from_dense(big, big != 0, tile=1)
    x[:, 2] = 0.0  # only token 50 meets the huge weight (others would overflow too, some to -Inf)
    x[50, 2] = 10.0
    h = apply_activation(F.linear(x.double(), w1.to_dense().double(), b1.double()), "gelu")
    ref = F.linear(h.to(dtype).double(), w2.to_dense().double(), b2.double())
    y = fine_mlp(x, w1, b1, "gelu", w2, b2)
    torch.testing.assert_close(y, _unfused(x, w1, b1, "gelu", w2, b2), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert not bool(torch.isfinite(y[50]).all()) and bool(torch.isfinite(y[10]).all())
    x[3, 7], x[40, 0] = 0.0, 0.0  # the hidden Inf alone (finite input) must trigger the fix-up too
    y = fine_mlp(x, w1, b1, "gelu", w2, b2)
    torch.testing.assert_close(y, _unfused(x, w1, b1, "gelu", w2, b2), rtol=0, atol=0, equal_nan=True)
    assert bool(torch.isnan(y[50]).any()) and bool(torch.isfinite(y[:50]).all())


@needs_cpp
def test_errors_and_reasons():
    x, w1, b1, w2, b2 = _mlp(4, 20, 30, 10)
    with pytest.raises(ValueError, match="fc1's 30 outputs"):
        fine_mlp(x, w1, b1, "gelu", w1, b1)
    xd, w1d, w2d = x.double(), w1.to(dtype=torch.float64), w2.to(dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        torch.ops.sparsevit_C.fine_mlp(xd, w1d.values, w1d.col_indices, w1d.seg_ptr, None, 30, 1, 0,
                                       w2d.values, w2d.col_indices, w2d.seg_ptr, None, 10, 20, 1)
    assert any("float64" in r for r in not_fusable_reasons(xd, w1d, w2d))
    assert not_fusable_reasons(x, w1, w2) == []
    assert any(r.startswith("fc2: weight dtype") for r in not_fusable_reasons(x.bfloat16(), w1.to(dtype=torch.bfloat16), w2))
    # float64 still computes (through the reference), matching two fine_linear calls
    yd = fine_mlp(xd, w1d, b1.double(), "gelu", w2d, b2.double())
    assert torch.allclose(yd, _unfused(xd, w1d, b1.double(), "gelu", w2d, b2.double()))


@needs_cpp
def test_opcheck():
    x, w1, b1, w2, b2 = _mlp(6, 11, 19, 7, (1, 4))
    for c1, c2, act in ((b1, b2, "gelu"), (None, None, "none")):
        torch.library.opcheck(torch.ops.sparsevit.fine_mlp.default,
                              (x, w1.values, w1.col_indices, w1.row_ptr, w1.seg_ptr, c1, 19, act, w2.values,
                               w2.col_indices, w2.row_ptr, w2.seg_ptr, c2, 7, 11),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@needs_cpp
def test_sparse_mlp_module_takes_the_fused_kernel_only_where_it_applies(monkeypatch):
    import sparsevit.ops.fine_mlp as fm
    from sparsevit.runtime.linear import SparseLinear
    from sparsevit.runtime.modules import SparseMlp

    g = torch.Generator().manual_seed(4)
    fc1, fc2 = torch.nn.Linear(24, 70), torch.nn.Linear(70, 24)
    m1 = torch.rand(70, 24, generator=g) > 0.85
    m2 = torch.rand(24, 70, generator=g) > 0.85
    s1 = SparseLinear.from_dense(fc1, m1, activation="gelu", kernel="cpp_fine", fmt="fine:1x1")
    s2 = SparseLinear.from_dense(fc2, m2, kernel="cpp_fine", fmt="fine:1x1")
    mlp = SparseMlp(s1, None, s2)
    x = torch.randn(2, 37, 24, generator=g)
    calls = []
    real = fm._cpp_fine_mlp
    monkeypatch.setattr(fm, "_cpp_fine_mlp", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y = mlp(x)
        assert calls == [1], "eager fp32 inference should take the fused kernel"
        assert torch.equal(y, s2(s1(x)))
        ref = F.linear(F.gelu(F.linear(x.double(), (fc1.weight * m1).double(), fc1.bias.double())),
                       (fc2.weight * m2).double(), fc2.bias.double())
        assert (y.double() - ref).abs().max().item() < 1e-4
        assert fused_mlp_forward(s1, torch.nn.GELU(), None, s2, x) is None  # an unfused activation
        mlp.to(torch.bfloat16)
        yb = mlp(x.bfloat16())
        assert calls == [1, 1] and torch.equal(yb, s2(s1(x.bfloat16())))
        assert (yb.double() - ref).abs().max().item() < 0.1
        mlp.fc1.kernel = "reference"
        y_ref_kernel = mlp(x.bfloat16())
        assert calls == [1, 1], "a layer on the reference kernel is never fused"
        assert (y_ref_kernel.double() - ref).abs().max().item() < 0.1


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accelerated_model_with_unstructured_masks_takes_it(dtype, monkeypatch):
    """A small DeiT pruned 90% unstructured, accelerated (cost-model chooser, fp32 auto / bf16 sparse):
    every MLP runs fused and the whole model matches the masked dense model (float64 reference for
    fp32; bf16 within bf16's error of the fp32 masked model), also with fusion off."""
    import sparsevit
    import sparsevit.ops.fine_mlp as fm
    import sparsevit.runtime.modules as modules
    from helpers import make_model

    monkeypatch.setenv("SPARSEVIT_CHOOSE", "model")
    model = make_model("deit_small")
    plan = sparsevit.prune(model, method="magnitude_unstructured", criterion="l1", sparsity=0.9, progress=False)
    # bf16 column pairs double the density: at these tiny widths the cost model keeps bf16 dense
    backend = "auto" if dtype == torch.float32 else "sparse"
    fast = sparsevit.accelerate(model, plan, dtype=dtype, batch_hint=3, backend=backend)
    fmts = {d.name: d.fmt for d in fast.sparsevit_report if d.name.endswith(("mlp.fc1", "mlp.fc2"))}
    assert fmts and all(f.startswith("fine") for f in fmts.values()), fmts
    calls = []
    real = fm._cpp_fine_mlp
    monkeypatch.setattr(fm, "_cpp_fine_mlp", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 3, 32, 32)
    masked = sparsevit.masked_model(model, plan)
    with torch.no_grad():
        out = fast(x.to(dtype)).float()
        assert len(calls) == len(fmts) // 2, "every MLP should run fused"
        ref64 = masked.double()(x.double())
        ref32 = masked.float()(x)
        monkeypatch.setattr(modules, "fused_mlp_forward", lambda *a: None)  # the module path's fused call
        monkeypatch.setattr(modules, "direct_fine_pair_ok", lambda *a: False)  # the lean path's
        unfused = fast(x.to(dtype)).float()
    assert len(calls) == len(fmts) // 2
    assert torch.equal(out, unfused), "fused and per-layer forwards differ"
    if dtype == torch.float32:
        err, err32 = (out.double() - ref64).abs().max().item(), (ref32.double() - ref64).abs().max().item()
        assert err <= 4 * err32 + 1e-6 * ref64.abs().max().item(), (err, err32)
    else:
        scale = ref64.abs().max().item()
        assert (out.double() - ref64).abs().max().item() < 0.05 * scale


@pytest.fixture
def timing_cache():
    """An empty chooser timing cache for the test, restored afterwards."""
    from sparsevit.runtime.linear import _TIMING_CACHE

    saved = dict(_TIMING_CACHE)
    _TIMING_CACHE.clear()
    yield
    _TIMING_CACHE.clear()
    _TIMING_CACHE.update(saved)


def _accelerate_with_fake_timings(monkeypatch, fused_wins: bool, sparsity=0.7, dtype=None):
    """A small DeiT pruned unstructured, accelerated with the measuring chooser on fake timings:
    every layer on its own is fastest dense; the fused fine_mlp pair is faster or slower than that."""
    import sparsevit
    import sparsevit.runtime.linear as linear
    import sparsevit.runtime.mlp_pair as mlp_pair
    from helpers import make_model

    monkeypatch.setenv("SPARSEVIT_CHOOSE", "measure")
    pair_calls = []

    def per_layer(fns, device="cpu"):
        return {ck: 1.0 if ck[0].startswith("dense ") else 2.0 for ck in fns}

    def pair(fns, device="cpu"):
        for fn in fns.values():  # the timed callables must run
            fn()
        pair_calls.append(len(fns))
        return {k: (1.0 if fused_wins else 3.0) if k[-1] == "fused" else 2.0 for k in fns}

    monkeypatch.setattr(linear, "kernel_choice_ms", per_layer)
    monkeypatch.setattr(mlp_pair, "kernel_choice_ms", pair)
    model = make_model("deit_small")
    plan = sparsevit.prune(model, method="magnitude_unstructured", criterion="l1", sparsity=sparsity, progress=False)
    fast = sparsevit.accelerate(model, plan, batch_hint=3, dtype=dtype)
    return model, plan, fast, pair_calls


@needs_cpp
@pytest.mark.parametrize("fused_wins", [True, False])
def test_mlp_pair_choice_times_the_fused_op(monkeypatch, timing_cache, tmp_path, fused_wins):
    """Each MLP layer alone loses to dense, the pair is timed fused against the per-layer pair: the
    faster wins, both report entries say so, the model matches the masked dense model, and a saved
    model loads back with the same formats."""
    import sparsevit
    from sparsevit.runtime.linear import SparseLinear

    model, plan, fast, pair_calls = _accelerate_with_fake_timings(monkeypatch, fused_wins)
    assert pair_calls == [2], "one timing for both blocks (same shapes, densities, choices: cached)"
    report = fast.sparsevit_report.by_name()
    for i, blk in enumerate(fast.blocks):
        mods = (blk.mlp.fc1, blk.mlp.fc2)
        decisions = [report[f"blocks.{i}.mlp.{n}"][-1] for n in ("fc1", "fc2")]
        assert all(isinstance(m, SparseLinear) and m.fmt == "fine:1x1" for m in mods) == fused_wins, mods
        for d in decisions:
            assert set(d.est_ms) >= {"mlp pair per-layer", "mlp pair fused fine_mlp"}
            if fused_wins:
                assert d.fmt == "fine:1x1" and "fused as sparsevit::fine_mlp" in d.reason, d.reason
                assert "per-layer choice was: dense" in d.reason, d.reason
            else:
                assert d.fmt == "dense" and "kept per layer" in d.reason, d.reason
        qkv = report[f"blocks.{i}.attn.qkv"][-1]
        assert qkv.fmt == "dense" and "mlp pair" not in qkv.reason
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref64 = sparsevit.masked_model(model, plan).double()(x.double())
        out = fast(x)
    scale = ref64.abs().max().item()
    assert (out.double() - ref64).abs().max().item() < 1e-4 * scale
    sparsevit.save(fast, tmp_path / "m.sparsevit")
    loaded = sparsevit.load(tmp_path / "m.sparsevit")
    assert [m.fmt for m in (loaded.blocks[0].mlp.fc1, loaded.blocks[0].mlp.fc2) if isinstance(m, SparseLinear)] \
        == ["fine:1x1"] * 2 * fused_wins
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


@needs_cpp
def test_mlp_pair_choice_leaves_dense_mlps_alone(monkeypatch, timing_cache):
    """Above the fine-grained density limit the pair is not timed, and the report says why."""
    _, _, fast, pair_calls = _accelerate_with_fake_timings(monkeypatch, True, sparsity=0.3)
    assert pair_calls == []
    d = fast.sparsevit_report.by_name()["blocks.0.mlp.fc1"][-1]
    assert d.fmt == "dense" and "fused fine_mlp pair not timed: a layer's fine-grained format would store more than" in d.reason, d.reason


@needs_cpp
def test_mlp_pair_choice_in_bfloat16(monkeypatch, timing_cache):
    """bf16: the fused pair (column pairs, vdpbf16ps where the CPU has it) replaces dense per-layer
    choices the same way, and the model stays within bf16's error of the fp32 masked model. At 85%
    sparsity: at 70% the column pairs bf16 stores keep about half the weight, and the pair is not
    even timed (test_bf16_pairs_at_70_percent_are_not_timed)."""
    import sparsevit
    from sparsevit.runtime.linear import SparseLinear

    model, plan, fast, pair_calls = _accelerate_with_fake_timings(monkeypatch, True, sparsity=0.85,
                                                                  dtype=torch.bfloat16)
    assert pair_calls and all(n == 2 for n in pair_calls)  # one timing per distinct pair of densities
    mlp = fast.blocks[1].mlp
    assert all(isinstance(m, SparseLinear) and m.fmt == "fine:1x1" for m in (mlp.fc1, mlp.fc2))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = sparsevit.masked_model(model, plan)(x)
        out = fast(x.bfloat16()).float()
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@needs_cpp
def test_bf16_pairs_at_70_percent_are_not_timed(monkeypatch, timing_cache):
    """bf16 stores a 1x1 mask as column pairs: at 70% unstructured sparsity about half of the pairs
    hold a kept weight, too dense for the fine-grained kernel, so neither the layers nor the fused
    pair are tried, and the report says why."""
    _, _, fast, pair_calls = _accelerate_with_fake_timings(monkeypatch, True, dtype=torch.bfloat16)
    assert pair_calls == []
    d = fast.sparsevit_report.by_name()["blocks.0.mlp.fc1"][-1]
    assert d.fmt == "dense" and "would store more than" in d.reason, d.reason
