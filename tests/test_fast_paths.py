"""The runtime's fast CPU paths against float64 references on odd shapes: fine-grained SparseLinear
("fine:1xT"), the dense implementations a layer may keep (F.linear, oneDNN prepacked, sparsevit's
BSR kernel on the full weight), the chooser's report for them, the fused CPU attention inside an
accelerated model, bf16 end to end, and a save/load round trip with fine-grained layers.
Nothing here asserts a time."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsevit
from helpers import make_model, random_plan, rel_err
from sparsevit import _ext
from sparsevit.errors import KernelError
from sparsevit.formats import parse_format
from sparsevit.formats.fine import unit_width
from sparsevit.models import get_adapter
from sparsevit.ops.dense_cpu import CANDIDATE_NAMES
from sparsevit.runtime.dense_linear import DenseLinear
from sparsevit.runtime.linear import LayerSpec, SparseLinear, best_dense, choose_linear

HAS_FINE = _ext.has_op("fine_linear")
HAS_ATTN = _ext.has_op("attention_cpu")
ACTS = (None, "gelu", "gelu_tanh")


def _ref(x, w, b, act):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return {None: y, "gelu": F.gelu(y), "gelu_tanh": F.gelu(y, approximate="tanh")}[act]


def _fine_mask(out_f, in_f, tile, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out_f, -(-in_f // tile), generator=g) < density
    return keep.repeat_interleave(tile, 1)[:, :in_f]


# ------------------------------------------------------------------- fine-grained SparseLinear
@pytest.mark.parametrize("tile", (1, 4, 8))
@pytest.mark.parametrize("act", ACTS)
def test_fine_sparse_linear_matches_float64(tile, act):
    torch.manual_seed(tile)
    lin = nn.Linear(83, 45)
    mask = _fine_mask(45, 83, tile, 0.25, seed=tile)
    mod = SparseLinear.from_dense(lin, mask, activation=act, fmt=f"fine:1x{tile}")
    assert mod.fmt == f"fine:1x{tile}" and parse_format(mod.fmt) == ("fine", (1, tile))
    x = torch.randn(3, 7, 83)
    ref = _ref(x, lin.weight.detach() * mask, lin.bias.detach(), act)
    assert rel_err(mod(x), ref) < 1e-5
    mod.to(torch.bfloat16)  # re-packs: bf16 stores column pairs for tile 1
    assert mod.values.shape[1] == unit_width(tile, torch.bfloat16)
    assert rel_err(mod(x.bfloat16()), ref) < 3e-2
    mod.to(torch.float64)  # no compiled kernel: the reference runs, exactly
    assert rel_err(mod(x.double()), _ref(x, mod.to_dense().weight.detach(), mod.bias, act)) < 1e-12
    assert rel_err(mod.to_dense().weight.detach(), lin.weight.detach().double() * mask) < 1e-2  # via bf16


def test_fine_state_dict_round_trip_and_corrupt_indices():
    lin = nn.Linear(37, 29)
    mod = SparseLinear.from_dense(lin, _fine_mask(29, 37, 1, 0.3), fmt="fine:1x1", activation="gelu")
    other = SparseLinear.from_dense(nn.Linear(37, 29), _fine_mask(29, 37, 1, 0.6, seed=1), fmt="fine:1x1",
                                    activation="gelu")
    sd = mod.state_dict()
    assert set(sd) == {"values", "col_indices", "row_ptr", "bias", "shape", "fine_tile"}
    other.load_state_dict(sd)
    x = torch.randn(11, 37)
    torch.testing.assert_close(other(x), mod(x), rtol=0, atol=0)
    bad = dict(sd, col_indices=sd["col_indices"].clone())
    bad["col_indices"][0] = 999
    with pytest.raises(ValueError, match="corrupt sparse weight"):
        other.load_state_dict(bad)


def test_fine_layer_on_meta_and_reference_kernel():
    lin = nn.Linear(21, 13)
    mask = _fine_mask(13, 21, 4, 0.4)
    ref_mod = SparseLinear.from_dense(lin, mask, fmt="fine:1x4", kernel="reference")
    x = torch.randn(5, 21)
    assert rel_err(ref_mod(x), _ref(x, lin.weight.detach() * mask, lin.bias.detach(), None)) < 1e-6
    assert ref_mod.to("meta")(x.to("meta")).shape == (5, 13)


@pytest.mark.skipif(not HAS_FINE, reason="C++ extension without fine_linear")
def test_chooser_tries_the_plans_fine_tile_first_and_reports_why(monkeypatch):
    monkeypatch.setenv("SPARSEVIT_CHOOSE", "model")
    torch.manual_seed(0)
    w, mask = torch.randn(96, 130), _fine_mask(96, 130, 1, 0.1)
    spec = LayerSpec("blocks.0.mlp.fc1", w, torch.randn(96), mask, "gelu", 40, block_hint=(1, 1))
    mod, dec = choose_linear(spec)
    assert isinstance(mod, SparseLinear) and dec.fmt == "fine:1x1", dec.reason
    assert "cpp_fine fine:1x1" in dec.est_ms and "dense torch_linear" in dec.est_ms
    x = torch.randn(40, 130)
    assert rel_err(mod(x), _ref(x, w * mask, spec.bias, "gelu")) < 1e-5
    # too dense for the fine kernel: left out, with the reason
    spec = LayerSpec("fc2", w, None, _fine_mask(96, 130, 1, 0.8), None, 40, block_hint=(1, 1))
    mod, dec = choose_linear(spec)
    assert not dec.fmt.startswith("fine") and "density above 0.5" in dec.reason


# ------------------------------------------------------------------------------ dense at peak
@pytest.mark.parametrize("kernel", CANDIDATE_NAMES)
@pytest.mark.parametrize("act", ACTS)
def test_dense_linear_kernels_match_float64(kernel, act):
    torch.manual_seed(1)
    lin = nn.Linear(70, 51)
    try:
        mod = DenseLinear.from_dense(lin, None, act, kernel)
    except KernelError as exc:
        pytest.skip(str(exc))
    x = torch.randn(2, 9, 70)
    ref = _ref(x, lin.weight.detach(), lin.bias.detach(), act)
    with torch.inference_mode():
        assert rel_err(mod(x), ref) < 1e-5
    assert set(mod.state_dict()) == {"weight", "bias"}  # loads into a plain nn.Linear / DenseLinear
    mod.to(torch.bfloat16)
    with torch.inference_mode():
        assert mod.kernel == kernel and rel_err(mod(x.bfloat16()), ref) < 3e-2
    mod.to(torch.float64)  # neither oneDNN nor the BSR kernel run float64: back to F.linear
    assert mod.kernel == "torch_linear"
    import copy

    copy.deepcopy(mod)  # the derived layout is never pickled


def test_best_dense_measures_every_option_and_says_which(monkeypatch):
    monkeypatch.setenv("SPARSEVIT_CHOOSE", "measure")
    torch.manual_seed(2)
    spec = LayerSpec("blocks.1.attn.proj", torch.randn(67, 96), torch.randn(67), None, None, 50)
    mod, dec = best_dense(spec, why="dense: test")
    assert isinstance(mod, DenseLinear) and dec.action == "dense" and dec.reason.startswith("dense: test")
    assert "fastest dense:" in dec.reason
    runnable = [c for c in CANDIDATE_NAMES if c == "torch_linear" or not DenseLinear.from_dense(
        spec.as_linear()).kernel_reasons(c)]
    assert {f"dense {c}" for c in runnable} == set(dec.est_ms)
    assert dec.est_ms[f"dense {mod.kernel}"] == min(dec.est_ms.values())
    x = torch.randn(50, 96)
    with torch.inference_mode():
        assert rel_err(mod(x), _ref(x, spec.weight, spec.bias, None)) < 1e-5


def test_backend_dense_stays_plain_torch():
    model = make_model("vit_tiny")
    fast = sparsevit.accelerate(model, random_plan(model, 1, kinds=("heads", "mlp")), backend="dense")
    assert all(getattr(m, "kernel", "torch_linear") == "torch_linear" for m in fast.modules()
               if isinstance(m, nn.Linear))
    assert all(d.kernel == "sdpa" for d in fast.sparsevit_report if d.name.endswith(".attn"))


# --------------------------------------------------------------------------- attention, bf16
@pytest.mark.skipif(not HAS_ATTN, reason="C++ extension without attention_cpu")
@pytest.mark.parametrize("key", ("vit_tiny", "swin_tiny"))
def test_accelerated_model_uses_fused_cpu_attention_and_matches(key, monkeypatch):
    calls = []
    real = torch.ops.sparsevit_C.attention_cpu

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return real(*args)

    model = make_model(key)
    plan = random_plan(model, 4, kinds=("heads", "qk", "v", "mlp"))
    fast = sparsevit.accelerate(model, plan)
    attn = [d for d in fast.sparsevit_report if d.name.endswith(".attn") and d.action != "dropped"]
    assert attn and all(d.kernel.startswith("cpp_attention") for d in attn), [d.reason for d in attn]
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    monkeypatch.setattr(torch.ops.sparsevit_C, "attention_cpu", Spy(), raising=False)
    with torch.no_grad():
        out = fast(x)
        ref = sparsevit.masked_model(model, plan).double()(x.double())
    assert calls, "the fused CPU attention was not called"
    assert rel_err(out, ref) < 1e-4


def test_bf16_end_to_end_uses_bf16_kernels():
    model = make_model("vit_tiny")
    plan = random_plan(model, 2, kinds=("heads", "mlp", "masks"))
    fast = sparsevit.accelerate(model, plan, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    sparse = [m for m in fast.modules() if isinstance(m, SparseLinear)]
    assert all(m.values.dtype == torch.bfloat16 for m in sparse)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        out = fast(x.bfloat16())
        ref = sparsevit.masked_model(model, plan).double()(x.double())
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 5e-2


# ------------------------------------------------------------------------------ save / load
@pytest.mark.skipif(not HAS_FINE, reason="C++ extension without fine_linear")
def test_save_load_round_trips_fine_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEVIT_CHOOSE", "model")
    model = make_model("vit_tiny")
    plan = random_plan(model, 3, kinds=("heads", "mlp"))
    g = torch.Generator().manual_seed(0)
    for name, lin in get_adapter(model).linear_modules().items():
        if name.endswith("fc1"):
            plan.masks[name] = torch.rand(lin.weight.shape, generator=g) < 0.1
    plan.block = [1, 1]
    fast = sparsevit.accelerate(model, plan)
    fine = [n for n, m in fast.named_modules() if isinstance(m, SparseLinear) and m.is_fine]
    assert fine, fast.sparsevit_report.table()
    path = tmp_path / "fine.safetensors"
    sparsevit.save(fast, path)
    loaded = sparsevit.load(path)
    assert [n for n, m in loaded.named_modules() if isinstance(m, SparseLinear) and m.is_fine] == fine
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x), rtol=1e-5, atol=1e-5)
        ref = sparsevit.masked_model(model, plan).double()(x.double())
    assert rel_err(loaded(x), ref) < 1e-4


# --------------------------------------------------------------------------- lean block sequence
HAS_BSR = _ext.has_op("bsr_linear") and HAS_ATTN


def _block_sparse_vit():
    """vit_tiny (3 heads, 17 tokens) with 16x16 tiles pruned: every block Linear is a C++ BSR layer."""
    model = make_model("vit_tiny")
    plan = sparsevit.prune(model, method="magnitude_unstructured", criterion="l1", sparsity=0.6, block=(16, 16),
                           progress=False)
    fast = sparsevit.accelerate(model, plan, backend="cpp", verify=False)
    lins = [m for blk in fast.blocks for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2)]
    assert all(isinstance(m, SparseLinear) and m.kind == "bsr" for m in lins), [type(m).__name__ for m in lins]
    return model, plan, fast


@pytest.mark.skipif(not HAS_BSR, reason="C++ extension without bsr_linear / attention_cpu")
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16))
def test_bsr_op_bias_layouts_match_float64(x_dtype):
    """The op reads an fp32 contiguous bias in place when the blocks have no padded rows and copies it
    (per-thread scratch, reused between calls of different sizes) otherwise: strided, float64 and
    bf16 biases, padded block heights and partial last block rows all match float64, and the
    caller's bias is never written."""
    from sparsevit.formats import BlockSparseWeight

    g = torch.Generator().manual_seed(5)
    cases = [((32, 32), 96, 70), ((32, 32), 101, 64), ((24, 8), 72, 40), ((16, 16), 48, 33), ((32, 32), 64, 96)]
    for (bh, bw), out_f, in_f in cases:
        w = torch.randn(out_f, in_f, generator=g)
        mask = torch.rand(out_f, in_f, generator=g) < 0.4
        ws = BlockSparseWeight.from_dense(w.to(x_dtype), block=(bh, bw), mask=mask)
        x = torch.randn(37, in_f, generator=g).to(x_dtype)
        wide = torch.randn(out_f, 2, generator=g)
        for bias in (wide[:, 0].contiguous(), wide[:, 1], wide[:, 0].double(), wide[:, 0].to(torch.bfloat16)):
            before = bias.clone()
            y = torch.ops.sparsevit_C.bsr_linear(x, ws.packed, ws.col_indices, ws.crow_indices, bias,
                                                 out_f, in_f, bh, bw, 0, -1)
            ref = _ref(x, ws.to_dense(), bias, None)
            tol = 2e-2 if x_dtype == torch.bfloat16 else 1e-5
            assert rel_err(y, ref) < tol, ((bh, bw), out_f, bias.dtype, bias.stride())
            assert torch.equal(bias, before)


@pytest.mark.skipif(not HAS_BSR, reason="C++ extension without bsr_linear / attention_cpu")
@pytest.mark.parametrize("threads", (1, 2))
def test_bsr_op_unread_column_scan_inline_and_in_chunks(threads):
    """Non-finite inputs in block columns no kept block reads: the scan runs inline for few tokens
    and in parallel chunks for many (over 32768 elements); the NaN/Inf pattern matches dense float64
    either way, first and last tokens included."""
    from sparsevit.formats import BlockSparseWeight

    g = torch.Generator().manual_seed(11)
    out_f, in_f = 40, 3 * 32 + 7
    keep = torch.rand(2, 4, generator=g) < 0.6
    keep[:, 1] = False  # block column 1 is read by no kept block
    keep[0, 0] = True
    mask = keep.repeat_interleave(32, 0).repeat_interleave(32, 1)[:out_f, :in_f]
    ws = BlockSparseWeight.from_dense(torch.randn(out_f, in_f, generator=g), block=(32, 32), mask=mask)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for T in (5, 197, 1601):
            x = torch.randn(T, in_f, generator=g)
            for t in (0, T // 2, T - 1):
                x[t, 32 + (t % 32)] = float("nan") if t % 2 else float("inf")
            y = torch.ops.sparsevit_C.bsr_linear(x, ws.packed, ws.col_indices, ws.crow_indices, None, out_f, in_f,
                                                 32, 32, 0, -1).double()
            ref = F.linear(x.double(), ws.to_dense().double())
            assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf()), T
            fin = ref.isfinite()
            assert fin.sum() > 0 and rel_err(y[fin], ref[fin]) < 1e-5
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not HAS_BSR, reason="C++ extension without bsr_linear / attention_cpu")
def test_kernel_bench_times_the_models_op_call_on_the_masked_product():
    """bench/kernels.py times the op as SparseLinear calls it: the callable it times computes the
    masked product (float64 reference), bit-identical to the generic wrapper."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    try:
        import kernels as kernel_bench
    finally:
        sys.path.pop(0)
    from sparsevit.formats import BlockSparseWeight
    from sparsevit.ops.bsr import bsr_linear

    g = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(70, 45, generator=g).to(dtype)
        mask = kernel_bench.block_mask(70, 45, (32, 32), 0.5, g)
        x = torch.randn(23, 45, generator=g).to(dtype)
        y = kernel_bench.make_methods(x, w, mask, (32, 32), wanted=("sparsevit",))["sparsevit"]()
        ws = BlockSparseWeight.from_dense(w, block=(32, 32), mask=mask)
        assert torch.equal(y, bsr_linear(x, ws))
        assert rel_err(y, _ref(x, w * mask, None, None)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.skipif(not HAS_BSR, reason="C++ extension without bsr_linear / attention_cpu")
def test_lean_block_sequence_matches_module_path_and_float64(monkeypatch):
    """Eager CPU inference runs the blocks as straight op calls: bit-identical to the module path,
    close to the masked dense model in float64; a hook on an inner Linear, grad mode or a dtype the
    layers do not hold send the forward down the module path (the hook fires)."""
    from sparsevit.runtime import modules

    model, plan, fast = _block_sparse_vit()
    x = torch.randn(3, 3, 32, 32)
    lean_calls, wrapper_calls = [], []
    real_lean, real_attention = modules._lean_forward, modules.sparse_attention
    monkeypatch.setattr(modules, "_lean_forward", lambda *a: lean_calls.append(1) or real_lean(*a))
    monkeypatch.setattr(modules, "sparse_attention", lambda *a: wrapper_calls.append(1) or real_attention(*a))
    real_add_norm = modules.residual_add_layernorm
    monkeypatch.setattr(modules, "residual_add_layernorm",
                        lambda *a, **k: wrapper_calls.append(2) or real_add_norm(*a, **k))
    with torch.inference_mode():
        out = fast(x)
        assert len(lean_calls) == 1 and wrapper_calls == []  # the lean path calls the ops itself
        with monkeypatch.context() as m:
            m.setattr(modules, "_lean_parts", lambda blocks, x: None)
            module_path = fast(x)
        depth = len(fast.blocks)
        assert wrapper_calls.count(1) == depth and wrapper_calls.count(2) == 2 * depth - 1
        ref = sparsevit.masked_model(model, plan).double()(x.double())
    assert torch.equal(out, module_path)
    assert rel_err(out, ref) < 1e-4
    seen = []
    handle = fast.blocks[1].mlp.fc1.register_forward_hook(lambda mod, i, o: seen.append(1))
    try:
        with torch.inference_mode():
            assert torch.equal(fast(x), out)
    finally:
        handle.remove()
    assert seen == [1] and len(lean_calls) == 1
    with torch.enable_grad():
        assert rel_err(fast(x).detach(), out) < 1e-6
    assert len(lean_calls) == 1
    with torch.inference_mode():
        x64 = torch.randn(2, 17, 192, dtype=torch.float64)
        with pytest.raises(Exception):
            fast.blocks(x64)  # float64 tokens into float32 layers: the module path refuses, as before
    assert len(lean_calls) == 1


def _fine_and_dense_vits():
    """vit_tiny pruned 85% unstructured (fine-grained layers, fused fine_mlp pairs), and pruned 50%
    grouped (sliced dense layers) with the dense kernels set by hand: oneDNN on some, sparsevit's
    BSR kernel on the full weight on the others, F.linear on none (the lean path refuses it)."""
    from sparsevit.runtime.dense_linear import DenseLinear

    model = make_model("vit_tiny")
    fine_plan = sparsevit.prune(model, method="magnitude_unstructured", criterion="l1", sparsity=0.85,
                                progress=False)
    names = [f"blocks.{i}.{m}" for i in range(len(model.blocks)) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    fine = sparsevit.accelerate(model, fine_plan, backend="sparse", formats={n: "fine:1x1" for n in names}, verify=False)
    assert all(m.is_fine for blk in fine.blocks for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2))
    dense_plan = sparsevit.prune(model, method="grouped", criterion="l1", sparsity=0.5, progress=False)
    dense = sparsevit.accelerate(model, dense_plan, verify=False)
    i = 0
    for blk in dense.blocks:
        for parent, name in ((blk.attn, "qkv"), (blk.attn, "proj"), (blk.mlp, "fc1"), (blk.mlp, "fc2")):
            m = getattr(parent, name)
            if type(m) is not DenseLinear:  # a sliced layer the chooser put on a sparse kernel
                m = DenseLinear.from_dense(m.to_dense(), activation=m.activation)
            m.set_kernel("onednn_packed" if i % 3 else "sparsevit_bsr_full")
            setattr(parent, name, m)
            i += 1
    return model, ((fine_plan, fine), (dense_plan, dense))


@pytest.mark.skipif(not (HAS_BSR and _ext.has_op("fine_mlp")), reason="C++ extension without its CPU ops")
def test_lean_path_runs_fine_grained_and_dense_layers_bit_identically(monkeypatch):
    """Fine-grained layers (and their fused MLP pairs) and dense layers on oneDNN or the BSR kernel take
    the lean path too: bit-identical to the module path, close to the masked dense model in float64;
    a dense layer set back to F.linear sends the forward down the module path."""
    from sparsevit.runtime import modules

    model, builds = _fine_and_dense_vits()
    lean_calls = []
    real_lean = modules._lean_forward
    monkeypatch.setattr(modules, "_lean_forward", lambda *a: lean_calls.append(1) or real_lean(*a))
    x = torch.randn(3, 3, 32, 32)
    outs = []
    for plan, fast in builds:
        with torch.inference_mode():
            out = fast(x)
            outs.append(out)
            with monkeypatch.context() as m:
                m.setattr(modules, "_lean_parts", lambda blocks, x: None)
                module_path = fast(x)
            ref = sparsevit.masked_model(model, plan).double()(x.double())
        assert torch.equal(out, module_path)
        assert rel_err(out, ref) < 1e-4
    assert len(lean_calls) == 2
    dense = builds[1][1]
    dense.blocks[1].mlp.fc2.set_kernel("torch_linear")
    with torch.inference_mode():
        assert rel_err(dense(x), outs[1]) < 1e-5 and len(lean_calls) == 2


@pytest.mark.skipif(not HAS_BSR, reason="C++ extension without bsr_linear / attention_cpu")
def test_lean_path_bf16_and_unfused_norms_match_module_path(monkeypatch):
    """bf16 layers (the fused add+norm at full width) and the add+norm fusion turned off: the lean
    path gives the module path's result bit for bit."""
    from sparsevit.ops import residual
    from sparsevit.runtime import modules

    _model, _plan, fast = _block_sparse_vit()
    fast = fast.to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    lean_calls = []
    real_lean = modules._lean_forward
    monkeypatch.setattr(modules, "_lean_forward", lambda *a: lean_calls.append(1) or real_lean(*a))
    with torch.inference_mode():
        for fusion in (True, False):
            with residual.add_norm_fusion(fusion):
                out = fast(x)
                with monkeypatch.context() as m:
                    m.setattr(modules, "_lean_parts", lambda blocks, x: None)
                    assert torch.equal(out, fast(x)), fusion
    assert len(lean_calls) == 2


@pytest.mark.skipif(not HAS_BSR, reason="C++ extension without bsr_linear / attention_cpu")
def test_lean_path_sees_replaced_modules_and_activation_changes():
    """The lean path reads the modules at every forward: a Linear replaced after the first forward, or
    a changed activation, is what the next forward computes."""
    _, _, fast = _block_sparse_vit()
    x = torch.randn(1, 17, 192)
    with torch.inference_mode():
        before = fast.blocks(x.clone())
        old = fast.blocks[2].mlp.fc2
        fast.blocks[2].mlp.fc2 = nn.Linear(old.in_features, old.out_features)
        replaced = fast.blocks(x.clone())
        fast.blocks[2].mlp.fc2 = old
        assert torch.equal(fast.blocks(x.clone()), before) and not torch.equal(replaced, before)
        fc1 = fast.blocks[0].mlp.fc1
        dense_fc1 = fc1.to_dense()
        h = torch.randn(1, 17, fc1.in_features)
        fc1.activation = "gelu_tanh" if fc1.activation != "gelu_tanh" else "gelu"
        want = F.gelu(dense_fc1(h), approximate="tanh" if fc1.activation == "gelu_tanh" else "none")
        assert rel_err(fc1(h), want) < 1e-5



@pytest.mark.skipif(not HAS_BSR, reason="C++ extension without bsr_linear / attention_cpu")
def test_lean_path_refuses_relative_position_bias(monkeypatch):
    """The lean path's attention call has no bias: a block whose attention holds a relative-position
    table takes the module path, which adds it; were the check skipped, the lean path would run and
    compute something else."""
    from sparsevit.runtime import modules
    from sparsevit.runtime.modules import SparseAttention

    _, _, fast = _block_sparse_vit()
    attn = fast.blocks[1].attn
    n = 17  # tokens of vit_tiny at 32x32 (16 patches + class token)
    attn.relative_position_bias_table = nn.Parameter(torch.randn(n * n, attn.num_heads))
    attn.relative_position_index = torch.arange(n * n).view(n, n)
    x = torch.randn(2, n, 192)
    lean_calls = []
    real_lean = modules._lean_forward
    monkeypatch.setattr(modules, "_lean_forward", lambda *a: lean_calls.append(1) or real_lean(*a))
    with torch.inference_mode():
        out = fast.blocks(x.clone())
        assert not lean_calls
        with monkeypatch.context() as m:  # each block on its own: nothing chained, the bias added
            m.setattr(modules, "_lean_parts", lambda blocks, x: None)
            unchained = x.clone()
            for blk in fast.blocks:
                unchained = blk(unchained)
        monkeypatch.setattr(SparseAttention, "has_rel_pos_bias", lambda self: False)
        wrong = fast.blocks(x.clone())
    assert rel_err(out, unchained) < 1e-6
    assert lean_calls == [1]  # every other part qualifies: the bias check is what refuses
    assert rel_err(wrong, out) > 1e-3


def _residual_subset_bsr_vit():
    """vit_tiny with residual channels, branch read/write subsets, heads and MLP channels pruned and
    every Linear forced onto 16x16 BSR (random masks on half of them): the add+norm carries indices."""
    model = make_model("vit_tiny")
    plan = random_plan(model, seed=4, kinds=("residual", "io", "heads", "mlp", "masks"))
    names = get_adapter(model).linear_modules()
    fast = sparsevit.accelerate(model, plan, backend="cpp", verify=False,
                                formats={n: "bsr:16x16" for n in names if n.startswith("blocks.")})
    return model, plan, fast


@pytest.mark.skipif(not (HAS_BSR and _ext.has_op("lean_vit_blocks")), reason="C++ extension without its CPU ops")
@pytest.mark.parametrize("case", ["fp32", "bf16", "fp32 unfused pairs", "residual subsets"])
def test_block_loop_in_cpp_is_bit_identical_to_the_python_loop(monkeypatch, case):
    """Where every step of every block is a BSR call, the fused MLP pair, the fused attention or the
    fused add+norm, the lean path runs its loop in C++ (lean_vit_blocks): the same ops on the same
    arguments, so the Python loop's result bit for bit (and the masked model's in float64); a
    fine-grained model keeps the Python loop."""
    from sparsevit.ops.bsr_mlp import FUSED_FLAG
    from sparsevit.runtime import modules

    model, plan, fast = _residual_subset_bsr_vit() if case == "residual subsets" else _block_sparse_vit()
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    fast = fast.to(dtype)
    for blk in fast.blocks:
        if case == "fp32 unfused pairs":
            blk.mlp.fc1.__dict__[FUSED_FLAG] = False
    programs = []
    real = modules.block_program
    monkeypatch.setattr(modules, "block_program", lambda *a: programs.append(real(*a)) or programs[-1])
    x = torch.randn(3, 3, 32, 32, dtype=dtype)
    with torch.inference_mode():
        out = fast(x)
        with monkeypatch.context() as m:
            m.setattr(modules, "block_program", lambda *a: None)
            python_loop = fast(x)
        ref = sparsevit.masked_model(model, plan).double()(x.double())
    assert len(programs) == 1 and programs[0] is not None, "the C++ loop did not run"
    kinds = programs[0][1][2::27]
    assert kinds == [1] * len(fast.blocks) if case == "fp32 unfused pairs" else set(kinds) <= {0, 1}
    assert torch.equal(out, python_loop)
    assert rel_err(out, ref) < (5e-2 if dtype == torch.bfloat16 else 1e-4)
    if case == "residual subsets":
        assert any(blk.attn_io.read is not None or blk.attn_io.write is not None for blk in fast.blocks)
    _, builds = _fine_and_dense_vits()
    programs.clear()
    with torch.inference_mode():
        builds[0][1](torch.randn(1, 3, 32, 32))
    assert programs == [None]  # fine-grained layers: the Python loop
