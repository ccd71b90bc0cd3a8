"""export_aoti: the AOTInductor package (C++ kernels of sparsevit included) computes what the
accelerated model computes, and calls sparsevit's C++ operators, not its Python ones."""
import glob
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import sparsevit
from sparsevit import _ext
from helpers import make_model, random_plan, rel_err

pytestmark = [pytest.mark.slow,  # compiles C++ (about 60-90 s on 2 cores)
              pytest.mark.skipif(not _ext.HAS_EXTENSION, reason="needs sparsevit's compiled extension")]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A ViT with kept-head/MLP/residual-subset slicing and BSR-packed layers, compiled once."""
    from sparsevit.deploy import export_aoti

    model = make_model("vit_tiny")
    plan = random_plan(model, 0, kinds=("heads", "qk", "v", "mlp", "io", "masks"))
    # one fine-grained layer too, so the C++ fine kernel is compiled in as well
    fast = sparsevit.accelerate(model, plan, backend="sparse", formats={"blocks.1.mlp.fc1": "fine:1x4"})
    x = torch.randn(2, 3, 32, 32)
    path = str(tmp_path_factory.mktemp("aoti") / "vit.pt2")
    assert export_aoti(fast, x, path) == path
    return fast, plan, model, x, path


def test_package_matches_accelerated_model(package):
    from sparsevit.deploy import load_aoti

    fast, plan, model, x, path = package
    kinds = {d.action for d in fast.sparsevit_report}
    assert "packed" in kinds, "the test needs BSR layers, so the C++ BSR kernel is compiled in"
    runner = load_aoti(path)
    x2 = torch.randn_like(x)  # not the tracing input
    with torch.no_grad():
        ref = fast(x2)
        masked = sparsevit.masked_model(model, plan)(x2)
    out = runner(x2)
    assert rel_err(out, ref) < 1e-5, f"AOTI vs accelerated model: rel err {rel_err(out, ref):.2e}"
    assert rel_err(out, masked) < 1e-4


def test_package_calls_cpp_ops_only(package):
    """The ops the compiled code hands to the dispatcher are listed in the package's wrapper.json."""
    *_, path = package
    with zipfile.ZipFile(path) as z:
        calls = [n["node"]["target"] for name in z.namelist() if name.endswith("wrapper.json")
                 for n in json.loads(z.read(name))["nodes"]]
    assert {"sparsevit_C::bsr_linear", "sparsevit_C::fine_linear", "sparsevit_C::layernorm_gather",
            "sparsevit_C::residual_scatter_add"} <= set(calls)
    assert not [c for c in calls if c.startswith("sparsevit::")], f"Python custom ops left in the package: {calls}"


def test_package_runs_without_sparsevit_python(package):
    """Only the extension library is loaded into the process: no `import sparsevit`."""
    fast, _, _, x, path = package
    so = glob.glob(os.path.join(os.path.dirname(sparsevit.__file__), "_C*.so"))[0]
    code = ("import ctypes, sys, torch\n"
            f"ctypes.CDLL({so!r}, mode=ctypes.RTLD_GLOBAL)\n"
            f"out = torch._inductor.aoti_load_package({path!r})(torch.load(sys.argv[1]))\n"
            "assert not any(m.startswith('sparsevit') for m in sys.modules)\n"
            "torch.save(out, sys.argv[2])\n")
    x_file, out_file = path + ".x", path + ".out"
    torch.save(x, x_file)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code, x_file, out_file], check=True, env=env, cwd="/")
    with torch.no_grad():
        assert rel_err(torch.load(out_file), fast(x)) < 1e-5


def test_bad_path(tmp_path):
    from sparsevit.deploy import export_aoti

    fast = sparsevit.accelerate(make_model("vit_tiny"))
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_aoti(fast, torch.randn(1, 3, 32, 32), tmp_path / "model.bin")
