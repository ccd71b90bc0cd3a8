"""Build script: one compiled extension, ``sparsevit._C``, from ``csrc/``.

* C++ CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are always built. They carry AVX-512 and AVX2
  code paths chosen at run time, so no ``-march`` flag is passed.
* CUDA kernels (``csrc/cuda/*.cu``) are added when ``nvcc`` and a CUDA build of torch are both present,
  or when ``SPARSEVIT_FORCE_CUDA=1``; ``SPARSEVIT_NO_CUDA=1`` leaves them out.
* ``SPARSEVIT_SKIP_BUILD=1`` skips the extension entirely: the pure-PyTorch reference path still works.
* A missing compiler or torch warns instead of failing, for the same reason.

``kernels/`` (Triton) is shipped as the package ``sparsevit.kernels``.
"""
import glob
import os
import shutil
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    """The toolkit root holding lib64/. torch guesses it from `nvcc` on PATH, which can be a symlink
    outside the toolkit (then the link fails on -lcudart)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = ["/usr/local/cuda"]
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.insert(0, os.path.dirname(os.path.dirname(real)))
    for root in candidates:
        if os.path.isdir(os.path.join(root, "lib64")) and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def _extensions():
    if os.environ.get("SPARSEVIT_SKIP_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
    except ImportError:
        warnings.warn("sparsevit: torch is not installed at build time; building without compiled "
                      "kernels (install torch first, then reinstall with --no-build-isolation).")
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension

    os.chdir(HERE)  # source paths below are relative to the project root
    cpp_sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cuda_home is not None
    if os.environ.get("SPARSEVIT_FORCE_CUDA", "0") == "1":
        with_cuda = bool(cuda_sources)
    if os.environ.get("SPARSEVIT_NO_CUDA", "0") == "1":
        with_cuda = False

    # torch >= 2.10 headers need C++20; older ones are fine with C++17 (and some reject C++20 flags)
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"
    # at::parallel_for is inlined OpenMP: without -fopenmp every CPU kernel would run on one thread
    cxx_flags = ["-O3", std, "-fno-math-errno", "-fopenmp", "-Wno-unused-function"]
    define_macros = []
    kwargs = dict(extra_compile_args={"cxx": cxx_flags}, define_macros=define_macros, extra_link_args=["-fopenmp"])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.7;9.0")
        define_macros.append(("SPARSEVIT_WITH_CUDA", None))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", std, "--use_fast_math", "-lineinfo",
                                               "-DSPARSEVIT_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension("sparsevit._C", cpp_sources + cuda_sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("sparsevit._C", cpp_sources, **kwargs)
    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None
                                                      or _has_ninja_module())

    class TolerantBuildExt(base):
        """A failed compile (no compiler, broken toolkit) warns instead of failing the install: the
        pure-PyTorch reference path still works, and sparsevit reports the missing kernels."""

        def run(self):
            if os.environ.get("SPARSEVIT_STRICT_BUILD", "0") == "1":
                return super().run()
            try:
                super().run()
            except Exception as exc:  # CompileError, CalledProcessError, OSError from a missing compiler
                warnings.warn(f"sparsevit: building the compiled kernels failed ({exc}); installing without "
                              "them. Set SPARSEVIT_STRICT_BUILD=1 to make this an error.")

    return [ext], {"build_ext": TolerantBuildExt}


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


def _safe_extensions():
    try:
        return _extensions()
    except Exception as exc:  # a broken toolchain must not make the package uninstallable
        warnings.warn(f"sparsevit: compiled kernels disabled, extension setup failed: {exc}")
        return [], {}


ext_modules, cmdclass = _safe_extensions()
packages = find_packages(include=["sparsevit", "sparsevit.*"]) + ["sparsevit.kernels"]

setup(
    packages=packages,
    package_dir={"sparsevit.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
