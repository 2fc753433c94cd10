"""A small synthetic run folder for checking the report renderer without training anything.

It holds what an RL run writes, with made-up but plausible numbers (marked as a demo in its
config): metrics.jsonl over `steps` steps (loss, reward per term, KL, entropy, length, clip
ratio, grad norm, lr, throughput, held-out accuracy every 10 steps), one anomaly event,
config.yaml, a data summary and sample generations. Used by scripts/check_report_browser.sh.

    python -m posttrain.monitor.demo_run OUT_DIR
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def demo_rows(steps: int = 30) -> list[dict]:
    """metrics.jsonl rows of a demo RL run; the length blows up after step 20 (an anomaly at 24)."""
    rows = []
    for s in range(1, steps + 1):
        blow = max(0, s - 20)
        rows.append({
            "step": s, "time": 1.7e9 + 5 * s, "loss/total": 0.5 * math.exp(-s / 10),
            "reward/total_mean": 0.2 + 0.02 * s, "reward/format_mean": min(1.0, 0.05 * s),
            "kl/token_mean": 0.001 * s, "pg/entropy": 1.2 - 0.02 * s, "response/length_mean": 40 + 8 * blow**2,
            "response/clipped_ratio": min(1.0, 0.01 * blow**2), "grad_norm": 0.8 + 0.1 * math.sin(s),
            "lr": 1e-5, "throughput/train_tok_s": 1500 + 10 * s,
        })  # fmt: skip
        if s % 10 == 0:
            rows.append({"step": s, "time": 1.7e9 + 5 * s + 1, "eval/task_accuracy/overall": 0.5 - 0.01 * s})
    rows.append({"step": 24, "time": 1.7e9 + 121, "event": "anomaly", "kind": "length_growth",
                 "metric": "response/length_mean", "recent": [72.0, 112.0, 168.0], "threshold": 120.0, "action": "warn",
                 "message": "demo: mean response length grew more than 50% over 5 steps"})  # fmt: skip
    return rows


def write_demo_run(out: str | Path, steps: int = 30) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_rows(steps)))
    (out / "config.yaml").write_text(
        f"# demo run written by posttrain.monitor.demo_run (synthetic numbers)\noutput_dir: demo\ntrain: {{max_steps: {steps}}}\n"
    )
    (out / "data_train.json").write_text(json.dumps({"samples": 64, "tokens": 4096, "truncated": 0}))
    samples = [{"step": s, "task": "arith", "level": 1, "question": f"Compute {s} + 1",
                "completion": f"Answer: {s + 1}", "correct": True} for s in (10, 20, 30)]  # fmt: skip
    (out / "eval_generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return out


if __name__ == "__main__":
    print(write_demo_run(sys.argv[1]))
