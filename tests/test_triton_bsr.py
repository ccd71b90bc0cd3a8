"""Triton block-sparse linear under Triton's CPU interpreter, against float64 references.

Interpreter mode (``TRITON_INTERPRET=1``; in a full pytest run the tests re-run in a child process):
see ``tests/triton_harness.py``.

Accuracy rule (flash-attention / xformers style): the kernel's max error against a float64
reference is at most 2x the error of PyTorch doing the same computation in the same dtype (with a
floor of a few ulps of the output scale, so an exact PyTorch result cannot make the bound zero).
Inputs are random normals, never zeros; shapes are odd and ragged (out/in not multiples of the block).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from triton_harness import IN_PROCESS, K, ROOT, interp, run_self_in_subprocess  # noqa: E402


@pytest.mark.skipif(IN_PROCESS, reason="interpreter active in-process: the tests ran here")
def test_in_subprocess():
    run_self_in_subprocess(os.path.abspath(__file__))


def make_bsr(out_f, in_f, block, density, seed):
    """Random BSR weight (values, col, crow) and its dense float64 twin; ragged edges zero-padded."""
    g = torch.Generator().manual_seed(seed)
    bh, bw = block
    nbr, nbc = -(-out_f // bh), -(-in_f // bw)
    keep = torch.rand(nbr, nbc, generator=g) < density
    keep[0, 0] = True  # never an all-empty matrix here (tested separately)
    w = torch.randn(nbr * bh, nbc * bw, generator=g, dtype=torch.float64)
    w[out_f:] = 0
    w[:, in_f:] = 0
    tiles = w.reshape(nbr, bh, nbc, bw).permute(0, 2, 1, 3)
    values = tiles[keep].contiguous()
    col = keep.nonzero()[:, 1].to(torch.int32)
    crow = torch.zeros(nbr + 1, dtype=torch.int32)
    crow[1:] = keep.sum(1).cumsum(0)
    dense = (tiles * keep[:, :, None, None]).permute(0, 2, 1, 3).reshape(nbr * bh, nbc * bw)[:out_f, :in_f]
    return values, col, crow, dense.contiguous()


def torch_linear(x, w, b, act):
    y = F.linear(x, w, b)
    if act is not None:
        y = F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    return y


def check(out, ref64, torch_out, dtype, what):
    err = (out.double() - ref64).abs()
    torch_err = (torch_out.double() - ref64).abs().max().item()
    floor = 4 * torch.finfo(dtype).eps * ref64.abs().max().item()
    bound = max(2 * torch_err, floor)
    worst = int(err.argmax())
    assert err.max().item() <= bound, (
        f"{what}: max err {err.max().item():.3e} > bound {bound:.3e} (torch err {torch_err:.3e}); worst at flat "
        f"{worst}: got {out.flatten()[worst].item():.6f}, want {ref64.flatten()[worst].item():.6f}")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [  # (tokens, out, in, block, density)
    (23, 70, 90, (16, 32), 0.6),
    (5, 48, 64, (32, 16), 0.5),
    (37, 96, 80, (32, 32), 0.4),
    (17, 72, 96, (64, 64), 0.7),
    (40, 56, 50, (16, 16), 0.3),
]


@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bsr_linear_matches_float64(dtype, act, case):
    tokens, out_f, in_f, block, density = CASES[case]
    values, col, crow, dense = make_bsr(out_f, in_f, block, density, seed=case)
    g = torch.Generator().manual_seed(100 + case)
    x = torch.randn(tokens, in_f, generator=g, dtype=torch.float64)
    with_bias = case % 2 == 0 or act is None
    b = torch.randn(out_f, generator=g, dtype=torch.float64) if with_bias else None
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    out = K.bsr_linear_triton(c(x), c(values), col, crow, out_f, c(b), act, block_m=16 if case % 2 else 32)
    assert out.shape == (tokens, out_f) and out.dtype == dtype
    check(out, torch_linear(x, dense, b, act), torch_linear(c(x), c(dense), c(b), act), dtype,
          f"{dtype} act={act} case={CASES[case]} bias={with_bias}")


@interp
def test_bsr_linear_3d_strided_input_and_empty_rows():
    values, col, crow, dense = make_bsr(64, 96, (16, 32), 0.25, seed=7)
    # empty a whole block row: its outputs must be exactly act(bias)
    r = 1
    lo, hi = int(crow[r]), int(crow[r + 1])
    values = torch.cat([values[:lo], values[hi:]])
    col = torch.cat([col[:lo], col[hi:]])
    crow[r + 1:] -= hi - lo
    dense[16:32] = 0
    base = torch.randn(2, 11, 200, dtype=torch.float64)
    x = base[:, :, 3:99]  # non-contiguous rows
    b = torch.randn(64, dtype=torch.float64)
    out = K.bsr_linear_triton(x.float(), values.float(), col, crow, 64, b.float(), "gelu")
    ref = torch_linear(x, dense, b, "gelu")
    assert out.shape == (2, 11, 64)
    check(out, ref, torch_linear(x.float(), dense.float(), b.float(), "gelu"), torch.float32, "3d strided")
    torch.testing.assert_close(out[..., 16:32].double(), F.gelu(b[16:32]).expand(2, 11, 16), rtol=1e-6, atol=1e-6)


@interp
def test_bsr_linear_all_empty_weight_gives_bias():
    crow = torch.zeros(4, dtype=torch.int32)
    b = torch.randn(40)
    out = K.bsr_linear_triton(torch.randn(9, 33), torch.empty(0, 16, 16), torch.empty(0, dtype=torch.int32),
                              crow, 40, b, None)
    torch.testing.assert_close(out, b.expand(9, 40))


@interp
def test_unsupported_reasons():
    x = torch.randn(4, 32)
    assert K.bsr_linear_unsupported_reasons(x, torch.randn(2, 32, 32)) == []
    reasons = K.bsr_linear_unsupported_reasons(x, torch.randn(2, 8, 24), activation="relu")
    assert any("block 8x24" in r for r in reasons) and any("relu" in r for r in reasons)
    assert any("dtype" in r for r in K.bsr_linear_unsupported_reasons(x.double(), torch.randn(2, 32, 32).double()))
    with pytest.raises(ValueError, match="block 8x24"):
        K.bsr_linear_triton(x, torch.randn(1, 8, 24), torch.zeros(1, dtype=torch.int32),
                            torch.tensor([0, 1], dtype=torch.int32), 8)


@interp
def test_cpu_without_interpreter_is_reported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = K.bsr_linear_unsupported_reasons(torch.randn(4, 32), torch.randn(2, 32, 32))
    assert any("needs CUDA" in r for r in reasons)


def test_kernels_import_without_triton():
    code = ("import sys, importlib.util, os; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "try:\n    import sparsevit.kernels as k\n"
            "except ImportError:\n"
            f"    root = {ROOT!r}\n"
            "    spec = importlib.util.spec_from_file_location('sparsevit.kernels', os.path.join(root, 'kernels', "
            "'__init__.py'), submodule_search_locations=[os.path.join(root, 'kernels')])\n"
            "    k = importlib.util.module_from_spec(spec); sys.modules['sparsevit.kernels'] = k; "
            "spec.loader.exec_module(k)\n"
            "import torch\n"
            "assert not k.HAS_TRITON and 'triton' in k.TRITON_UNAVAILABLE_REASON\n"
            "r = k.bsr_linear_unsupported_reasons(torch.randn(2, 16), torch.randn(1, 16, 16))\n"
            "assert any('triton unavailable' in s for s in r), r\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
