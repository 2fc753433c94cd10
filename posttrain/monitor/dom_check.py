"""Check a report.html as a browser rendered it (the DOM headless Chromium dumped).

The report's inline script writes, once the page has loaded and laid out its SVG, the counts of
curves, of their points, of curves with a non-empty bounding box and of anomaly markers into
the `data-*` attributes of `#render-check`. `rendered_counts` reads them back; `check` also
reads each curve's `points` attribute. Used by scripts/check_report_browser.sh and the tests.

    python -m posttrain.monitor.dom_check DOM.html [SCREENSHOT.png]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from posttrain.errors import DataError

_CHECK = re.compile(r'<p id="render-check"([^>]*)>')
_ATTR = re.compile(r'data-([a-z-]+)="(\d+)"')
_POLYLINE = re.compile(r'<polyline class="series"[^>]*?data-points="(\d+)"[^>]*?points="([^"]*)"')


def rendered_counts(dom: str) -> dict[str, int]:
    """{"series", "points", "laid-out", "markers"} as the browser's script counted them; empty
    when the script did not run (no browser, JavaScript off)."""
    m = _CHECK.search(dom)
    return {k: int(v) for k, v in _ATTR.findall(m.group(1))} if m else {}


def curve_points(dom: str) -> list[tuple[int, int]]:
    """(declared, actual) point counts of each curve's polyline in the DOM."""
    return [(int(n), len(pts.split())) for n, pts in _POLYLINE.findall(dom)]


def check(dom: str) -> dict[str, int]:
    """The rendered counts; DataError unless every curve was laid out and has its points."""
    counts = rendered_counts(dom)
    if not counts:
        raise DataError("the page's render check did not run: no #render-check counts in the DOM",
                        fix="dump the DOM with a real browser (chromium --headless --dump-dom)")  # fmt: skip
    curves = curve_points(dom)
    if counts["series"] == 0 or not curves:
        raise DataError("the report shows no curve", fix="check that metrics.jsonl holds numeric metrics")
    bad = [i for i, (n, got) in enumerate(curves) if n == 0 or n != got]
    if bad or counts["laid-out"] != counts["series"] or len(curves) != counts["series"]:
        raise DataError(
            f"{len(bad)} curves lack points; {counts['laid-out']} of {counts['series']} were laid out"
        )
    return counts


def main(argv: list[str]) -> int:
    dom = Path(argv[0]).read_text(encoding="utf-8")
    try:
        c = check(dom)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    shot = f"; screenshot: {argv[1]}" if len(argv) > 1 and Path(argv[1]).is_file() else ""
    print(f"rendered {c['series']} curves ({c['laid-out']} laid out), {c['points']} points, "
          f"{c['markers']} anomaly markers{shot}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
