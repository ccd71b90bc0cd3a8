#!/usr/bin/env bash
# Installs the engines bench/peers.py compares sparsevit against. Bench only: the package and its
# tests never need any of this (tests/test_peers_bench.py skips whatever is missing).
#
#   bash bench/setup_peers.sh                 # into the active venv (or .venv/ of the repo root)
#   PEERS_PYTHON=/path/python bash bench/setup_peers.sh
#
# 1. onnx, onnxruntime, openvino, matplotlib into the main venv (pinned: versions that install and
#    run here with torch 2.14 / numpy 2).
# 2. DeepSparse 1.8.0 in a venv of its own (~/.cache/sparsevit/deepsparse-venv unless DEEPSPARSE_VENV is set;
#    outside the repo so git never sees it):
#    it needs Python <= 3.11, numpy < 2 and onnx 1.14, which the main venv cannot have (1.9.0 does
#    not install). Its licence allows evaluation only: it is a benchmark reference, never a
#    dependency. Pass its python to the harness: --deepsparse-python ~/.cache/sparsevit/deepsparse-venv/bin/python
#
# Idempotent: a second run finds everything in place and changes nothing. Set SKIP_DEEPSPARSE=1 to
# install only the main-venv peers.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"

ONNX_VERSION=1.23.2
ONNXRUNTIME_VERSION=1.31.1
OPENVINO_VERSION=2026.4.1
MATPLOTLIB_VERSION=3.11.2
DEEPSPARSE_VERSION=1.8.0

if [[ -n "${PEERS_PYTHON:-}" ]]; then
  PY="$PEERS_PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  echo "setup_peers: no venv active and no $ROOT/.venv; activate the project's venv first" >&2
  exit 1
fi

# pip install only what is not already there at the pinned version (keeps a re-run quiet and offline)
ensure() {  # ensure PYTHON pkg==ver ...
  local py="$1"; shift
  local missing=()
  for spec in "$@"; do
    local name="${spec%%[=<>]*}"
    if ! "$py" -m pip show "$name" >/dev/null 2>&1 || \
       ! "$py" - "$spec" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
name, _, want = sys.argv[1].partition("==")
want = want.rstrip("*").rstrip(".")
sys.exit(0 if not want or version(name).startswith(want) else 1)
EOF
    then
      missing+=("$spec")
    fi
  done
  if ((${#missing[@]})); then
    echo "setup_peers: installing ${missing[*]} into $("$py" -c 'import sys; print(sys.prefix)')"
    "$py" -m pip install --quiet "${missing[@]}"
  fi
}

ensure "$PY" "onnx==$ONNX_VERSION" "onnxruntime==$ONNXRUNTIME_VERSION" \
             "openvino==$OPENVINO_VERSION" "matplotlib==$MATPLOTLIB_VERSION"
"$PY" -c "import onnx, onnxruntime, openvino, matplotlib; print('setup_peers: main venv ok: onnx', onnx.__version__, \
'| onnxruntime', onnxruntime.__version__, '| openvino', openvino.__version__, '| matplotlib', matplotlib.__version__)"

if [[ "${SKIP_DEEPSPARSE:-0}" == "1" ]]; then
  exit 0
fi

# DeepSparse: a Python 3.11 with venv support (the system one, or pyenv's).
DS_VENV="${DEEPSPARSE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sparsevit/deepsparse-venv}"
if [[ ! -x "$DS_VENV/bin/python" ]]; then
  BASE=""
  for cand in /usr/bin/python3.11 "$(command -v python3.11 || true)"; do
    if [[ -n "$cand" && -x "$cand" ]] && "$cand" -c "import venv, ensurepip" >/dev/null 2>&1; then
      BASE="$cand"; break
    fi
  done
  if [[ -z "$BASE" ]]; then
    echo "setup_peers: no Python 3.11 with venv/ensurepip found; DeepSparse skipped" >&2
    exit 0
  fi
  echo "setup_peers: creating $DS_VENV from $BASE"
  "$BASE" -m venv "$DS_VENV"
fi
ensure "$DS_VENV/bin/python" "deepsparse==$DEEPSPARSE_VERSION" "numpy<2" "onnx==1.14.*"
NM_DISABLE_ANALYTICS=1 "$DS_VENV/bin/python" -c "import deepsparse, numpy, onnx; \
print('setup_peers: deepsparse venv ok:', deepsparse.__version__, '| numpy', numpy.__version__, '| onnx', onnx.__version__)"
echo "setup_peers: pass --deepsparse-python $DS_VENV/bin/python to bench/peers.py"
