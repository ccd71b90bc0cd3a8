"""The one Linear path: registry reasons in the report, forced kernels that cannot run, moving an
accelerated model between devices/dtypes, state_dict round trips, corrupt indices, NaN/Inf
propagation and autocast. Checked against the masked dense model (float64 where it matters)."""
import io
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import sparsevit
from helpers import make_model, random_plan, rel_err
from sparsevit import _ext
from sparsevit.errors import KernelError
from sparsevit.formats import BlockSparseWeight, parse_format
from sparsevit.formats.fine import unit_width
from sparsevit.ops.bsr import bsr_linear
from sparsevit.ops.linear_kernels import registry
from sparsevit.runtime.linear import LayerSpec, SparseLinear, choose_linear
from sparsevit.runtime.report import Report

HAS_CPP = _ext.has_op("bsr_linear")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
MASKS = ("heads", "mlp", "io", "residual", "masks")


@pytest.fixture(autouse=True)
def _model_mode(monkeypatch):
    monkeypatch.setenv("SPARSEVIT_CHOOSE", "model")


def _vit(seed=0):
    """Tiny ViT and a plan with every kind of removal and 16x16-tile masks (sparse layers pay off)."""
    m = make_model("vit_tiny", seed=seed)
    plan = random_plan(m, 7, kinds=MASKS)
    g = torch.Generator().manual_seed(3)
    for name, mask in plan.masks.items():
        out_f, in_f = mask.shape
        keep = torch.rand(-(-out_f // 16), -(-in_f // 16), generator=g) < 0.3
        plan.masks[name] = keep.repeat_interleave(16, 0)[:out_f].repeat_interleave(16, 1)[:, :in_f]
    return m, plan


def _sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def _weight(out_f=70, in_f=90, block=(16, 16), density=0.3, seed=0, dtype=torch.float32):
    """Random weight keeping about ``density`` of its ``block`` tiles (at least one)."""
    g = torch.Generator().manual_seed(seed)
    bh, bw = block
    keep = torch.rand(-(-out_f // bh), -(-in_f // bw), generator=g) < density
    keep[0, 0] = True
    mask = keep.repeat_interleave(bh, 0)[:out_f].repeat_interleave(bw, 1)[:, :in_f]
    return BlockSparseWeight.from_dense(torch.randn(out_f, in_f, generator=g).to(dtype), block=block, mask=mask)


# ------------------------------------------------------------------------ registry and report
def test_registry_lists_every_implementation():
    names = {k.name for k in registry()}
    assert {"dense", "cpp_bsr", "triton_bsr", "cuda_bsr", "semi_structured_2_4", "reference"} <= names


def test_report_shows_why_a_kernel_cannot_run():
    """float64 on CPU: no fast sparse kernel takes it; the report says which and why."""
    m, plan = _vit()
    fast = sparsevit.accelerate(m, plan, dtype=torch.float64)
    masked = [d for d in fast.sparsevit_report if d.name in plan.masks]
    assert masked
    for d in masked:
        assert d.fmt == "dense", d
        assert "cpp_bsr: dtype torch.float64 (takes float32, bfloat16)" in d.reason, d.reason
        assert "triton_bsr: runs on cuda, the layer is on cpu" in d.reason, d.reason


def test_forced_kernel_that_cannot_run_raises():
    m, plan = _vit()
    with pytest.raises(KernelError, match="triton_bsr: runs on cuda, the layer is on cpu"):
        sparsevit.accelerate(m, plan, backend="triton")
    if HAS_CPP:
        with pytest.raises(KernelError, match="cpp_bsr: dtype torch.float64"):
            sparsevit.accelerate(m, plan, backend="cpp", dtype=torch.float64)
    w = _weight()
    with pytest.raises(KernelError, match="runs on cuda"):
        bsr_linear(torch.randn(3, 90), w, kernel="triton_bsr")


def test_given_formats_skip_the_choice():
    torch.manual_seed(0)
    w, mask = torch.randn(64, 48), torch.rand(64, 48) < 0.3
    spec = LayerSpec("fc", w, torch.randn(64), mask, "gelu", 10)
    mod, dec = choose_linear(spec, fmt="bsr:16x8")
    assert isinstance(mod, SparseLinear) and mod.fmt == "bsr:16x8" and dec.fmt == "bsr:16x8"
    assert "format bsr:16x8 given" in dec.reason
    x = torch.randn(5, 48)
    torch.testing.assert_close(mod(x), F.gelu(F.linear(x, w * mask, spec.bias)), rtol=1e-5, atol=1e-5)
    dense, dec = choose_linear(spec, fmt="dense")
    assert dec.fmt == "dense" and not isinstance(dense, SparseLinear)
    with pytest.raises(ValueError, match="bsr:BHxBW"):
        parse_format("bsr:32")
    m, plan = _vit()
    fast = sparsevit.accelerate(m, plan, backend="cpp" if HAS_CPP else "reference")
    formats = {d.name: d.fmt for d in fast.sparsevit_report if d.name in plan.masks}
    from sparsevit.runtime.linear import LinearFactory

    with pytest.raises(ValueError, match="unknown weight format"):
        LinearFactory(Report(), "auto", 1, formats={"blocks.0.attn.qkv": "csr"})
    assert all(parse_format(f)[0] in ("bsr", "fine") for f in formats.values())


def test_plan_tile_shape_is_tried_first():
    torch.manual_seed(1)
    w = torch.randn(96, 96)
    keep = torch.rand(6, 12) < 0.2  # a 16x8-tile mask: the plan's block
    mask = keep.repeat_interleave(16, 0).repeat_interleave(8, 1)
    mod, dec = choose_linear(LayerSpec("fc", w, None, mask, None, 197, block_hint=(16, 8)), backend="sparse"
                             if HAS_CPP else "reference")
    assert dec.fmt == "bsr:16x8", dec


# ------------------------------------------------------------------ moving between devices/dtypes
@needs_cpp
def test_move_accelerated_model_between_dtypes_and_meta():
    import copy

    m, plan = _vit()
    fast = sparsevit.accelerate(m, plan, backend="cpp")
    assert _sparse_layers(fast) and all(s.kernel == ("cpp_fine" if s.is_fine else "cpp_bsr")
                                        for s in _sparse_layers(fast))
    x = torch.randn(2, 3, 32, 32)
    ref = sparsevit.masked_model(m, plan).double()(x.double()).detach()
    with torch.no_grad():
        y32 = fast(x)
        on_meta = copy.deepcopy(fast).to("meta")
        assert on_meta(x.to("meta")).shape == y32.shape
        fast.to(torch.bfloat16)
        assert all(s.values.shape[1] == unit_width(s.fine_tile.item(), torch.bfloat16) if s.is_fine
                   else s.packed.shape[-1] == 2 for s in _sparse_layers(fast))
        assert rel_err(fast(x.bfloat16()), ref) < 0.1
        fast.to(torch.float64)  # no C++ kernel for float64: the layers fall back to the op's choice
        assert all(s.kernel == "auto" for s in _sparse_layers(fast))
        assert rel_err(fast(x.double()), ref) < 2e-2  # weights went through bfloat16
        fast.float()
        assert all(s.values.shape[1] == unit_width(s.fine_tile.item(), torch.float32) if s.is_fine
                   else s.packed.shape[-1] == 1 and s.packed.dtype == torch.float32 for s in _sparse_layers(fast))
        assert rel_err(fast(x), ref) < 2e-2
        assert rel_err(fast(x), y32) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_built_model_runs_on_cuda_and_back():
    m, plan = _vit()
    fast = sparsevit.accelerate(m, plan, backend="cpp" if HAS_CPP else "reference")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = fast(x)
        y_cuda = fast.cuda()(x.cuda()).cpu()
        y_back = fast.cpu()(x)
    torch.testing.assert_close(y_cuda, y, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(y_back, y)


def test_state_dict_saved_on_cpu_loads_into_a_fresh_model():
    m, plan = _vit()
    backend = "cpp" if HAS_CPP else "reference"
    fast = sparsevit.accelerate(m, plan, backend=backend)
    buf = io.BytesIO()
    torch.save(fast.state_dict(), buf)
    other_model, _ = _vit(seed=1)  # other weights, same plan: same structure
    fresh = sparsevit.accelerate(other_model, plan, backend=backend)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), fast(x))
        buf.seek(0)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        # same weights, but each model's chooser timed its own kernels (the patch embedding may run as
        # a convolution in one and a GEMM in the other): equal up to fp32 summation order
        torch.testing.assert_close(fresh(x), fast(x), rtol=1e-5, atol=1e-6)
        if torch.cuda.is_available():
            torch.testing.assert_close(fresh.cuda()(x.cuda()).cpu(), fast(x), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------- corrupt indices
@pytest.mark.parametrize("corrupt, message", [
    (lambda v, c, r: (v, c + 100, r), "col_indices out of range"),
    (lambda v, c, r: (v, c - 100, r), "col_indices out of range"),
    (lambda v, c, r: (v, c, r.flip(0)), "crow_indices must start at 0"),
    (lambda v, c, r: (v, c, torch.cat([r[:1], r[2:2], r[1:]])[: len(r)] * 0 + torch.arange(len(r)) % 2),
     "crow_indices"),
    (lambda v, c, r: (v, c.sort(descending=True).values, r), "strictly increasing"),
    (lambda v, c, r: (v[:, :3], c, r), "values must be"),
    (lambda v, c, r: (v, c.float(), r), "integer"),
])
def test_corrupt_indices_are_refused(corrupt, message):
    w = _weight(out_f=40, in_f=64, block=(40, 16), density=0.5)  # one block row: sort order matters
    assert w.nnz_blocks >= 2
    values, col, crow = corrupt(w.values, w.col_indices, w.crow_indices)
    with pytest.raises(ValueError, match=message):
        BlockSparseWeight(values, col, crow, w.shape, w.block)
    lin = SparseLinear(w)
    sd = lin.state_dict()
    sd.update(values=values, col_indices=col, crow_indices=crow)
    with pytest.raises(ValueError, match="corrupt sparse weight"):
        lin.load_state_dict(sd)
    torch.testing.assert_close(lin(torch.ones(2, 64)), bsr_linear(torch.ones(2, 64), w))  # left intact


@needs_cpp
def test_cpp_op_raises_on_bad_indices_instead_of_crashing():
    """Straight into the compiled op, past every Python check; in a subprocess in case it crashes."""
    code = textwrap.dedent("""
        import torch, sparsevit._ext
        from sparsevit.formats import BlockSparseWeight
        w = BlockSparseWeight.from_dense(torch.randn(64, 64), block=(16, 16))
        x = torch.randn(8, 64)
        cases = {"col": (w.col_indices + 1000, w.crow_indices), "neg": (w.col_indices - 1000, w.crow_indices),
                 "crow": (w.col_indices, w.crow_indices * 1000), "dec": (w.col_indices, w.crow_indices.flip(0))}
        for name, (col, crow) in cases.items():
            try:
                torch.ops.sparsevit_C.bsr_linear(x, w.packed, col, crow, None, 64, 64, 16, 16, 0, -1)
                print(name, "NO ERROR")
            except RuntimeError as e:
                print(name, "raised", str(e).splitlines()[0][:60])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"crashed (rc {r.returncode}): {r.stderr[-500:]}"
    assert r.stdout.count("raised") == 4 and "NO ERROR" not in r.stdout, r.stdout


# ------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (1, 8), (20, 6)])
def test_nan_and_inf_propagate_like_dense(dtype, block):
    w = _weight(out_f=100, in_f=96, block=block, density=0.15, seed=2, dtype=dtype)
    assert w.density < 1
    x = torch.randn(40, 96).to(dtype)
    x[3, 5] = float("nan")
    x[7, 50] = float("inf")
    x[8, 90] = -float("inf")
    x[9, :] = float("nan")
    ref = F.linear(x.double(), w.to_dense().double())
    y = bsr_linear(x, w).double()
    assert torch.equal(y.isnan(), ref.isnan()), f"NaN pattern differs: {int((y.isnan() ^ ref.isnan()).sum())}"
    assert torch.equal(y.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(y[finite], ref[finite], rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------- autocast
def test_ops_under_cpu_autocast_match_dense():
    w = _weight(out_f=70, in_f=90)
    x, b = torch.randn(6, 90), torch.randn(70)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bsr_linear(x, w, b, "gelu")
        ref = F.gelu(F.linear(x, w.to_dense(), b))
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_accelerated_model_under_cpu_autocast_matches_timm():
    m, plan = _vit()
    fast = sparsevit.accelerate(m, plan, backend="cpp" if HAS_CPP else "reference")
    assert _sparse_layers(fast)
    assert any(d.name.endswith("residual_io") for d in fast.sparsevit_report)
    masked = sparsevit.masked_model(m, plan)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fast(x), masked(x)
    with torch.no_grad():
        ref32 = masked(x)
    assert out.dtype == ref.dtype
    # bf16 tolerance: the fast model is as far from fp32 as timm under autocast is (plus slack)
    assert rel_err(out, ref32) < max(3 * rel_err(ref, ref32), 2e-2), (rel_err(out, ref32), rel_err(ref, ref32))


def test_nm_sparse_linear_runs_anywhere_through_its_op():
    """A 2:4 layer on CPU (no 2:4 kernel there): the op's reference, state_dict, dtype moves."""
    torch.manual_seed(4)
    w = torch.randn(24, 32)
    mask = torch.zeros(24, 8, 4, dtype=torch.bool)
    mask.scatter_(-1, torch.rand(24, 8, 4).argsort(-1)[..., :2], True)
    mask = mask.reshape(24, 32)
    lin = torch.nn.Linear(32, 24)
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = SparseLinear.from_dense(lin, mask, activation="gelu_tanh", fmt="2:4")
    assert mod.fmt == "2:4" and mod.weight.density == 0.5
    x = torch.randn(3, 5, 32)
    ref = F.gelu(F.linear(x.double(), (w * mask).double(), lin.bias.double()), approximate="tanh")
    torch.testing.assert_close(mod(x).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.to_dense().weight, w * mask)
    fresh = SparseLinear.from_dense(lin, mask, activation="gelu_tanh", fmt="2:4")
    with torch.no_grad():
        fresh.values.zero_()
    fresh.load_state_dict(mod.state_dict())
    torch.testing.assert_close(fresh(x), mod(x), rtol=0, atol=0)
    with torch.no_grad():
        assert rel_err(mod.to(torch.bfloat16)(x.bfloat16()), ref) < 2e-2
    spec = LayerSpec("fc", w, lin.bias.detach(), mask, None, 7, nm_hint=(2, 4))
    _, dec = choose_linear(spec, backend="reference")
    assert dec.fmt == "2:4", dec


def test_linear_factory_formats_rebuild_without_timing():
    from sparsevit.runtime.linear import LinearFactory

    torch.manual_seed(5)
    w, b, mask = torch.randn(64, 40), torch.randn(64), torch.rand(64, 40) < 0.3
    report = Report()
    make = LinearFactory(report, "auto", 2, block_hint=(16, 16), formats={"l.fc1": "bsr:8x16", "l.fc2": "dense"})
    fc1, fused = make("l.fc1", w, b, mask, (64, 40), 9, activation="gelu")
    fc2, _ = make("l.fc2", w, b, mask, (64, 50), 9)
    assert fused and isinstance(fc1, SparseLinear) and fc1.fmt == "bsr:8x16"
    assert not isinstance(fc2, SparseLinear)
    assert [d.fmt for d in report] == ["bsr:8x16", "dense"] and report[0].shape_before == (64, 40)
    x = torch.randn(4, 40)
    torch.testing.assert_close(fc1(x), F.gelu(F.linear(x, w * mask, b)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fc2(x), F.linear(x, w * mask, b), rtol=1e-5, atol=1e-5)


def test_eager_cpu_calls_skip_the_op_but_compute_the_same():
    """Eager CPU inference calls the C++ BSR kernel directly; a forced kernel, a tracked gradient or a
    dispatch mode still goes through the op, and all give the same numbers as the op."""
    if not _ext.has_op("bsr_linear"):
        pytest.skip("extension not built")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    lin = torch.nn.Linear(70, 45)
    mask = torch.rand(45, 70) > 0.5
    layer = SparseLinear.from_dense(lin, mask, block=(16, 16), activation="gelu")
    x = torch.randn(3, 5, 70)
    with torch.inference_mode():
        direct = layer(x)
        via_op = bsr_linear(x, layer.weight, layer.bias, "gelu")
    assert layer._cpp_direct == (45, 70, 16, 16, 1, -1)  # the op's int arguments: out, in, bh, bw, gelu, any ISA
    torch.testing.assert_close(direct, via_op, rtol=0, atol=0)
    ref = F.gelu(F.linear(x.double(), (lin.weight * BlockSparseWeight.from_dense(lin.weight, (16, 16), mask)
                                       .to_dense().ne(0)).double(), lin.bias.double()))
    assert rel_err(direct, ref) < 1e-5
    with torch.inference_mode(), Seen() as seen:  # under a dispatch mode the op must be what runs
        torch.testing.assert_close(layer(x), direct, rtol=0, atol=0)
    assert any(op.startswith("sparsevit.bsr_linear") for op in seen.ops), seen.ops
    layer.kernel = "reference"
    assert layer._cpp_direct is None
    with torch.inference_mode():
        assert rel_err(layer(x), ref) < 1e-5
    assert layer._cpp_direct == ()  # decided: no direct call for the reference kernel
