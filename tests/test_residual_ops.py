"""The residual-subset ops (fused LayerNorm+gather, scatter-add) against float64 references."""
import pytest
import torch
import torch.nn.functional as F

from sparsevit import _ext
from sparsevit.ops import layernorm_gather, residual_scatter_add

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
