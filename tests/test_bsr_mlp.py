"""sparsevit::bsr_mlp (fc2(act(fc1(x))) with block-sparse weights, the hidden tile kept per token group):
equal bit for bit to two bsr_linear calls (same micro-kernels, same per-element summation order, the
bf16 hidden rounded by the same epilogue), close to float64, on 1 and 2 threads and any token
grouping, with NaN/Inf like dense, and chosen by the MLP pair chooser (module and lean paths)."""
import pytest
import torch
import torch.nn.functional as F

from sparsevit import _ext
from sparsevit.formats.bsr import BlockSparseWeight
from sparsevit.ops.bsr import apply_activation, bsr_linear
from sparsevit.ops.bsr_mlp import FUSED_FLAG, bsr_mlp, not_fusable_reasons

needs_cpp = pytest.mark.skipif(not _ext.has_op("bsr_mlp"), reason=f"C++: {_ext.unavailable_reason('bsr_mlp')}")
ACT_CODE = {None: 0, "gelu": 1, "gelu_tanh": 2}


def _layer(out_f, in_f, block, sparsity, g, dtype):
    bh, bw = block
    keep = torch.rand(-(-out_f // bh), -(-in_f // bw), generator=g) >= sparsity
    keep[0, 0] = True  # at least one kept block
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:out_f, :in_f]
    w = BlockSparseWeight.from_dense(torch.randn(out_f, in_f, generator=g).to(dtype), block=block, mask=mask)
    return w, torch.randn(out_f, generator=g).to(dtype)


def _mlp(T, in_f, hidden, out_f, block, sparsity=0.6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w1, b1 = _layer(hidden, in_f, block, sparsity, g, dtype)
    w2, b2 = _layer(out_f, hidden, block, sparsity, g, dtype)
    return torch.randn(T, in_f, generator=g).to(dtype), w1, b1, w2, b2


def _unfused(x, w1, b1, act, w2, b2):
    return bsr_linear(bsr_linear(x, w1, b1, act), w2, b2)


def _op(x, w1, b1, act, w2, b2, isa=-1, group_tiles=0):
    return torch.ops.sparsevit_C.bsr_mlp(x, w1.packed, w1.col_indices, w1.crow_indices, b1, w1.shape[0], *w1.block,
                                         ACT_CODE[act], w2.packed, w2.col_indices, w2.crow_indices, b2, w2.shape[0],
                                         w1.shape[1], *w2.block, isa, group_tiles)


def _check_float64(y, x, w1, b1, act, w2, b2, what):
    """|y - ref64| <= 2x dense torch's error in x's dtype (bf16: hidden rounded as the kernels do) + one
    ulp of the output's scale."""
    def mlp(dt):
        h = apply_activation(F.linear(x.to(dt), w1.to_dense().to(dt), None if b1 is None else b1.to(dt)), act)
        return F.linear(h.to(x.dtype).to(dt), w2.to_dense().to(dt), None if b2 is None else b2.to(dt))

    ref, dense = mlp(torch.float64), mlp(torch.float32)
    tol = 2 * (dense.double() - ref).abs().max().item() + torch.finfo(x.dtype).eps * ref.abs().max().item()
    err = (y.double() - ref).abs().max().item()
    assert err <= tol, f"{what}: max err {err:.3g} > {tol:.3g}"


# block shapes of the row-major kernel (packed heights 16, 32, 48, 64), odd widths included
BLOCKS = [(32, 32), (16, 16), (32, 8), (48, 16), (64, 32), (20, 12)]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", BLOCKS)
def test_equals_two_bsr_linear_calls_and_float64(block, dtype):
    """Odd token counts (1, 5: a half-width last tile; 197, 203), hidden / out widths that are odd
    multiples of the block height, in_features not a multiple of the block width (a partial last
    block column), with and without bias, every activation."""
    bh, bw = block
    for T, in_f, hidden, out_f in [(1, 3 * bw + 5, 3 * bh, bh), (5, 2 * bw - 3, 5 * bh, 3 * bh),
                                   (197, 5 * bw + 1, 7 * bh, 3 * bh), (203, 4 * bw, 5 * bh, bh)]:
        x, w1, b1, w2, b2 = _mlp(T, in_f, hidden, out_f, block, seed=T, dtype=dtype)
        for act in ACT_CODE:
            for bias in (True, False):
                c1, c2 = (b1, b2) if bias else (None, None)
                y = bsr_mlp(x, w1, c1, act, w2, c2)
                what = f"{dtype} block={block} T={T} {in_f}->{hidden}->{out_f} act={act} bias={bias}"
                assert y.shape == (T, out_f) and y.dtype == dtype
                assert torch.equal(y, _unfused(x, w1, c1, act, w2, c2)), f"{what}: differs from bsr_linear x2"
                if act == "gelu":
                    _check_float64(y, x, w1, c1, act, w2, c2, what)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_and_token_groups(dtype):
    """1 and 2 threads, token groups of 1 tile up to all of them (0: the budget's choice); leading
    dims and a non-contiguous x (row stride wider than in_features)."""
    x, w1, b1, w2, b2 = _mlp(203, 70, 160, 96, (32, 32), 0.5, seed=4, dtype=dtype)
    expect = _unfused(x, w1, b1, "gelu", w2, b2)
    wide = torch.zeros(203, 100, dtype=dtype)
    wide[:, :70] = x
    threads = torch.get_num_threads()
    try:
        for nth in (1, 2):
            torch.set_num_threads(nth)
            for groups in (0, 1, 2, 3, 100):
                assert torch.equal(_op(x, w1, b1, "gelu", w2, b2, group_tiles=groups), expect), (nth, groups)
                assert torch.equal(_op(wide[:, :70], w1, b1, "gelu", w2, b2, group_tiles=groups), expect)
            y3 = bsr_mlp(x.view(7, 29, 70), w1, b1, "gelu", w2, b2)
            assert torch.equal(y3, expect.view(7, 29, 96))
    finally:
        torch.set_num_threads(threads)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_isa_level(dtype):
    x, w1, b1, w2, b2 = _mlp(41, 50, 96, 48, (16, 16), 0.5, seed=2, dtype=dtype)
    for isa in (0, 1, 2):
        if not torch.ops.sparsevit_C.bsr_linear_isa(isa):
            continue
        y = _op(x, w1, b1, "gelu", w2, b2, isa=isa)
        h = torch.ops.sparsevit_C.bsr_linear(x, w1.packed, w1.col_indices, w1.crow_indices, b1, 96, 50, 16, 16, 1, isa)
        expect = torch.ops.sparsevit_C.bsr_linear(h, w2.packed, w2.col_indices, w2.crow_indices, b2, 48, 96, 16, 16, 0,
                                                  isa)
        assert torch.equal(y, expect), f"isa={isa}"
        _check_float64(y, x, w1, b1, "gelu", w2, b2, f"isa={isa}")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_like_dense(dtype):
    """NaN in a column kept blocks read, Inf in a column no kept fc1 block reads (dense: 0 * Inf = NaN
    in every output of that token), and an Inf born in the hidden activation from finite x: same
    NaN/Inf positions as the dense float64 MLP, other tokens unchanged, equal to two bsr_linear calls."""
    g = torch.Generator().manual_seed(9)
    w1, b1 = _layer(64, 64, (16, 16), 0.0, g, dtype)
    dense1 = w1.to_dense().float()
    dense1[:, 48:] = 0  # block column 3 dropped everywhere
    dense1[16:32, 0:16] = 0
    dense1[16, 1] = 3e38  # token 50's hidden row 16 overflows
    w1 = BlockSparseWeight.from_dense(dense1.to(dtype), block=(16, 16), mask=dense1 != 0)
    w2, b2 = _layer(32, 64, (16, 16), 0.5, g, dtype)
    x = torch.randn(60, 64, generator=g).to(dtype)
    x[:, 1] = 0.0
    x[50, 1] = 10.0
    x[3, 7], x[40, 50] = float("nan"), float("inf")
    h = apply_activation(F.linear(x.double(), w1.to_dense().double(), b1.double()), "gelu")
    ref = F.linear(h.to(dtype).double(), w2.to_dense().double(), b2.double())
    y = bsr_mlp(x, w1, b1, "gelu", w2, b2)
    torch.testing.assert_close(y, _unfused(x, w1, b1, "gelu", w2, b2), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert bool(torch.isnan(y[40]).all()) and not bool(torch.isfinite(y[50]).all())
    assert bool(torch.isfinite(y[10]).all())
    x[3, 7], x[40, 50] = 0.0, 0.0  # the hidden Inf alone (finite input) must take the fix-up too
    y = bsr_mlp(x, w1, b1, "gelu", w2, b2)
    torch.testing.assert_close(y, _unfused(x, w1, b1, "gelu", w2, b2), rtol=0, atol=0, equal_nan=True)
    assert not bool(torch.isfinite(y[50]).all()) and bool(torch.isfinite(y[:50]).all())


@needs_cpp
def test_errors_reasons_and_unfusable_blocks():
    x, w1, b1, w2, b2 = _mlp(9, 40, 64, 32, (16, 16))
    assert not_fusable_reasons(x, w1, w2) == []
    with pytest.raises(ValueError, match="fc1's 64 outputs"):
        bsr_mlp(x, w1, b1, "gelu", w1, b1)
    bad_col = w2.col_indices.clone()
    bad_col[0] = 99
    with pytest.raises(RuntimeError, match="col_indices"):
        torch.ops.sparsevit_C.bsr_mlp(x, w1.packed, w1.col_indices, w1.crow_indices, b1, 64, 16, 16, 1, w2.packed,
                                      bad_col, w2.crow_indices, b2, 32, 40, 16, 16)
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        xd, w1d, w2d = x.double(), w1.to(dtype=torch.float64), w2.to(dtype=torch.float64)
        _op(xd, w1d, None, "gelu", w2d, None)
    assert any("float64" in r for r in not_fusable_reasons(xd, w1d, w2d))
    # short blocks (the token-transposed kernel) and mixed heights are not fused, yet computed right
    for blocks, why in ((((8, 8), (8, 8)), "at least 9 rows"), (((16, 16), (32, 16)), "different register tiles")):
        g = torch.Generator().manual_seed(1)
        v1, c1 = _layer(64, 40, blocks[0], 0.5, g, torch.float32)
        v2, c2 = _layer(32, 64, blocks[1], 0.5, g, torch.float32)
        assert any(why in r for r in not_fusable_reasons(x, v1, v2))
        assert torch.equal(bsr_mlp(x, v1, c1, "gelu", v2, c2), _unfused(x, v1, c1, "gelu", v2, c2))
    # float64 computes through the reference, matching two bsr_linear calls
    yd = bsr_mlp(xd, w1d, b1.double(), "gelu", w2d, b2.double())
    assert torch.allclose(yd, _unfused(xd, w1d, b1.double(), "gelu", w2d, b2.double()))


@needs_cpp
def test_opcheck():
    x, w1, b1, w2, b2 = _mlp(6, 21, 48, 32, (16, 16))
    for c1, c2, act in ((b1, b2, "gelu"), (None, None, "none")):
        torch.library.opcheck(torch.ops.sparsevit.bsr_mlp.default,
                              (x, w1.values, w1.col_indices, w1.crow_indices, w1.packed, c1, 48, act, w2.values,
                               w2.col_indices, w2.crow_indices, w2.packed, c2, 32, 21, 16, 16, 16, 16),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.fixture
def timing_cache():
    """An empty chooser timing cache for the test, restored afterwards."""
    from sparsevit.runtime.linear import _TIMING_CACHE

    saved = dict(_TIMING_CACHE)
    _TIMING_CACHE.clear()
    yield
    _TIMING_CACHE.clear()
    _TIMING_CACHE.update(saved)


def _accelerate_blocks(monkeypatch, fused_wins: bool, dtype=torch.float32):
    """A small DeiT pruned 70% in 16x16 blocks, accelerated with the measuring chooser on fake
    timings: every layer is fastest in 16x16 blocks on the C++ kernel; the fused bsr_mlp pair is
    faster or slower than the two calls."""
    import sparsevit
    import sparsevit.runtime.linear as linear
    import sparsevit.runtime.mlp_pair as mlp_pair
    from helpers import make_model

    monkeypatch.setenv("SPARSEVIT_CHOOSE", "measure")
    pair_calls = []

    def per_layer(fns, device="cpu"):
        return {ck: 1.0 if ck[0] == "cpp_bsr bsr:16x16" else 2.0 for ck in fns}

    def pair(fns, device="cpu"):
        for fn in fns.values():  # the timed callables must run
            fn()
        bsr = all(k[0] == "bsr_mlp_pair" for k in fns)
        if bsr:
            pair_calls.append(len(fns))
        fused = 1.0 if fused_wins and bsr else 3.0  # the fused fine_mlp pair always loses here
        return {k: fused if k[-1] == "fused" else 2.0 for k in fns}

    monkeypatch.setattr(linear, "kernel_choice_ms", per_layer)
    monkeypatch.setattr(mlp_pair, "kernel_choice_ms", pair)
    model = make_model("deit_small")
    plan = sparsevit.prune(model, method="magnitude_unstructured", criterion="l1", sparsity=0.7, block=(16, 16),
                           progress=False)
    fast = sparsevit.accelerate(model, plan, batch_hint=3, dtype=dtype)
    return model, plan, fast, pair_calls


@needs_cpp
@pytest.mark.parametrize("fused_wins", [True, False])
def test_pair_choice_reports_and_runs_the_fused_op(monkeypatch, timing_cache, tmp_path, fused_wins):
    """The chooser times bsr_mlp against the two bsr_linear calls; the faster wins, both report
    entries say so, the module path (batch 3) and the lean path (batch 1) call the fused op exactly
    where chosen, and the output matches the masked dense model (and the per-layer forward bit for
    bit). A saved model loads back with the same formats and times its pairs again."""
    import sparsevit
    import sparsevit.ops.bsr_mlp as bm
    import sparsevit.runtime.modules as modules

    model, plan, fast, pair_calls = _accelerate_blocks(monkeypatch, fused_wins)
    assert 1 <= len(pair_calls) <= len(fast.blocks) and set(pair_calls) == {2}, pair_calls  # pair vs fused
    report = fast.sparsevit_report.by_name()
    for i, blk in enumerate(fast.blocks):
        assert bool(blk.mlp.fc1.__dict__.get(FUSED_FLAG)) == fused_wins
        for n in ("fc1", "fc2"):
            d = report[f"blocks.{i}.mlp.{n}"][-1]
            assert d.fmt == "bsr:16x16", d
            assert set(d.est_ms) >= {"mlp pair per-layer bsr_linear", "mlp pair fused bsr_mlp"}
            assert ("fused as sparsevit::bsr_mlp" in d.reason) == fused_wins, d.reason
            assert ("fused bsr_mlp pair 3.00 ms vs 2.00 ms per layer" in d.reason) != fused_wins, d.reason
    calls, programs = [], []
    for mod in (bm, modules):  # the module path goes through ops.bsr_mlp, the lean path through modules
        real = mod.run_direct_pair
        monkeypatch.setattr(mod, "run_direct_pair", lambda *a, real=real, mod=mod: calls.append(mod) or real(*a))
    # the lean path's Python loop, so its calls are counted here; the C++ loop's program is recorded
    # (its MLP kinds: 0 = the fused pair) and checked to be bit-identical in test_fast_paths.py
    real_program = modules.block_program
    monkeypatch.setattr(modules, "block_program", lambda *a: programs.append(real_program(*a)))
    masked = sparsevit.masked_model(model, plan)
    for batch, hooked in ((3, True), (1, False)):  # a hook sends the blocks down the module path
        x = torch.randn(batch, 3, 32, 32)
        blocks = list(fast.blocks)
        hook = blocks[0].register_forward_hook(lambda *a: None) if hooked else None
        calls.clear()
        with torch.no_grad():
            lean = not modules._any_hooks(blocks) and modules._lean_parts(blocks, fast.patch_embed(x)) is not None
            out = fast(x)
            ref64 = masked.double()(x.double())
            ref32 = masked.float()(x)
        assert len(calls) == (len(blocks) if fused_wins else 0), (batch, calls)
        if fused_wins:
            assert all(c is (modules if lean else bm) for c in calls), (batch, lean)
        err, err32 = (out.double() - ref64).abs().max().item(), (ref32.double() - ref64).abs().max().item()
        assert err <= 4 * err32 + 1e-6 * ref64.abs().max().item(), (batch, err, err32)
        for blk in fast.blocks:
            blk.mlp.fc1.__dict__.pop(FUSED_FLAG, None)
        with torch.no_grad():
            assert torch.equal(fast(x), out), "fused and per-layer forwards differ"
        for blk in fast.blocks:
            blk.mlp.fc1.__dict__[FUSED_FLAG] = fused_wins
        if hook is not None:
            assert not lean
            hook.remove()
    assert lean, "without hooks the lean path runs (every layer block-sparse on the C++ kernel)"
    assert programs and programs[0][1][2::27] == [0 if fused_wins else 1] * len(fast.blocks)
    sparsevit.save(fast, tmp_path / "m.sparsevit")
    loaded = sparsevit.load(tmp_path / "m.sparsevit")
    for blk in loaded.blocks:
        assert blk.mlp.fc1.fmt == blk.mlp.fc2.fmt == "bsr:16x16"
        assert bool(blk.mlp.fc1.__dict__.get(FUSED_FLAG)) == fused_wins
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
