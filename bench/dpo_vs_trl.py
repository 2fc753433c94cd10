"""DPO training speed, posttrain vs TRL's DPOTrainer, side by side on the same model and pairs.

    python bench/dpo_vs_trl.py [--model tiny|smollm2|all] [--steps N] [--skip-trl-defaults]

Every system trains the same model (fp32 weights, 2 threads) with the DPO
sigmoid loss (beta 0.1) on the same preference pairs: the task suite's
verified-correct vs wrong-or-malformed solutions (`posttrain.data.tasks.pairs`),
conversational, written to one JSONL file and kept only where prompt + response
fits 128 tokens under the model's chat template (so nobody truncates).
8 pairs per optimiser step, full fine-tuning, AdamW, grad-norm clip 1.0. Each
system runs in its own subprocess (isolated warm-up and peak RSS); the first
`--warmup` steps are dropped for everyone.

- posttrain: `posttrain.train.preference.run_preference`; the reference
  log-probs are precomputed (its default for full fine-tuning); chosen and
  rejected of a pair share one forward of their common prefix; examples
  packed into rows of 512 tokens; step times from metrics.jsonl.
- posttrain runs its default `train.precision: auto` (bf16 autocast where the CPU has native
  bf16, else fp32).
- trl-fp32 / trl-bf16: DPOTrainer with bf16=False / True, gradient_checkpointing=False and
  precompute_ref_log_probs=True (the same reference treatment), transformers' SDPA attention;
  trl-bf16-eager: the same bf16 run with its eager attention (matmuls, fp32 softmax), which can beat
  SDPA on short CPU rows; the fastest of the three is TRL's fastest here.
- trl-defaults: DPOConfig's defaults for bf16 (True: autocast), gradient
  checkpointing (True) and the reference (a second model, forward every step).

Speed is measured in pair tokens / s: the tokens of prompt + chosen plus prompt +
rejected of the pairs in the step (padding and shared-prefix savings do not
count), so batches of different lengths compare fairly. The precompute passes
(both systems) happen before step 1 and are not timed; their wall time is in
`wall s`. The last line is `ratio posttrain(auto=P)/trl_fastest(MODE) pair
tokens/s: X.XXx on MACHINE` of the last model benchmarked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    THREADS,
    busy_cpu_s,
    machine,
    machine_line,
    model_path,
    peak_rss_mb,
    run_worker,
    step_clock,
    worker_env,
)

BATCH, MAX_LEN = 8, 128
DEFAULT_STEPS = {"tiny": (20, 2), "smollm2": (4, 1)}  # (measured, warm-up)
SYSTEMS = ("posttrain", "trl-fp32", "trl-bf16", "trl-bf16-eager", "trl-defaults")
"""posttrain in its default precision (auto); TRL's fastest is the faster of its fp32 and bf16 runs."""


def write_pairs(path: Path, model: Path, n_pairs: int) -> None:
    """The first `n_pairs` generated pairs whose chosen and rejected both fit MAX_LEN tokens."""
    from posttrain.data.render import render_prompt_completion
    from posttrain.data.tasks.pairs import make_pairs
    from posttrain.models.load import load_tokenizer

    tok = load_tokenizer(model)
    sep = "<step>" if "<step>" in tok.get_vocab() else "\n"
    pools = [make_pairs(t, "train", 40, seed=0, step_sep=sep) for t in ("arith", "countdown", "sort")]
    rows = [r for group in zip(*pools, strict=False) for r in group]  # interleave the tasks
    kept = []
    for r in rows:
        lens = [
            len(render_prompt_completion(tok, r["prompt"], r[k]).input_ids) for k in ("chosen", "rejected")
        ]
        if max(lens) <= MAX_LEN:
            kept.append({k: r[k] for k in ("prompt", "chosen", "rejected")})
        if len(kept) == n_pairs:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


# ---------------------------------------------------------------- workers (one per subprocess)


def run_posttrain(path: str, data: str, out: Path, n_steps: int) -> dict:
    from posttrain.config import load_recipe
    from posttrain.train.preference import PreferenceRecipe, run_preference
    from posttrain.train.preference_data import ExamplePlan, build_examples

    overrides = [
        f"model.path={path}", "model.dtype=float32", "model.device=cpu", f"output_dir={out / 'run'}",
        f"data.train={data}", "data.eval=null", f"data.max_len={MAX_LEN}", "data.packing=true",
        "eval.task_accuracy_n=0", "eval.before=false", "loss.name=sigmoid", "loss.beta=0.1",
        f"train.max_steps={n_steps}", f"train.batch_size={BATCH}", "train.seq_len=512",
        f"train.threads={THREADS}", "train.tensorboard=false", "optim.lr=1e-6", "resume=false",
    ]  # fmt: skip
    cfg = load_recipe(PreferenceRecipe, None, overrides)
    run_preference(cfg)
    used = json.loads((out / "run" / "run_meta.json").read_text())["precision"]["precision"]
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
    rows = [r for r in rows if "step_time_s" in r]
    # Pair tokens of the batches the run saw (the plan is deterministic in the seed).
    from posttrain.models.load import load_tokenizer

    examples, _ = build_examples(cfg.data, load_tokenizer(path), "train", "sigmoid", unpaired=False)
    plan = ExamplePlan(examples, list(range(len(examples))), BATCH, 512, True, True, 0, cfg.seed)
    batches = [plan.epoch(i // len(plan))[i % len(plan)] for i in range(n_steps)]
    pair_tokens = [
        sum(len(s.input_ids) for i in b["example_index"] for s in examples[i].samples) for b in batches
    ]
    processed = [int(b["input_ids"].numel()) for b in batches]
    share = sum(processed) / sum(pair_tokens)
    return {
        "step_times": [r["step_time_s"] for r in rows],
        "pair_tokens": pair_tokens,
        "note": f"precision auto -> {used}; shared-prefix packed rows: {share:.0%} of pair tokens processed "
        "(incl. padding); reference precomputed",
        "precision": used,
    }


def run_trl(path: str, data: str, out: Path, n_steps: int, mode: str, attention: str = "sdpa") -> dict:
    """DPOTrainer, mode fp32 | bf16 (no checkpointing, precomputed reference) | defaults, with
    ``attention`` (transformers' attn_implementation)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    ends: list[float] = []
    tokens: list[int] = []
    padded: list[int] = []

    class CountingTrainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens.append(int(inputs["attention_mask"].sum()))
            padded.append(int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, num_items_in_batch)

    speed = {}
    if mode != "defaults":
        speed = {"bf16": mode == "bf16", "gradient_checkpointing": False, "precompute_ref_log_probs": True}
    args = DPOConfig(
        output_dir=str(out / "run"), max_steps=n_steps, per_device_train_batch_size=BATCH, max_length=MAX_LEN,
        beta=0.1, loss_type=["sigmoid"], learning_rate=1e-6, save_strategy="no", report_to="none",
        logging_steps=n_steps, use_cpu=True, seed=0, **speed,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_dataset("json", data_files=data, split="train")
    trainer = CountingTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.add_callback(step_clock(ends))
    trainer.train()
    return {
        "step_times": [b - a for a, b in zip(ends, ends[1:], strict=False)],
        "pair_tokens": tokens,
        "note": f"bf16={args.bf16} grad_ckpt={args.gradient_checkpointing} attn={attention} "
        f"precompute_ref={args.precompute_ref_log_probs}; {sum(tokens) / sum(padded):.0%} of padded tokens real",
    }


def worker(system: str, path: str, data: str, out: Path, n_steps: int) -> None:
    torch.set_num_threads(THREADS)
    if system == "posttrain":
        res = run_posttrain(path, data, out, n_steps)
    else:
        mode, _, attention = system.removeprefix("trl-").partition("-")
        res = run_trl(path, data, out, n_steps, mode=mode, attention=attention or "sdpa")
    res["rss_mb"] = peak_rss_mb()
    (out / "result.json").write_text(json.dumps(res))


# ---------------------------------------------------------------- driver


def wait_idle(max_wait: float, limit: float = 0.3) -> None:
    """Wait up to max_wait s until other processes use < limit cores (over 5 s): the machine may be shared."""
    deadline = time.time() + max_wait
    while True:
        busy0, _ = busy_cpu_s()
        time.sleep(5)
        load = (busy_cpu_s()[0] - busy0) / 5
        if load < limit:
            return
        if time.time() > deadline:
            print(f"warning: other processes use {load:.1f} cores; timings will be disturbed", flush=True)
            return


def launch(system: str, path: Path, data: Path, tmp: Path, n_steps: int, max_wait: float) -> dict | None:
    wait_idle(max_wait)
    out = tmp / system
    out.mkdir()
    cmd = [sys.executable, __file__, "--worker", system, "--path", str(path), "--data", str(data)]
    cmd += ["--out", str(out), "--steps", str(n_steps)]
    return run_worker(system, cmd, out, worker_env(tmp))


def bench_model(
    name: str, n_meas: int, n_warm: int, systems: list[str], max_wait: float, mach: dict, path=None
) -> None:
    path = model_path(name, path)
    n_steps = n_meas + n_warm
    print(f"\n== {name}: {path}\n{BATCH} pairs/step, max length {MAX_LEN}, fp32 weights, {THREADS} threads; "
          f"{n_meas} measured steps after {n_warm} warm-up", flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-dpo-{name}-"))
    try:
        write_pairs(tmp / "pairs.jsonl", path, n_steps * BATCH)
        results = {s: launch(s, path, tmp / "pairs.jsonl", tmp, n_steps, max_wait) for s in systems}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'system':<15}{'s/step':>7}{'pair tok/s':>11}{'RSS MB':>8}{'wall s':>7}{'others':>7}  notes")
    tps: dict[str, float] = {}
    for system, r in ((s, r) for s, r in results.items() if r is not None):
        times, toks = r["step_times"][n_warm:], r["pair_tokens"][n_warm:]
        tps[system] = sum(toks) / sum(times)
        print(f"{system:<15}{sum(times) / len(times):>7.2f}{tps[system]:>11.0f}{r['rss_mb']:>8.0f}"
              f"{r['wall_s']:>7.0f}{r['others']:>7.2f}  sd {statistics.pstdev(times):.2f} s; {r['note']}",
              flush=True)  # fmt: skip
    for peer in ("trl-defaults", "trl-fp32", "trl-bf16", "trl-bf16-eager"):
        if "posttrain" in tps and peer in tps:
            print(
                f"ratio posttrain/{peer.replace('-', '_')} pair tokens/s: {tps['posttrain'] / tps[peer]:.2f}x"
            )
    trl = {s: tps[s] for s in ("trl-fp32", "trl-bf16", "trl-bf16-eager") if s in tps}
    if "posttrain" in tps and trl:  # the last line: our default vs the peer's fastest setting here
        fastest = max(trl, key=trl.get)
        print(f"ratio posttrain(auto={results['posttrain']['precision']})/trl_fastest({fastest.removeprefix('trl-')}) "
              f"pair tokens/s: {tps['posttrain'] / trl[fastest]:.2f}x on {machine_line(mach)}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2", "all"], default="all")
    ap.add_argument("--steps", type=int, help="measured steps (default: tiny 20, smollm2 4)")
    ap.add_argument("--warmup", type=int, help="warm-up steps dropped (default: tiny 2, smollm2 1)")
    ap.add_argument("--skip-trl-defaults", action="store_true", help="skip the slow bf16 + checkpointing run")
    ap.add_argument("--model-path", help="benchmark this model folder instead (with --model tiny|smollm2)")
    ap.add_argument(
        "--max-wait", type=float, default=600, help="s to wait for an idle machine before each run"
    )
    for hidden in ("--worker", "--path", "--data", "--out"):  # used by the subprocesses
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.path, a.data, Path(a.out), a.steps)
    systems = [s for s in SYSTEMS if not (a.skip_trl_defaults and s == "trl-defaults")]
    wait_idle(a.max_wait)
    mach = machine()
    print(f"machine: {machine_line(mach)}", flush=True)
    for name in ["tiny", "smollm2"] if a.model == "all" else [a.model]:
        n_meas, n_warm = DEFAULT_STEPS[name]
        n_warm = n_warm if a.warmup is None else a.warmup
        bench_model(name, a.steps or n_meas, n_warm, systems, a.max_wait, mach, a.model_path)


if __name__ == "__main__":
    main()
