"""GRPO training speed, posttrain vs TRL's GRPOTrainer, side by side on the same model and prompts.

    python bench/grpo_vs_trl.py [--model tiny|smollm2|all] [--beta 0 0.04] [--steps N] [--warmup W]

Both systems train the same model (fp32 weights, 2 threads) with GRPO on the same prompts
(arith questions of the task suite, chat format, one JSONL file), the same reward (the task
verifier: 1 if the final answer is right, else 0), ``--prompts`` prompts x 8 completions per
step, at most 64 new tokens, temperature 1.0 (top-p 1, top-k off), one optimiser step per
rollout (no PPO epochs), token-mean loss, clip 0.2, AdamW lr 1e-6, grad-norm clip 1.0, once
with beta = 0 (no reference model) and once with beta > 0 (k3 KL in the loss to a frozen
reference). Each (system, beta) runs in its own subprocess; the first ``--warmup`` steps are
dropped for both.

- posttrain: `posttrain.train.rl.run_rl`; the policy module itself samples (batched KV cache,
  prefix sharing, finished rows dropped) and its sampling log-probs serve as the old log-probs;
  step times from metrics.jsonl (generation + reward + update; no eval, no checkpoint).
- trl-fp32 / trl-bf16: GRPOTrainer (HF ``generate`` path), bf16=False / True and
  gradient_checkpointing=False (checkpointing, its default, is slower here), use_cpu=True,
  transformers' SDPA attention; step times from a callback (one step = generation + reward +
  update). trl-fp32-eager / trl-bf16-eager: the same with its eager attention (matmuls, fp32
  softmax), which can beat SDPA on short CPU rows. The fastest of the four on this machine is the peer.
- posttrain runs its default `train.precision: auto` (bf16 autocast where the CPU has native
  bf16, else fp32).

Completions differ between systems (different random streams), so each row also reports the
mean completion length. The last line is ``ratio posttrain(auto=P)/trl_fastest(MODE) steps/s:
X.XXx on MACHINE`` of the last (model, beta) pair benchmarked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import THREADS, machine, machine_line, model_path, peak_rss_mb, run_worker, step_clock, worker_env

N, MAX_NEW, LR = 8, 64, 1e-6
DEFAULTS = {"tiny": (8, 5, 1), "smollm2": (4, 3, 1)}  # (prompts per step, measured steps, warm-up)
SYSTEMS = ("posttrain", "trl-fp32", "trl-bf16", "trl-fp32-eager", "trl-bf16-eager")
"""posttrain in its default precision (auto); TRL in fp32 and in bf16 autocast: its fastest of the two is the peer."""


def write_prompts(path: Path, n: int) -> None:
    """`n` arith prompt records: {prompt: [user message], metadata: {scorer, task, ground_truth}}."""
    import random

    from posttrain.data.tasks import make_split

    problems = make_split("arith", "train", -(-n // 4), seed=0)  # every level, grouped by level
    random.Random(0).shuffle(problems)
    rows = [p.prompt_record() for p in problems[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- workers (one per subprocess)


def run_posttrain(path: str, data: str, out: Path, n_steps: int, prompts: int, beta: float) -> dict:
    from posttrain.config import load_recipe
    from posttrain.train.rl import RLRecipe, run_rl

    overrides = [
        f"model.path={path}", "model.dtype=float32", "model.device=cpu", f"output_dir={out / 'run'}",
        f"data.prompts={data}", "rewards=[{name: scorer}]", "algorithm.advantage=grpo",
        f"algorithm.kl.coef={beta}", "algorithm.kl.estimator=k3", "algorithm.kl.placement=loss",
        "algorithm.loss_agg=token-mean", f"rollout.prompts_per_step={prompts}", f"rollout.n={N}",
        f"rollout.max_new_tokens={MAX_NEW}", "rollout.temperature=1.0", "eval.n_per_level=0",
        f"train.max_steps={n_steps}", f"train.threads={THREADS}", "train.tensorboard=false",
        f"optim.lr={LR}", "optim.schedule=constant", "resume=false", "anomaly.on_anomaly=warn",
    ]  # fmt: skip
    run_rl(load_recipe(RLRecipe, None, overrides))
    used = json.loads((out / "run" / "run_meta.json").read_text())["precision"]["precision"]
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
    rows = [r for r in rows if "time/step_s" in r]
    return {
        "step_times": [r["time/step_s"] for r in rows],
        "lengths": [r["response/length_mean"] for r in rows],
        "gen_share": sum(r["time/generate_s"] for r in rows) / sum(r["time/step_s"] for r in rows),
        "note": f"precision auto -> {used}; "
        + (
            "rollout log-probs as old log-probs"
            if used == "fp32"
            else "old log-probs from the update forward"
        )
        + ("; frozen reference copy" if beta else "; no reference"),
        "precision": used,
    }


def run_trl(
    path: str,
    data: str,
    out: Path,
    n_steps: int,
    prompts: int,
    beta: float,
    bf16: bool,
    attention: str = "sdpa",
) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.rewards.verifiers import verify_task

    ends: list[float] = []
    lengths: list[float] = []

    def task_verifier(prompts, completions, completion_ids, metadata, **kw) -> list[float]:
        lengths.append(sum(map(len, completion_ids)) / len(completion_ids))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [
            float(verify_task(t, m["task"], m["ground_truth"])) for t, m in zip(texts, metadata, strict=True)
        ]

    args = GRPOConfig(
        output_dir=str(out / "run"), max_steps=n_steps, per_device_train_batch_size=prompts * N,
        num_generations=N, max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0,
        beta=beta, epsilon=0.2, loss_type="dapo", scale_rewards="group", learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=1.0, bf16=bf16, gradient_checkpointing=False,
        use_cpu=True, save_strategy="no", report_to="none", logging_steps=max(1, n_steps), seed=0,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_dataset("json", data_files=data, split="train")
    trainer = GRPOTrainer(
        model=model, reward_funcs=[task_verifier], args=args, train_dataset=ds, processing_class=tok
    )
    trainer.add_callback(step_clock(ends))
    trainer.train()
    return {
        "step_times": [b - a for a, b in zip(ends, ends[1:], strict=False)],
        "lengths": lengths,
        "gen_share": float("nan"),
        "note": f"bf16={args.bf16} grad_ckpt={args.gradient_checkpointing} loss={args.loss_type} attn={attention}",
    }


def worker(a: argparse.Namespace) -> None:
    torch.set_num_threads(THREADS)
    args = (a.path, a.data, Path(a.out), a.steps, a.prompts, a.beta[0])
    if a.worker == "posttrain":
        res = run_posttrain(*args)
    else:
        mode, _, attention = a.worker.removeprefix("trl-").partition("-")
        res = run_trl(*args, bf16=mode == "bf16", attention=attention or "sdpa")
    res["rss_mb"] = peak_rss_mb()
    (Path(a.out) / "result.json").write_text(json.dumps(res))


# ---------------------------------------------------------------- driver


def launch(
    system: str, path: Path, data: Path, tmp: Path, n_steps: int, prompts: int, beta: float
) -> dict | None:
    out = tmp / f"{system}-beta{beta:g}"
    out.mkdir()
    cmd = [sys.executable, __file__, "--worker", system, "--path", str(path), "--data", str(data)]
    cmd += ["--out", str(out), "--steps", str(n_steps), "--prompts", str(prompts), "--beta", str(beta)]
    return run_worker(system, cmd, out, worker_env(tmp))


def bench_model(name: str, a: argparse.Namespace) -> tuple[float, str, str] | None:
    path = model_path(name, a.model_path)
    prompts, n_meas, n_warm = DEFAULTS[name]
    prompts, n_meas = a.prompts or prompts, a.steps or n_meas
    n_warm = n_warm if a.warmup is None else a.warmup
    n_steps = n_meas + n_warm
    print(f"\n== {name}: {path}\n{prompts} prompts x {N} completions per step, <= {MAX_NEW} new tokens, fp32 weights, "
          f"{THREADS} threads; {n_meas} measured steps after {n_warm} warm-up", flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-grpo-{name}-"))
    ratio = None
    try:
        write_prompts(tmp / "prompts.jsonl", prompts * n_steps)
        for beta in a.beta:
            res = {s: launch(s, path, tmp / "prompts.jsonl", tmp, n_steps, prompts, beta) for s in a.systems}
            print(
                f"beta={beta:g}\n{'system':<15}{'s/step':>8}{'sd':>6}{'len':>6}{'gen %':>7}{'RSS MB':>8}  notes"
            )
            sps = {}
            for system, r in ((s, r) for s, r in res.items() if r is not None):
                times = r["step_times"][n_warm:]
                sps[system] = len(times) / sum(times)
                length = statistics.mean(r["lengths"][n_warm:] or r["lengths"])
                print(f"{system:<15}{sum(times) / len(times):>8.2f}{statistics.pstdev(times):>6.2f}{length:>6.1f}"
                      f"{100 * r['gen_share']:>7.0f}{r['rss_mb']:>8.0f}  {r['note']}", flush=True)  # fmt: skip
            trl = {s: v for s, v in sps.items() if s.startswith("trl")}
            if "posttrain" in sps and trl:
                fastest = max(trl, key=trl.get)
                ratio = (
                    sps["posttrain"] / trl[fastest],
                    res["posttrain"]["precision"],
                    fastest.removeprefix("trl-"),
                )
                print(f"{name} beta={beta:g}: ratio posttrain(auto={ratio[1]})/trl_fastest({ratio[2]}) "
                      f"steps/s: {ratio[0]:.2f}x", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2", "all"], default="all")
    ap.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.04], help="KL coefficients to run")
    ap.add_argument("--steps", type=int, help="measured steps (default: tiny 5, smollm2 3)")
    ap.add_argument("--warmup", type=int, help="warm-up steps dropped (default 1)")
    ap.add_argument("--prompts", type=int, help="prompts per step (default: tiny 8, smollm2 4)")
    ap.add_argument("--model-path", help="benchmark this model folder instead (with --model tiny|smollm2)")
    ap.add_argument(
        "--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="run only these systems"
    )
    for hidden in ("--worker", "--path", "--data", "--out"):  # used by the subprocesses
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    mach = machine()
    print(f"machine: {machine_line(mach)}", flush=True)
    ratio = None
    for name in ["tiny", "smollm2"] if a.model == "all" else [a.model]:
        ratio = bench_model(name, a) or ratio
    if ratio is None:
        why = (
            "a run failed"
            if {"posttrain", "trl"} <= {s.partition("-")[0] for s in a.systems}
            else "--systems"
        )
        print(f"ratio posttrain/trl_fastest steps/s: n/a ({why}) on {machine_line(mach)}")
    else:
        print(f"ratio posttrain(auto={ratio[1]})/trl_fastest({ratio[2]}) steps/s: {ratio[0]:.2f}x "
              f"on {machine_line(mach)}")  # fmt: skip


if __name__ == "__main__":
    main()
