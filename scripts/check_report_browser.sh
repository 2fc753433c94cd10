#!/usr/bin/env bash
# Render a run report in headless Chromium and check the curves were drawn (a real browser, not a parser).
#
# Usage: scripts/check_report_browser.sh [RUN_DIR ...] [-- OUT_DIR]
#   RUN_DIR: run output dirs (overlaid); default: a demo run written here from a synthetic metrics.jsonl.
#   OUT_DIR: where report.html, dom.html and screenshot.png go (default: a fresh temp dir).
# Needs chromium (Debian: apt-get install -y --no-install-recommends chromium; ~113 MB download).
# Prints e.g. "rendered 12 curves (12 laid out), 360 points, 1 anomaly markers; screenshot: OUT/screenshot.png"
# and exits 1 when the page shows no curve, a curve without points, or a curve with no size.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
RUNS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do RUNS+=("$(realpath "$1")"); shift; done
[ "${1:-}" = "--" ] && shift
OUT="$(realpath -m "${1:-$(mktemp -d)}")"
mkdir -p "$OUT"
BROWSER="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$BROWSER" ]; then
  echo "error: no chromium binary; install it: apt-get install -y --no-install-recommends chromium" >&2
  exit 2
fi
if [ ${#RUNS[@]} -eq 0 ]; then
  RUNS=("$OUT/demo_run")
  "$PYTHON" -m posttrain.monitor.demo_run "$OUT/demo_run"
fi
"$PYTHON" -m posttrain.cli report "${RUNS[@]}" --out "$OUT/report.html" >/dev/null
# --virtual-time-budget lets the page's load handler run before the DOM is dumped.
FLAGS=(--headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=5000)
"$BROWSER" "${FLAGS[@]}" --dump-dom "file://$OUT/report.html" >"$OUT/dom.html" 2>"$OUT/chromium.log"
"$BROWSER" "${FLAGS[@]}" --window-size=1300,2000 --screenshot="$OUT/screenshot.png" \
  "file://$OUT/report.html" >>"$OUT/chromium.log" 2>&1
"$PYTHON" -m posttrain.monitor.dom_check "$OUT/dom.html" "$OUT/screenshot.png"
