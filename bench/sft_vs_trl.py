"""SFT training speed, posttrain vs TRL's SFTTrainer, side by side on the same model and data.

    python bench/sft_vs_trl.py [--model tiny|smollm2|all] [--steps N] [--extra] [--repeat N] [--nice -20]

Same model (fp32 weights, 2 threads), same prompt-completion chats, packed
rows of 8 x 256 tokens, completion-only loss, AdamW, clipping at 1.0, one
subprocess per run: posttrain's `run_sft` in its default `precision: auto`
(bf16 autocast where this CPU computes bf16 natively, else fp32); TRL's
SFTTrainer in fp32 and in bf16 autocast (both without gradient checkpointing,
wrapped packing: its fastest settings) with transformers' SDPA attention, and in
bf16 with its eager attention, and a bare `model(..., labels=...)` + AdamW loop. With --extra also TRL's defaults (bf16 autocast + checkpointing)
and posttrain pinned to fp32. The first
`--warmup` steps are dropped for all; tokens/s = tokens of the rows (padding
included) / step time. Model FLOPs per step = 6 * P * T + 6 * d * V * R (P:
parameters outside embedding / LM head, T: tokens, d: hidden size, V: vocab,
R: rows through the LM head); % peak divides FLOPs/s by the n=2048 matmul peak
measured here in the precision each system ran. bench/README.md explains the
rows; the last line is `ratio posttrain(auto=P)/trl_fastest(MODE) tokens/s:
X.XXx on MACHINE` for the last model, where trl_fastest is the fastest of TRL's
fp32, bf16 and bf16-eager runs on this machine. `--systems` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import THREADS, machine, machine_line, model_path, peak_rss_mb, run_worker, step_clock, worker_env

BATCH, SEQ = 8, 256
DEFAULT_STEPS = {"tiny": (20, 2), "smollm2": (4, 1)}  # (measured, warm-up)
SYSTEMS = ("posttrain", "trl-fp32", "trl-bf16", "trl-bf16-eager", "bare", "trl-defaults", "posttrain-fp32")
"""The first five run by default; --extra adds the last two. ``trl-bf16-eager``: TRL with transformers'
eager attention (matmuls and an fp32 softmax), which can beat its SDPA default on short CPU rows."""


def write_data(path: Path, n_per_level: int = 150) -> None:
    """Conversational prompt-completion records: one file both systems read."""
    from posttrain.data.tasks import make_split

    with path.open("w") as f:
        for task in ("arith", "countdown", "sort"):
            for p in make_split(task, "train", n_per_level, seed=0):
                prompt = [{"role": "user", "content": p.question}]
                completion = [{"role": "assistant", "content": p.response("\n")}]
                f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def run_posttrain(path: str, data: str, out: Path, n_steps: int, precision: str) -> dict:
    """The real trainer (`run_sft`); per-step times and token counts read back from metrics.jsonl."""
    from posttrain.data.sft_data import BatchPlan, DataConfig, build_samples
    from posttrain.models.load import load_tokenizer
    from posttrain.train.loop import LoopConfig, ModelConfig
    from posttrain.train.sft import SFTRecipe, run_sft

    loop = LoopConfig(max_steps=n_steps, batch_size=BATCH, seq_len=SEQ, precision=precision, threads=THREADS)
    loop.tensorboard, loop.save_every = False, 0
    recipe = SFTRecipe(
        model=ModelConfig(path=path, dtype="float32", device="cpu"),
        data=DataConfig(train=data, eval=None, packing=True, max_len=SEQ),
        train=loop,
        output_dir=str(out / "run"),
        resume=False,
    )
    # Real-token fill of the packed rows over an epoch (the plan run_sft builds; not timed).
    tok = load_tokenizer(path)
    samples, _ = build_samples(tok, recipe.data, "train")
    batches = BatchPlan(samples, BATCH, SEQ, True, tok.pad_token_id, recipe.seed).epoch(0)
    fill = sum(len(s.input_ids) for s in samples) / sum(b["input_ids"].numel() for b in batches)
    run_sft(recipe)
    used = json.loads((out / "run" / "run_meta.json").read_text())["precision"]["precision"]
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
    rows = [r for r in rows if "step_time_s" in r]
    return {
        "step_times": [r["step_time_s"] for r in rows],
        "tokens": [round(r["tokens_per_s"] * r["step_time_s"]) for r in rows],
        "head_rows": [r["tokens"] for r in rows],
        "note": f"precision={precision} -> {used}, BFD packing, {fill:.0%} real tokens, attention kept per sample",
        "precision": used,
    }


def run_trl(path: str, data: str, out: Path, n_steps: int, mode: str, attention: str = "sdpa") -> dict:
    """SFTTrainer, mode fp32 | bf16 | defaults, with ``attention`` (transformers' attn_implementation);
    step ends timed by a callback."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ends: list[float] = []  # training start, then the end of every step
    tokens: list[int] = []

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens.append(int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, num_items_in_batch)

    # mode "defaults" keeps SFTConfig's bf16 / gradient_checkpointing / learning_rate defaults.
    speed = {} if mode == "defaults" else {"bf16": mode == "bf16", "gradient_checkpointing": False}
    args = SFTConfig(
        output_dir=str(out / "run"), max_steps=n_steps, per_device_train_batch_size=BATCH, max_length=SEQ,
        packing=True, packing_strategy="wrapped", save_strategy="no", report_to="none",
        logging_steps=n_steps, use_cpu=True, seed=0, **speed,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_dataset("json", data_files=data, split="train")
    trainer = CountingTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.add_callback(step_clock(ends))
    trainer.train()
    labels = trainer.train_dataset["labels"]
    trained = sum(sum(x != -100 for x in row) for row in labels) / sum(len(row) for row in labels)
    return {
        "step_times": [b - a for a, b in zip(ends, ends[1:], strict=False)],
        "tokens": tokens,
        "head_rows": [t - t // SEQ for t in tokens],  # every position but the last of each row
        "note": f"bf16={args.bf16} grad_ckpt={args.gradient_checkpointing} optim={args.optim.value} attn={attention}, "
        f"wrapped packing, {trained:.0%} of tokens trained",
        "precision": "bf16" if args.bf16 else "fp32",
    }


def run_bare(path: str, data: str, out: Path, n_steps: int) -> dict:
    """Plain fwd + bwd (HF loss on all tokens) + AdamW on rows of concatenated samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids: list[int] = []
    for line in Path(data).read_text().splitlines():
        r = json.loads(line)
        ids += tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=True)["input_ids"]
    rows = torch.tensor(ids[: len(ids) // SEQ * SEQ]).view(-1, SEQ)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    for i in range(n_steps):
        batch = rows[(i * BATCH) % (len(rows) - BATCH) :][:BATCH]
        t0 = time.perf_counter()
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    n = [BATCH * SEQ] * n_steps
    return {"step_times": times, "tokens": n, "head_rows": n, "note": "fused AdamW"}


def worker(system: str, path: str, data: str, out: Path, n_steps: int) -> None:
    torch.set_num_threads(THREADS)
    if system.startswith("trl"):
        res = run_trl(
            path,
            data,
            out,
            n_steps,
            mode=system.split("-")[1],
            attention=system.split("-")[2] if system.count("-") > 1 else "sdpa",
        )
    elif system.startswith("posttrain"):
        res = run_posttrain(path, data, out, n_steps, "fp32" if system.endswith("fp32") else "auto")
    else:
        res = run_bare(path, data, out, n_steps)
    res["rss_mb"] = peak_rss_mb()
    (out / "result.json").write_text(json.dumps(res))


def model_shape(path: Path) -> tuple[int, int, int, int]:
    """(all params, params outside embedding / LM-head matrices, hidden size, vocab), without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    embed = {id(m.get_input_embeddings().weight), id(m.get_output_embeddings().weight)}
    params = {id(p): p.numel() for p in m.parameters()}
    body = sum(n for k, n in params.items() if k not in embed)
    return sum(params.values()), body, cfg.hidden_size, m.get_input_embeddings().num_embeddings


def launch(system: str, path: Path, data: Path, tmp: Path, n_steps: int) -> dict | None:
    out = Path(tempfile.mkdtemp(prefix=f"{system}-", dir=tmp))
    cmd = [sys.executable, __file__, "--worker", system, "--path", str(path), "--data", str(data)]
    cmd += ["--out", str(out), "--steps", str(n_steps)]
    return run_worker(system, cmd, out, worker_env(tmp))


def bench_model(name: str, n_meas: int, n_warm: int, systems: list[str], mach: dict, repeat: int) -> None:
    peaks = {"fp32": mach["fp32_gflops"], "bf16": mach["bf16_gflops"]}
    path = model_path(name)
    total, body, d, vocab = model_shape(path)
    print(f"\n== {name}: {path}\n{total / 1e6:.2f}M params ({body / 1e6:.2f}M outside embeddings), "
          f"d={d}, V={vocab}; {BATCH} x {SEQ} packed, fp32 weights, {THREADS} threads; "
          f"{n_meas} measured steps after {n_warm} warm-up, x{repeat} runs", flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-sft-{name}-"))
    try:
        write_data(tmp / "data.jsonl")
        # Repeats alternate the order (ABC CBA ...), so slow drifts of the host hit everyone alike.
        order = [s for i in range(repeat) for s in (systems if i % 2 == 0 else systems[::-1])]
        runs = [(s, launch(s, path, tmp / "data.jsonl", tmp, n_meas + n_warm)) for s in order]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = f"{'s/step':>7}{'tokens/s':>9}{'%peak':>7}{'RSS MB':>7}{'wall s':>7}{'others':>7}"
    print(f"{'system':<15}{cols}  notes")
    tps: dict[str, float] = {}
    for system in systems:
        rs = [r for s, r in runs if s == system and r is not None]
        if not rs:
            continue
        times = [t for r in rs for t in r["step_times"][n_warm:]]
        tok, rows = (sum(sum(r[k][n_warm:]) for r in rs) for k in ("tokens", "head_rows"))
        t, avg = sum(times), {k: statistics.mean(r[k] for r in rs) for k in ("rss_mb", "wall_s", "others")}
        tps[system] = tok / t
        peak = peaks[rs[0].get("precision", "fp32")]
        pct = 100 * (6 * body * tok + 6 * d * vocab * rows) / t / 1e9 / peak
        print(f"{system:<15}{t / len(times):>7.2f}{tps[system]:>9.0f}{pct:>6.1f}%{avg['rss_mb']:>7.0f}"
              f"{avg['wall_s']:>7.0f}{avg['others']:>7.2f}  sd {statistics.pstdev(times):.2f} s; {rs[0]['note']}",
              flush=True)  # fmt: skip
    pairs = [("posttrain", "bare"), ("posttrain", "trl-defaults"), ("posttrain-fp32", "trl-fp32")]
    pairs += [("posttrain", "trl-fp32"), ("posttrain", "trl-bf16"), ("posttrain", "trl-bf16-eager")]
    for ours, peer in ((a, b) for a, b in pairs if a in tps and b in tps):
        ratio = f"{ours}/{peer}".replace("-", "_")
        print(f"ratio {ratio} tokens/s: {tps[ours] / tps[peer]:.2f}x")
    trl = {s: tps[s] for s in ("trl-fp32", "trl-bf16", "trl-bf16-eager") if s in tps}
    if "posttrain" in tps and trl:  # the last line: our default vs the peer's fastest setting here
        fastest = max(trl, key=trl.get)
        used = next(r for s, r in runs if s == "posttrain" and r is not None)["precision"]
        print(f"ratio posttrain(auto={used})/trl_fastest({fastest.removeprefix('trl-')}) tokens/s: "
              f"{tps['posttrain'] / trl[fastest]:.2f}x on {machine_line(mach)}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2", "all"], default="all")
    ap.add_argument("--steps", type=int, help="measured steps (default: tiny 20, smollm2 4)")
    ap.add_argument("--warmup", type=int, help="warm-up steps dropped (default: tiny 2, smollm2 1)")
    ap.add_argument("--extra", action="store_true", help="also TRL's defaults (slow) and posttrain in fp32")
    ap.add_argument("--repeat", type=int, default=1, help="runs per system, in alternating order")
    ap.add_argument("--nice", type=int, default=0, help="e.g. -20: priority over other jobs (root)")
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, help="run only these systems")
    for hidden in ("--worker", "--path", "--data", "--out"):  # used by the subprocesses
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.path, a.data, Path(a.out), a.steps)
    systems = a.systems or list(SYSTEMS if a.extra else SYSTEMS[:5])
    if a.nice:  # inherited by the workers; Linux shares the CPU between sessions by autogroup
        os.nice(a.nice)
        if Path("/proc/self/autogroup").exists():
            Path("/proc/self/autogroup").write_text(str(a.nice))
    mach = machine()
    print(f"machine: {machine_line(mach)}", flush=True)
    for name in ["tiny", "smollm2"] if a.model == "all" else [a.model]:
        n_meas, n_warm = DEFAULT_STEPS[name]
        n_warm = n_warm if a.warmup is None else a.warmup
        bench_model(name, a.steps or n_meas, n_warm, systems, mach, a.repeat)


if __name__ == "__main__":
    main()
