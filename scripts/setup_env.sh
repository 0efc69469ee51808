#!/usr/bin/env bash
# Create the virtual environment VENV (default .venv) and install colonnade with its test tools.
# torch comes first: the default (CUDA) build where an NVIDIA GPU is visible, a CPU build otherwise —
# from a local wheel if pip's configured find-links hold one, else from TORCH_INDEX_URL. Every install is
# constrained to constraints.txt: the versions the test suite last passed with.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
CONSTRAINTS="$(cd "$(dirname "$0")/.." && pwd)/constraints.txt"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
    $PIP install torch -c "$CONSTRAINTS"
  elif $PIP install --quiet --no-index --no-deps torch 2>/dev/null; then
    echo "setup: no GPU; installed the local CPU wheel of torch, now its dependencies"
    $PIP install "torch==$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')" \
      -c "$CONSTRAINTS"
  else
    echo "setup: no GPU; installing the CPU build of torch from $TORCH_INDEX_URL"
    $PIP install torch --index-url "$TORCH_INDEX_URL" -c "$CONSTRAINTS"
  fi
fi
$PIP install -e ".[dev]" -c "$CONSTRAINTS"
