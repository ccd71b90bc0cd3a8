"""Shared harness of the Triton interpreter tests.

Triton 3.8 reads ``TRITON_INTERPRET`` when it decorates a function, including its own ``tl.zeros``
... at ``import triton``, and ``import timm`` imports triton, so in a full pytest run the variable is
often set too late (sparsevit's own kernels are decorated lazily per mode). Each interpreter test module
therefore runs its own tests in-process when the interpreter is active, and otherwise re-runs itself
in a child pytest process with the variable set (``run_self_in_subprocess``).
"""
import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton not installed")


def _interpreter_ready() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return os.environ.get("TRITON_INTERPRET") == "1" and isinstance(triton.language.standard.zeros,
                                                                    InterpretedFunction)


IN_PROCESS = _interpreter_ready()
interp = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported without TRITON_INTERPRET=1 in this "
                            "process; test_in_subprocess runs these in a child process")


def run_self_in_subprocess(path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and " 1 skipped" in summary, summary  # only test_in_subprocess skips there


def _kernels():
    """``sparsevit.kernels`` (installed: setup.py maps it to kernels/), or kernels/ loaded under that name."""
    try:
        return importlib.import_module("sparsevit.kernels")
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "sparsevit.kernels", os.path.join(ROOT, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sparsevit.kernels"] = mod
        spec.loader.exec_module(mod)
        return mod


K = _kernels()
