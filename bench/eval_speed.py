"""Evaluation speed: greedy accuracy of 800 task-suite problems on the tiny default model.

    python bench/eval_speed.py [--problems 800] [--max-new-tokens 128] [--model PATH] [--repeats 3]

The model is loaded once (and warmed up) outside the clock; each repeat is one `run_eval` of a
greedy decoding over the held-out task suite (arith, sort, countdown, every level) into a fresh
output folder: prompts, batched generation through the rollout engine, grading by each task's
verifier, bootstrap intervals and results.json / report.md. The best repeat is reported, next to
the machine, torch threads and the load average before and after (2 shared cores here: a busy
machine is slower; the process CPU time, also printed, is what the run costs when the cores are
free). The last line is the figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=800)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--model", default=None, help="a model folder (default: the embedded tiny default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--batch-rows", type=int, default=None, help="engine rows decoded together (default: the recipe's)"
    )
    args = ap.parse_args()

    import torch
    from common import model_path

    from posttrain.eval.data import EvalDataConfig
    from posttrain.eval.runner import DecodingConfig, EvalRecipe, load_decoder, run_eval
    from posttrain.search.compare import SearchModelConfig

    torch.set_num_threads(args.threads)
    if args.problems < 60:
        sys.exit("--problems must be >= 60")
    path = str(model_path("tiny", args.model))
    model_cfg = SearchModelConfig(path=path)
    if args.batch_rows:
        model_cfg.max_batch_rows = args.batch_rows
    decoder = load_decoder(model_cfg)
    # 82% arith + sort (4 levels each), 18% countdown (3 levels; level 1 has ~57 distinct test questions)
    n_cd = min(48, round(args.problems * 0.18 / 3))
    n_as = -(-(args.problems - 3 * n_cd) // 8)
    data = [EvalDataConfig(tasks=["arith", "sort"], n_per_level=n_as),
            EvalDataConfig(tasks=["countdown"], n_per_level=n_cd, name="countdown")]  # fmt: skip
    times, cpu, acc = [], [], None
    load_before = loadavg()
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            recipe = EvalRecipe(model=model_cfg, data=data,
                                decodings=[DecodingConfig(max_new_tokens=args.max_new_tokens)],
                                save_every=args.problems, n_boot=200, output_dir=str(Path(tmp) / "eval"))  # fmt: skip
            assert sum(8 * n_as if d.tasks != ["countdown"] else 3 * n_cd for d in data) >= args.problems
            t0, c0 = time.perf_counter(), time.process_time()
            res = run_eval(recipe, decoder)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            import json

            header = json.loads(res.read_text())
            acc = header["metrics"]["greedy"]["accuracy"]
            tim = header["timing"]["greedy"]
            print(f"repeat {r}: {times[-1]:.2f} s ({cpu[-1]:.2f} s CPU), generation {tim['seconds']:.2f} s, "
                  f"{tim['generated_tokens']} tokens ({tim['tokens_per_s']:.0f} tokens/s)")  # fmt: skip
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} on {args.threads} threads; "
          f"load average before {load_before}, after {loadavg()}")  # fmt: skip
    print(f"model: {path}")
    print(f"greedy accuracy {acc['value']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}] on {acc['n']} problems; "
          f"best of {args.repeats}: {min(times):.2f} s wall, {min(cpu):.2f} s CPU "
          f"(load average {loadavg()}; target <= 3 s)")  # fmt: skip


if __name__ == "__main__":
    main()
