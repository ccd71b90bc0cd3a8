"""SparseLinear / DenseLinear modules and choose_linear (CPU). No timing here: choose_linear runs
on its cost model (SPARSEVIT_CHOOSE=model) and the assertions hold with or without the C++ kernel."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsevit import _ext
from sparsevit.errors import KernelError
from sparsevit.ops.bsr import apply_activation
from sparsevit.runtime.linear import DenseLinear, LayerSpec, SparseLinear, block_density
from sparsevit.runtime.linear import choose_linear as _choose_spec
from sparsevit.runtime.report import LayerDecision

HAS_CPP = _ext.has_op("bsr_linear")


@pytest.fixture(autouse=True)
def _model_mode(monkeypatch):
    monkeypatch.setenv("SPARSEVIT_CHOOSE", "model")


def choose_linear(lin, mask, *, name, activation=None, tokens=197 * 8, backend="auto"):
    spec = LayerSpec(name, lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), mask, activation,
                     tokens)
    return _choose_spec(spec, backend)


def _linear(out_f=192, in_f=160, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.add_(0.01)  # never exactly zero
    return lin


def _block_mask(out_f, in_f, block, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    bh, bw = block
    nbr, nbc = -(-out_f // bh), -(-in_f // bw)
    keep = torch.rand(nbr, nbc, generator=g) >= sparsity
    keep[0, 0] = True
    return keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:out_f, :in_f]


def _masked_ref(lin, mask, x, act=None):
    w = lin.weight.detach().double() * (1 if mask is None else mask.double())
    b = None if lin.bias is None else lin.bias.detach().double()
    return apply_activation(F.linear(x.double(), w, b), act)


def _check(mod, lin, mask, x, act=None, what=""):
    with torch.no_grad():
        y = mod(x)
        ref = _masked_ref(lin, mask, x, act)
        dense = apply_activation(F.linear(x, lin.weight * (1 if mask is None else mask), lin.bias), act)
    err = (y.double() - ref).abs().max().item()
    err_dense = (dense.double() - ref).abs().max().item()
    assert y.shape == (*x.shape[:-1], lin.out_features)
    assert err <= 2 * err_dense + 1e-6, f"{what}: err {err:.3g} vs dense-torch {err_dense:.3g}"


@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh"])
def test_sparse_linear_matches_masked_dense(act):
    lin = _linear()
    mask = torch.rand(192, 160) < 0.2
    mod = SparseLinear.from_dense(lin, mask, block=(32, 32), activation=act)
    _check(mod, lin, mask, torch.randn(2, 197, 160), act, "SparseLinear")
    ref_mod = SparseLinear.from_dense(lin, mask, block=(16, 16), activation=act, kernel="reference")
    _check(ref_mod, lin, mask, torch.randn(3, 160), act, "SparseLinear(reference)")
    d = mod.to_dense()
    assert isinstance(d, nn.Linear)
    torch.testing.assert_close(d.weight, lin.weight * mask, rtol=0, atol=0)
    torch.testing.assert_close(d.bias, lin.bias, rtol=0, atol=0)


def test_sparse_linear_state_dict_and_dtype():
    lin = _linear(bias=True)
    mask = _block_mask(192, 160, (32, 32), 0.7)
    mod = SparseLinear.from_dense(lin, mask, block=(32, 32), activation="gelu")
    sd = mod.state_dict()
    assert {"values", "col_indices", "crow_indices", "bias", "shape", "block"} <= set(sd)
    assert "packed" not in sd  # rebuilt on load
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = SparseLinear.from_dense(_linear(seed=1), None, block=(32, 32), activation="gelu")  # other nnz
    other.load_state_dict(torch.load(buf))
    x = torch.randn(5, 160)
    torch.testing.assert_close(other(x), mod(x), rtol=0, atol=0)
    assert torch.equal(other.packed, mod.packed)
    # .to(bfloat16) re-packs into the paired layout and still computes the same function
    m16 = SparseLinear.from_dense(lin, mask, block=(32, 32), activation="gelu").to(torch.bfloat16)
    assert m16.packed.shape[-1] == 2 and m16.values.dtype == torch.bfloat16
    y16 = m16(x.bfloat16()).float()
    torch.testing.assert_close(y16, mod(x), rtol=2e-2, atol=2e-2)


def test_dense_linear():
    lin = _linear()
    mask = torch.rand(192, 160) < 0.5
    mod = DenseLinear.from_dense(lin, mask, activation="gelu")
    assert isinstance(mod, nn.Linear)
    _check(mod, lin, mask, torch.randn(4, 160), "gelu", "DenseLinear")


def test_block_density():
    m = _block_mask(128, 128, (32, 32), 0.75, seed=2)
    d = block_density(m, (32, 32))
    assert d == pytest.approx(m.float().mean().item())
    assert block_density(torch.ones(10, 10, dtype=torch.bool), (32, 32)) == 1.0


def test_choose_linear_dense_mask_gives_dense():
    lin = _linear()
    mod, dec = choose_linear(lin, torch.ones(192, 160, dtype=torch.bool), name="fc1", activation="gelu")
    assert isinstance(dec, LayerDecision) and dec.name == "fc1"
    assert isinstance(mod, DenseLinear) and dec.action == "dense" and dec.fmt == "dense"
    assert "dense" in dec.reason
    _check(mod, lin, None, torch.randn(7, 160), "gelu", "choose(dense mask)")
    mod2, dec2 = choose_linear(lin, None, name="fc1")  # no zeros in the weight either
    assert isinstance(mod2, DenseLinear)


def test_choose_linear_sparse_mask():
    lin = _linear(768, 768)
    mask = _block_mask(768, 768, (32, 32), 0.9, seed=3)
    mod, dec = choose_linear(lin, mask, name="blocks.0.mlp.fc1", activation="gelu", tokens=197)
    if HAS_CPP:
        assert isinstance(mod, SparseLinear), dec.reason
        assert dec.action == "packed" and dec.fmt.startswith("bsr:") and "faster than dense" in dec.reason
        assert dec.density < 0.2 and "dense torch_linear" in dec.est_ms
    else:
        assert isinstance(mod, DenseLinear) and "compiled extension" in dec.reason
    _check(mod, lin, mask, torch.randn(2, 9, 768), "gelu", "choose(90% blocks)")


@pytest.mark.parametrize("backend", ["dense", "reference", "cpp", "sparse"])
def test_choose_linear_backends_agree(backend):
    lin = _linear(200, 300)
    mask = torch.rand(200, 300) < 0.1  # unstructured: blocks keep every nonzero, results stay exact
    if backend in ("cpp", "sparse") and not HAS_CPP:
        with pytest.raises(KernelError, match="cpp_bsr: compiled extension"):
            choose_linear(lin, mask, name="l", backend=backend)
        return
    mod, dec = choose_linear(lin, mask, name="l", activation="gelu_tanh", backend=backend)
    expected = {"dense": DenseLinear, "reference": SparseLinear, "cpp": SparseLinear, "sparse": SparseLinear}
    assert isinstance(mod, expected[backend]), dec.reason
    if backend == "reference":
        assert mod.kernel == "reference" and dec.kernel == "reference_bsr"
    assert backend in dec.reason
    _check(mod, lin, mask, torch.randn(197, 300), "gelu_tanh", f"backend={backend}")


def test_choose_linear_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        choose_linear(_linear(), None, name="l", backend="magic")


def test_mlp_fc1_gelu_fused():
    """fc1 (+GELU, fused) and fc2 both sparse compute the masked dense MLP."""
    fc1, fc2 = _linear(256, 96, seed=4), _linear(96, 256, seed=5)
    m1, m2 = _block_mask(256, 96, (32, 32), 0.6, 1), _block_mask(96, 256, (32, 32), 0.6, 2)
    s1 = SparseLinear.from_dense(fc1, m1, activation="gelu")
    s2 = SparseLinear.from_dense(fc2, m2)
    x = torch.randn(2, 197, 96)
    ref = F.linear(F.gelu(F.linear(x.double(), fc1.weight.double() * m1, fc1.bias.double())),
                   fc2.weight.double() * m2, fc2.bias.double())
    torch.testing.assert_close(s2(s1(x)).double(), ref, rtol=1e-4, atol=1e-4)
