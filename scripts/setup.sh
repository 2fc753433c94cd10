#!/usr/bin/env bash
# Create .venv and install posttrain. torch is pinned and installed FIRST (a CPU build; an
# unpinned torch would pull a multi-GB CUDA build), then the package; nothing may upgrade it.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION}"
python -m pip install -q -e ".[dev,math]" "torch==${TORCH_VERSION}"
python - <<PY
import torch
assert torch.__version__.split("+")[0] == "${TORCH_VERSION}", f"torch was changed to {torch.__version__}"
print(f"posttrain installed in .venv (torch {torch.__version__})")
PY
