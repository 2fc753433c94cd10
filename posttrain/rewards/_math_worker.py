"""A math-verify worker process: JSON lines in, JSON lines out.

Run as ``python -m posttrain.rewards._math_worker``. It first imports math-verify and
writes ``{"ready": true}`` (or ``{"import_error": ...}``), then answers each request
``{"i", "gold", "pred", "timeout_s"}`` with ``{"i", "ok", "error"}``. It runs on its
main thread, so math-verify's own signal-based timeouts work here too; the parent
(`posttrain.rewards.math_verify.MathVerifier`) adds the wall-clock limit that also
stops computations stuck in C code, by killing this process.
"""

from __future__ import annotations

import json
import sys


def wrap(answer: str) -> str:
    """``$answer$`` unless already delimited or boxed: math-verify parses LaTeX between delimiters best."""
    text = answer.strip()
    if text.startswith("$") or text.startswith("\\(") or "\\boxed" in text:
        return text
    return f"${text}$"


def equal(gold: str, pred: str, timeout_s: float) -> bool:
    """math-verify's verdict on two answer strings (both parsed from LaTeX or plain expressions)."""
    from math_verify import parse, verify

    seconds = max(1, int(timeout_s))
    gold_parsed = parse(wrap(gold), parsing_timeout=seconds)
    pred_parsed = parse(wrap(pred), parsing_timeout=seconds)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=seconds))


def serve() -> None:
    """Import math-verify, then answer requests until stdin closes."""
    try:
        import math_verify  # noqa: F401 - import once, before the first timed request
    except ImportError as exc:
        print(json.dumps({"import_error": str(exc)}), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            ok, error = equal(request["gold"], request["pred"], request["timeout_s"]), ""
        except Exception as exc:  # a parse failure is a wrong answer, not a crash
            ok, error = False, f"{type(exc).__name__}: {exc}"[:200]
        print(json.dumps({"i": request["i"], "ok": ok, "error": error}), flush=True)


if __name__ == "__main__":
    serve()
