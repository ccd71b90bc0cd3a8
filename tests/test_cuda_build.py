"""The CUDA sources compile (nvcc, object only, one arch), and a CUDA build registers the CUDA op.

Compiling only ``-c`` for sm_80 keeps this a few tens of seconds; the full extension build
(sm_80/87/90, linking) is ``pip install -e . --no-build-isolation``. Skips with the reason when
nvcc or a CUDA build of torch is missing.
"""
import glob
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else shutil.which("nvcc")


def _extension_built_with_cuda() -> bool:
    try:
        from sparsevit import _ext
    except Exception:  # noqa: BLE001
        return False
    return _ext.HAS_CUDA_EXTENSION


@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    if _extension_built_with_cuda():
        # the installed extension already compiled these sources for every arch (CI compiles once);
        # test_built_extension_registers_cuda_op checks the result
        pytest.skip("already compiled into the installed extension")
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: no CUDA headers to compile against")
    import sysconfig

    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}",
                                                                    f"-I{os.path.dirname(source)}"]
    cmd = [nvcc, "-c", source, "-o", str(tmp_path / "out.o"), "-std=c++20", "-O2", "-Xcompiler", "-fPIC",
           "-DSPARSEVIT_WITH_CUDA", "-gencode", "arch=compute_80,code=sm_80",
           *cpp_extension.COMMON_NVCC_FLAGS, *includes]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"nvcc failed on {os.path.basename(source)}:\n{res.stderr[-6000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0


def test_built_extension_registers_cuda_op():
    try:
        from sparsevit import _ext
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"sparsevit._ext not importable: {exc}")
    if not _ext.HAS_EXTENSION:
        pytest.skip(f"compiled extension not loaded: {_ext.LOAD_ERROR}")
    if not _ext.HAS_CUDA_EXTENSION:
        pytest.skip("extension built without CUDA (no nvcc or CPU-only torch at build time)")
    assert _ext.has_op("bsr_linear_cuda")
    schema = str(torch.ops.sparsevit_C.bsr_linear_cuda.default._schema)
    assert "int out_features" in schema and "Tensor? bias" in schema
    assert "CUDA" in torch._C._dispatch_dump("sparsevit_C::bsr_linear_cuda")
