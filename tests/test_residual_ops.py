"""The residual-subset ops (fused LayerNorm+gather, scatter-add) against float64 references."""
import pytest
import torch
import torch.nn.functional as F

from sparsevit import _ext
from sparsevit.ops import layernorm_gather, residual_scatter_add
from sparsevit.ops.residual import FUSED_ADD_NORM_DTYPES, add_norm_fusion, residual_add_layernorm

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _index(D, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(D, generator=g)[:K].sort().values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, K", [((3, 197, 384), 192), ((5, 300), 7), ((2, 7, 7, 96), 95), ((1, 1, 33), 33)])
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_gather(dtype, shape, K, affine):
    torch.manual_seed(0)
    D = shape[-1]
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    idx = _index(D, K, 1)
    w = torch.randn(D) if affine else None
    b = torch.randn(D) if affine else None
    ref = F.layer_norm(x.double(), (D,), None if w is None else w.double(), None if b is None else b.double())[..., idx]
    out = layernorm_gather(x, None if w is None else w[idx].to(dtype), None if b is None else b[idx].to(dtype), idx)
    assert out.dtype == dtype and out.shape == ref.shape
    torch_err = (F.layer_norm(x, (D,), None if w is None else w.to(dtype), None if b is None else b.to(dtype))[..., idx].double() - ref).abs().max()
    err = (out.double() - ref).abs().max()
    assert err <= max(2 * torch_err, TOL[dtype] * ref.abs().max()), f"max err {err:.3e} vs torch {torch_err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, K", [((3, 197, 384), 192), ((5, 300), 7), ((2, 7, 7, 96), 96)])
def test_residual_scatter_add(dtype, shape, K):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    idx = _index(shape[-1], K, 2)
    y = torch.randn(*shape[:-1], K).to(dtype)
    ref = x.double().index_add(-1, idx, y.double())
    out = residual_scatter_add(x, idx, y)
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() <= TOL[dtype] * ref.abs().max()
    assert torch.equal(x, x.clone())  # out of place


def test_ops_check_and_errors():
    x, idx, y = torch.randn(4, 10), torch.tensor([1, 3, 5]), torch.randn(4, 3)
    torch.library.opcheck(torch.ops.sparsevit.residual_scatter_add.default, (x, idx, y))
    torch.library.opcheck(torch.ops.sparsevit.layernorm_gather.default, (x, torch.randn(3), torch.randn(3), idx, 1e-5))
    with pytest.raises(ValueError, match="does not fit"):
        residual_scatter_add(x, idx, torch.randn(4, 4))
    with pytest.raises(TypeError, match="int64"):
        layernorm_gather(x, None, None, idx.int())


@pytest.mark.skipif(not _ext.has_op("layernorm_gather"), reason="compiled extension not built")
def test_compiled_kernels_are_registered():
    assert _ext.has_op("residual_scatter_add")
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.sparsevit_C.residual_scatter_add(torch.randn(2, 4), torch.tensor([9]), torch.randn(2, 1))


def _add_norm_reference(x, y, write, w, b, read, eps):
    """float64: the residual after the add, and the LayerNorm of that residual (gathered)."""
    x2 = x.double() + y.double() if write is None else x.double().index_add(-1, write, y.double())
    D = x.shape[-1]
    ln = F.layer_norm(x2, (D,), None, None, eps)
    ln = ln if read is None else ln[..., read]
    if w is not None:
        ln = ln * w.double()
    if b is not None:
        ln = ln + b.double()
    return x2, ln


def _kernel_add_norm(x, y, write, w, b, read, eps, inplace):
    C = torch.ops.sparsevit_C
    if inplace:
        return x, C.residual_add_layernorm_(x, y, write, w, b, read, eps)
    return C.residual_add_layernorm(x, y, write, w, b, read, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, Kw, Kr", [((3, 197, 384), None, None), ((5, 67), None, None), ((2, 3, 130), None, None),
                                          ((4, 37), None, 20), ((2, 5, 100), 33, None),
                                          ((7, 100), 99, 41), ((1, 1, 37), 1, 37), ((2, 3, 16), 16, 16)])
@pytest.mark.parametrize("inplace", [False, True])
def test_residual_add_layernorm(dtype, shape, Kw, Kr, inplace):
    torch.manual_seed(0)
    D = shape[-1]
    write = None if Kw is None else _index(D, Kw, 3)
    read = None if Kr is None else _index(D, Kr, 4)
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    y = torch.randn(*shape[:-1], D if Kw is None else Kw).to(dtype)
    w, b = torch.randn(D if Kr is None else Kr).to(dtype), torch.randn(D if Kr is None else Kr).to(dtype)
    x_before = x.clone()
    with torch.inference_mode():
        if dtype == torch.bfloat16 and _ext.has_op("residual_add_layernorm"):
            # the kernel itself: models take it only for full-width bf16 rows (the AVX-512 row); the
            # generic bf16 row with subsets is tested here too
            out, ln = _kernel_add_norm(x, y, write, w, b, read, 1e-6, inplace)
        else:
            out, ln = residual_add_layernorm(x, y, write, w, b, read, 1e-6, inplace=inplace)
    assert out.dtype == ln.dtype == dtype and out.shape == x.shape and ln.shape == (*shape[:-1], w.shape[0])
    assert (out is x) == inplace and torch.equal(x, out if inplace else x_before)
    x2_ref, _ = _add_norm_reference(x_before, y, write, None, None, None, 1e-6)
    assert (out.double() - x2_ref).abs().max() <= TOL[dtype] * x2_ref.abs().max()
    # one rounding of x + y, as ATen's add: the residual stream is bit-identical to the unfused path
    assert torch.equal(out, x_before + y if write is None else x_before.index_add(-1, write, y))
    # the norm sees the residual as stored (rounded to bf16 for bf16), as the unfused add-then-norm does
    _, ln_ref = _add_norm_reference(out, torch.zeros_like(out), None, w, b, read, 1e-6)
    if dtype == torch.float32:  # same rounding as the unfused ops: compare against their error too
        sep = F.layer_norm(x_before + y if write is None else x_before.index_add(-1, write, y), (D,), None, None, 1e-6)
        sep = (sep if read is None else sep[..., read]) * w + b
        assert (ln.double() - ln_ref).abs().max() <= max(2 * (sep.double() - ln_ref).abs().max(), 1e-5 * ln_ref.abs().max())
    else:  # within one bf16 rounding of the exact norm of the stored residual
        assert ((ln.double() - ln_ref).abs() <= 2.0 ** -8 * ln_ref.abs() + 1e-6 * ln_ref.abs().max()).all()


@pytest.mark.skipif(not _ext.has_op("residual_add_layernorm"), reason="C++ extension not built")
def test_add_norm_takes_weights_of_any_float_dtype_and_layout():
    """The kernel reads fp32 weight/bias: bf16 ones are widened into a per-thread buffer, others
    converted; every form gives the same bits as the fp32 weights they equal; absent = 1 / 0."""
    torch.manual_seed(1)
    x, y = torch.randn(5, 70).bfloat16(), torch.randn(5, 70).bfloat16()
    w = torch.randn(70).bfloat16().float()  # values exact in bf16, so every form below is the same
    b = torch.randn(70).bfloat16().float()
    C = torch.ops.sparsevit_C
    _, want = C.residual_add_layernorm(x, y, None, w, b, None, 1e-6)
    wide = torch.stack([w, w], 1)[:, 0]  # a strided view
    for ww, bb in ((w.bfloat16(), b.bfloat16()), (w.half(), b.half()), (wide, b), (wide.bfloat16(), b.double())):
        assert torch.equal(C.residual_add_layernorm(x, y, None, ww, bb, None, 1e-6)[1], want), (ww.dtype, bb.dtype)
    _, plain = C.residual_add_layernorm(x, y, None, None, None, None, 1e-6)
    _, ones = C.residual_add_layernorm(x, y, None, torch.ones(70), torch.zeros(70), None, 1e-6)
    assert torch.equal(plain, ones)
    with pytest.raises(RuntimeError, match="one entry per read channel"):
        C.residual_add_layernorm(x, y, None, w[:69], b, None, 1e-6)


@pytest.mark.parametrize("D", [384, 37, 16, 1])
def test_bf16_add_norm_in_models_matches_unfused_ops(D):
    """bf16 full-width rows take the fused kernel inside models (FUSED_ADD_NORM_DTYPES): same residual
    bits as ATen's add, norm within one bf16 rounding of ATen's layer_norm of it; NaN rows stay NaN
    and only them; rows with a subset keep the separate ops."""
    assert torch.bfloat16 in FUSED_ADD_NORM_DTYPES
    torch.manual_seed(D)
    x = (torch.randn(3, 29, D) * 3 + 1).bfloat16()
    y = torch.randn(3, 29, D).bfloat16()
    x[1, 5, 0] = float("nan")
    w, b = torch.randn(D).bfloat16(), torch.randn(D).bfloat16()
    with torch.inference_mode():
        out, ln = residual_add_layernorm(x, y, None, w, b, None, 1e-6)
        ref_out = x + y
        ref_ln = F.layer_norm(ref_out.double(), (D,), w.double(), b.double(), 1e-6)
    assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(ln.isnan().any(-1), ref_out.isnan().any(-1))
    assert torch.equal(out.nan_to_num(), ref_out.nan_to_num())
    ok = ~ref_out.isnan().any(-1)
    err = (ln[ok].double() - ref_ln[ok]).abs()
    assert (err <= 2.0 ** -8 * ref_ln[ok].abs() + 1e-6 * ref_ln[ok].abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_add_layernorm_nan_and_fallback(dtype):
    """A NaN in a row makes that row's norm NaN (and only that row's); the fallback path agrees."""
    x, y = torch.randn(4, 37).to(dtype), torch.randn(4, 5).to(dtype)
    write, read = torch.tensor([0, 3, 9, 20, 36]), torch.tensor([1, 2, 30])
    x[2, 7] = float("nan")
    w, b = torch.randn(3).to(dtype), torch.randn(3).to(dtype)
    with torch.inference_mode():
        if _ext.has_op("residual_add_layernorm"):
            out, ln = _kernel_add_norm(x, y, write, w, b, read, 1e-5, False)
        else:
            out, ln = residual_add_layernorm(x, y, write, w, b, read, 1e-5)
    assert torch.isnan(out[2, 7]) and torch.isnan(ln[2]).all() and not torch.isnan(ln[[0, 1, 3]]).any()
    ref_out, ref_ln = residual_add_layernorm(x, y.requires_grad_(), write, w, b, read, 1e-5)  # autograd: unfused
    assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(ln.isnan(), ref_ln.isnan())
    torch.testing.assert_close(ln[[0, 1, 3]], ref_ln.detach()[[0, 1, 3]], rtol=TOL[dtype], atol=TOL[dtype])
    with pytest.raises(ValueError, match="does not fit"):
        residual_add_layernorm(x, torch.randn(4, 6).to(dtype), write, w, b, read)
    with pytest.raises(TypeError, match="int64"):
        residual_add_layernorm(x, y, write.int(), w, b, read)


@pytest.mark.skipif(not _ext.has_op("residual_add_layernorm"), reason="compiled extension not built")
def test_residual_add_layernorm_kernel_checks():
    C = torch.ops.sparsevit_C
    with pytest.raises(RuntimeError, match="out of range"):
        C.residual_add_layernorm(torch.randn(2, 4), torch.randn(2, 1), torch.tensor([4]), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        C.residual_add_layernorm(torch.randn(2, 4), torch.randn(2, 4).bfloat16(), None, None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="one entry per read channel"):
        C.residual_add_layernorm(torch.randn(2, 4), torch.randn(2, 4), None, torch.ones(3), None, None, 1e-5)


@pytest.mark.parametrize("seed", [0, 3])
def test_chained_block_norms_match_masked_model_and_unfused(seed):
    """vit_tiny with residual subsets ("io"): the chained/fused forward equals the masked dense model
    and the same model with the fusion off; a hook that replaces a block's output is honoured."""
    import sparsevit
    from helpers import IMG, make_model, random_plan, rel_err
    from sparsevit.runtime.modules import SparseBlockSequence

    model = make_model("vit_tiny")
    plan = random_plan(model, seed, kinds=("heads", "mlp", "io", "residual"))
    fast = sparsevit.accelerate(model, plan, verify=False)
    assert isinstance(fast.blocks, SparseBlockSequence)
    x = torch.randn(2, 3, IMG["vit_tiny"], IMG["vit_tiny"])
    with torch.inference_mode():
        ref = sparsevit.masked_model(model, plan)(x)
        out = fast(x)
        with add_norm_fusion(False):
            unfused = fast(x)
        assert rel_err(out, ref) < 1e-4 and rel_err(out, unfused) < 1e-5
        # later blocks update the residual stream in place; the caller's tensor is never touched
        seen = []
        grab = fast.blocks.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        try:
            fast(x)
        finally:
            grab.remove()
        tokens = seen[0]
        before = tokens.clone()
        assert rel_err(fast.blocks(tokens), fast.blocks(before.clone())) == 0
        assert torch.equal(tokens, before)
        handle = fast.blocks[0].register_forward_hook(lambda m, i, o: o * 0.5)
        try:
            hooked = fast(x)
            with add_norm_fusion(False):
                hooked_unfused = fast(x)
        finally:
            handle.remove()
        assert rel_err(hooked, hooked_unfused) < 1e-5 and rel_err(hooked, out) > 1e-3
        handle = fast.blocks[0].register_forward_hook(lambda m, i, o: o.mul_(0.5))  # in place, returns None
        try:
            hooked_in_place = fast(x)
        finally:
            handle.remove()
        assert rel_err(hooked_in_place, hooked) < 1e-5
        # only block-level (and global) hooks turn the chaining off: a hook inside a block fires and
        # counts on the chained path; a pre-hook that edits the next block's input in place is seen
        calls = []
        inner = fast.blocks[0].mlp.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0.5)
        try:
            inner_hooked = fast(x)
            with add_norm_fusion(False):
                inner_unfused = fast(x)
        finally:
            inner.remove()
        assert len(calls) == 2 and rel_err(inner_hooked, inner_unfused) < 1e-5 and rel_err(inner_hooked, out) > 1e-3
        pre = fast.blocks[1].register_forward_pre_hook(lambda m, args: (args[0].mul_(0.5), None)[1])
        try:
            pre_hooked = fast(x)
            with add_norm_fusion(False):
                pre_unfused = fast(x)
        finally:
            pre.remove()
        assert rel_err(pre_hooked, pre_unfused) < 1e-5 and rel_err(pre_hooked, out) > 1e-3


def test_hooks_on_bypassed_norms_fire_and_count():
    """The fused add+norm and the chained blocks compute the full-width norms without calling the
    LayerNorm modules; a hook on one of those modules makes them call it, so the hook fires once per
    forward and its change to the norm's output reaches the result, as in the masked timm model."""
    import sparsevit
    from helpers import IMG, make_model, random_plan, rel_err

    model = make_model("vit_tiny")
    plan = random_plan(model, 1, kinds=("heads", "mlp"))
    fast = sparsevit.accelerate(model, plan, verify=False)
    masked = sparsevit.masked_model(model, plan)
    x = torch.randn(2, 3, IMG["vit_tiny"], IMG["vit_tiny"])
    pairs = [(fast.blocks[1].attn_io.full_norm, masked.blocks[1].norm1),   # carried from block 0
             (fast.blocks[0].mlp_io.full_norm, masked.blocks[0].norm2)]    # fused with the attention add
    with torch.inference_mode():
        plain = fast(x)
        for fast_norm, masked_norm in pairs:
            calls = []
            hooks = [m.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0.5)
                     for m in (fast_norm, masked_norm)]
            try:
                out, ref = fast(x), masked(x)
            finally:
                for h in hooks:
                    h.remove()
            assert len(calls) == 2 and rel_err(out, ref) < 1e-4 and rel_err(out, plain) > 1e-3


@pytest.mark.parametrize("path", ["module", "lean"])
def test_bf16_model_takes_fused_add_norm(monkeypatch, path):
    """A bf16 accelerated ViT (full-width residual) runs its residual adds on the fused kernel, on the
    module path and on the lean block path (which asks the same question of the op's arguments once
    per call), and agrees with the same model on the separate ops and with the fp32 masked dense model."""
    import sparsevit
    from helpers import IMG, make_model, random_plan, rel_err
    from sparsevit.ops import residual
    from sparsevit.runtime import modules

    model = make_model("vit_tiny")
    plan = random_plan(model, 1, kinds=("heads", "mlp"))
    fast = sparsevit.accelerate(model, plan, dtype=torch.bfloat16, verify=False)
    x = torch.randn(2, 3, IMG["vit_tiny"], IMG["vit_tiny"])
    taken, lean_calls = [], []
    if path == "module":
        monkeypatch.setattr(modules, "_lean_parts", lambda blocks, x: None)
        owner, name = residual, "_fused_add_norm_ok"
    else:
        real_lean = modules._lean_forward
        monkeypatch.setattr(modules, "_lean_forward", lambda *a: lean_calls.append(1) or real_lean(*a))
        owner, name = modules, "fused_add_norm_indices_ok"
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a: taken.append(real(*a)) or taken[-1])
    with torch.inference_mode():
        ref = sparsevit.masked_model(model, plan)(x)
        out = fast(x.bfloat16())
        fused_calls = list(taken)
        with add_norm_fusion(False):
            unfused = fast(x.bfloat16())
    assert fused_calls and all(fused_calls) == _ext.has_op("residual_add_layernorm")
    assert len(lean_calls) == (2 if path == "lean" and _ext.has_op("residual_add_layernorm") else 0)
    assert out.dtype == torch.bfloat16 and rel_err(out, unfused) < 2e-2 and rel_err(out, ref) < 5e-2
