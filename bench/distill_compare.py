"""Distillation vs plain SFT at equal student compute, on held-out task accuracy.

Teacher: the embedded tiny default after SFT (`recipes/sft_tiny.yaml`; pass --teacher to reuse one).
Student: a ~1/4-size model sharing the default's tokenizer (`posttrain pretrain
recipes/distill_student_tiny.yaml`). Arms, each STEPS optimiser steps of BATCH sequences from the
same student start:

- sft:        plain SFT on the task suite's demonstrations (padded batches, not packed);
- logit:      logit KD (forward KL to the teacher) on the same demonstrations, the same batches;
- on_policy:  GKD: BATCH student samples per step, reverse KL to the teacher at every position;
- logit+on_policy: STEPS/2 logit KD, then STEPS/2 on-policy (GKD starts from a trained student).

Held-out greedy accuracy (`posttrain.eval.accuracy.task_accuracy`) on the test split, per arm and seed,
with the teacher and the untrained student beside them; results.json + a markdown table in OUT.

    python bench/distill_compare.py --student runs/distill_student_tiny/final [--teacher DIR] [--steps 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

TASKS = ["arith", "countdown", "sort"]


def _data(n_per_level: int):
    from posttrain.data.sft_data import DataConfig

    return DataConfig(
        train="tasks", eval=None, tasks=TASKS, n_per_level=n_per_level, max_len=256, packing=False
    )


def _loop(steps: int, batch: int):
    from posttrain.train.loop import LoopConfig

    return LoopConfig(max_steps=steps, batch_size=batch, seq_len=256, tensorboard=False, num_samples=0)


def teacher_model(args) -> str:
    if args.teacher:
        return args.teacher
    from posttrain.config import load_recipe
    from posttrain.train.sft import SFTRecipe, run_sft

    overrides = [f"output_dir={args.out}/teacher", f"model.path={args.teacher_base}"]
    return str(run_sft(load_recipe(SFTRecipe, "recipes/sft_tiny.yaml", overrides)))


def run_arm(arm: str, args, teacher: str, seed: int, student: str, steps: int, out: Path) -> str:
    """Train one arm from ``student`` for ``steps`` steps into ``out``; returns its final/ folder."""
    from posttrain.train.distill import DistillRecipe, run_distill
    from posttrain.train.distill.config import DistillLossConfig, DistillRolloutConfig
    from posttrain.train.loop import ModelConfig
    from posttrain.train.optim import OptimConfig
    from posttrain.train.sft import SFTRecipe, run_sft

    common = dict(optim=OptimConfig(lr=args.lr, warmup_steps=5), output_dir=str(out), seed=seed)
    data, loop = _data(args.n_per_level), _loop(steps, args.batch)
    if arm == "sft":
        return str(run_sft(SFTRecipe(model=ModelConfig(path=student), data=data, train=loop, **common)))
    if arm in ("logit", "on_policy"):
        cfg = DistillRecipe(
            mode=arm, teacher=ModelConfig(path=teacher), student=ModelConfig(path=student), data=data,
            loss=DistillLossConfig(kind="forward_kl" if arm == "logit" else "reverse_kl"),
            rollout=DistillRolloutConfig(prompts_per_step=args.batch, n=1, temperature=1.0, max_new_tokens=96),
            train=loop, **common,
        )  # fmt: skip
        return str(run_distill(cfg))
    first = run_arm("logit", args, teacher, seed, student, steps // 2, out / "logit_half")
    return run_arm("on_policy", args, teacher, seed, first, steps - steps // 2, out / "on_policy_half")


def accuracy(path: str, n_eval: int) -> dict:
    from posttrain.data.tasks import task_problems
    from posttrain.eval.accuracy import task_accuracy
    from posttrain.models.load import load_model, load_tokenizer

    tok = load_tokenizer(path)
    report, _ = task_accuracy(
        load_model(path, tokenizer=tok), tok, task_problems(TASKS, "test", n_eval, 0), 96
    )
    return report.to_dict()


def _tokens(run_dir: Path) -> float:
    """Trained tokens over the run's optimiser steps (metrics.jsonl, every run dir below ``run_dir``)."""
    total = 0.0
    for f in run_dir.rglob("metrics.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        total += sum(r.get("tokens", 0) for r in rows if "loss" in r)
    return total


@dataclasses.dataclass
class Args:
    student: str
    teacher: str | None
    teacher_base: str
    steps: int
    batch: int
    lr: float
    n_per_level: int
    n_eval: int
    seeds: list[int]
    arms: list[str]
    out: str


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True)
    p.add_argument(
        "--teacher", default=None, help="an SFT'd teacher folder (default: SFT --teacher-base here)"
    )
    p.add_argument("--teacher-base", default="default", help="the model the teacher's SFT starts from")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-per-level", type=int, default=200)
    p.add_argument("--n-eval", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", default=["sft", "logit", "on_policy", "logit+on_policy"])
    p.add_argument("--out", default="runs/distill_compare")
    args = Args(**vars(p.parse_args()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    teacher = teacher_model(args) if set(args.arms) != {"sft"} else None  # the control needs none
    for name, path in (("teacher", teacher), ("student (start)", args.student)):
        if name not in results and path is not None:
            results[name] = {"acc": accuracy(path, args.n_eval), "path": path}
            results_file.write_text(json.dumps(results, indent=1))
    for seed in args.seeds:
        for arm in args.arms:
            key = f"{arm} seed{seed}"
            if key in results:
                continue
            t0 = time.perf_counter()
            run_dir = out / f"seed{seed}" / arm
            final = run_arm(arm, args, teacher, seed, args.student, args.steps, run_dir)
            train_s = time.perf_counter() - t0
            tokens = _tokens(run_dir)
            results[key] = {
                "acc": accuracy(final, args.n_eval),
                "train_s": train_s,
                "trained_tokens": tokens,
                "path": final,
            }
            results_file.write_text(json.dumps(results, indent=1))
            print(
                f"{key}: held-out accuracy {results[key]['acc']['overall']:.3f}  ({train_s:.0f} s)",
                flush=True,
            )
    lines = [
        "| model | held-out acc | " + " | ".join(TASKS) + " | trained tokens | wall s |",
        "|---" * (len(TASKS) + 4) + "|",
    ]
    for key, r in results.items():
        per_task = [_task_acc(r["acc"], t) for t in TASKS]
        lines.append(
            f"| {key} | {100 * r['acc']['overall']:.1f} | " + " | ".join(f"{100 * a:.1f}" for a in per_task)
            + f" | {r.get('trained_tokens', '')} | {r.get('train_s', 0):.0f} |"
        )  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _task_acc(acc: dict, task: str) -> float:
    cells = [v for k, v in acc.items() if k.startswith(f"{task}/")]
    return sum(cells) / len(cells) if cells else float("nan")


if __name__ == "__main__":
    main()
