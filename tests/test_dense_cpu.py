"""Dense CPU candidates (sparsevit.ops.dense_cpu) and the peak-FLOP probe, against float64 references
on odd shapes. Nothing here is timed: speed belongs in bench/cpu_kernels.py."""
import pytest
import torch
import torch.nn.functional as F

from sparsevit import _ext
from sparsevit.ops.bsr import apply_activation
from sparsevit.ops.dense_cpu import CANDIDATE_NAMES, dense_candidates

ACTS = [None, "gelu", "gelu_tanh"]


def _tolerance(x, w, b, act, ref):
    """2x the error of dense torch in the same dtype, plus one ulp of the output scale."""
    dense = apply_activation(F.linear(x, w, b), act)
    return 2 * (dense.double() - ref).abs().max().item() + torch.finfo(x.dtype).eps * ref.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
def test_every_candidate_matches_float64(dtype, act):
    g = torch.Generator().manual_seed(1)
    for lead, out_f, in_f, bias in [((1,), 37, 53, True), ((2, 33), 45, 70, False), ((197,), 64, 96, True)]:
        w = torch.randn(out_f, in_f, generator=g)
        b = torch.randn(out_f, generator=g) if bias else None
        x = torch.randn(*lead, in_f, generator=g).to(dtype)
        cands = dense_candidates(w, b, act, dtype=dtype)
        assert tuple(c.name for c in cands) == CANDIDATE_NAMES
        wd, bd = w.to(dtype), None if b is None else b.to(dtype)
        ref = apply_activation(F.linear(x.double(), wd.double(), None if bd is None else bd.double()), act)
        tol = _tolerance(x, wd, bd, act, ref)
        ran = 0
        for cand in cands:
            if cand.not_supported_reasons:
                continue
            y = cand.build()(x)
            assert y.dtype == dtype and y.shape == (*lead, out_f), cand.name
            err = (y.double() - ref).abs().max().item()
            assert err <= tol, f"{cand.name} {dtype} act={act} {lead}x{in_f}->{out_f}: err {err:.3g} > {tol:.3g}"
            ran += 1
        assert ran >= 1


def test_reasons_and_bad_arguments():
    w = torch.randn(8, 16)
    by_name = {c.name: c for c in dense_candidates(w, None, None, dtype=torch.float64)}
    assert by_name["torch_linear"].not_supported_reasons == []
    assert any("float64" in r for r in by_name["onednn_packed"].not_supported_reasons)
    assert any("float64" in r for r in by_name["sparsevit_bsr_full"].not_supported_reasons)
    with pytest.raises(ValueError, match="activation"):
        dense_candidates(w, None, "relu")
    with pytest.raises(ValueError, match="bias"):
        dense_candidates(w, torch.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        dense_candidates(torch.randn(2, 3, 4))


@pytest.mark.skipif(not _ext.has_op("peak_gflops"), reason="compiled extension without peak_gflops")
def test_peak_gflops_probe():
    f32 = torch.ops.sparsevit_C.peak_gflops("float32", 1, 0.02)
    bf16 = torch.ops.sparsevit_C.peak_gflops("bfloat16", 1, 0.02)
    if torch.ops.sparsevit_C.fine_linear_isa(1):  # AVX-512: the fp32 loop exists
        assert f32 > 1.0
    else:
        assert f32 == 0.0
    assert bf16 >= 0.0
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.sparsevit_C.peak_gflops("float16", 1, 0.02)
    with pytest.raises(RuntimeError, match="seconds"):
        torch.ops.sparsevit_C.peak_gflops("float32", 1, 0.0)
